"""What one training step runs, counted rather than timed: aten operators (torch.profiler) and Python
function calls (cProfile) per step of the goal's step of benchmarks/step_cost.py (size term, PCGrad every
10 steps between accuracy and size) and of the plain step beside it, on LeNet-300-100 at batch 128.

    .venv/bin/python benchmarks/step_ops.py --data ../shared/datasets/mnist/mnist.npz \
        --out benchmarks/results/step_ops_head.json
    .venv/bin/python benchmarks/step_ops.py --data ../shared/datasets/mnist/mnist.npz --tree /path/to/old/checkout \
        --against benchmarks/results/step_ops_head.json --out benchmarks/results/step_ops_old.json

Why: a step's time moves by 10-15% from one process to the next on this machine (step_cost_runs.py), so a
code change of a few percent cannot be told from the machine's mood by timing; the counts do not move. With
`--tree`, the steppers and the package come from another checkout (its src/ and benchmarks/), so two commits
are counted alike; `--against` adds, per operator and per function, what one file counts more than the other.
Counts are means over the profiled steps (a PCGrad step every 10 adds its share); the profiler's own times are
not reported (it slows small operators unevenly).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import subprocess
import sys
from pathlib import Path

STEPS, WARMUP = 20, 25


def load_tree(tree: Path, data: str):
    """`tree`'s benchmarks/step_cost.py (on `tree`'s package, one thread), the LeNet-300-100 teacher it times and
    the data: what every stepper of another checkout is made from."""
    sys.path[:0] = [str(tree / "src"), str(tree / "benchmarks")]
    import torch

    torch.set_num_threads(1)
    import step_cost
    from jointcompress.data import load_dataset
    from jointcompress.models import build_model

    torch.manual_seed(0)
    split = load_dataset(data)
    return step_cost, build_model("lenet300", split.image_size, split.num_classes), split


def steppers(tree: Path, data: str) -> dict:
    """The plain step and the goal's step, made by `tree`'s benchmarks/step_cost.py on `tree`'s package."""
    step_cost, teacher, split = load_tree(tree, data)
    from jointcompress.artifact.size import dense_fp32_bytes  # the tree's package, on the path now

    goal = dense_fp32_bytes(teacher) / 100
    return {"plain": step_cost.plain_stepper(teacher, split),
            "budget_acc_pcgrad_every10": step_cost.joint_stepper(
                teacher, split, "pcgrad", recipe=step_cost.budget_recipe("pcgrad", 10, goal, accuracy_as_one=True))}


def count(step) -> dict:
    """Per step: aten operators by name, and Python calls by function (file relative to the package)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(WARMUP):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(STEPS):
            step()
    ops = collections.Counter(e.name for e in prof.events())
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(STEPS):
        step()
    profiler.disable()
    calls = collections.Counter()
    for (path, _, function), (_, ncalls, *_rest) in pstats.Stats(profiler).stats.items():
        calls[f"{path.split('/src/')[-1].split('/site-packages/')[-1]}:{function}"] += ncalls
    return {"aten_ops_per_step": sum(ops.values()) / STEPS, "python_calls_per_step": sum(calls.values()) / STEPS,
            "ops": {k: v / STEPS for k, v in ops.items()}, "calls": {k: v / STEPS for k, v in calls.items()}}


def differences(now: dict, other: dict, least: float = 0.5) -> dict:
    """Per stepper, what `now` counts more (or less) than `other` per step, largest first."""
    out = {}
    for name in now:
        if name not in other:
            continue
        out[name] = {}
        for kind in ("ops", "calls"):
            keys = set(now[name][kind]) | set(other[name][kind])
            diff = {k: now[name][kind].get(k, 0) - other[name][kind].get(k, 0) for k in keys}
            out[name][kind] = dict(sorted(((k, round(v, 2)) for k, v in diff.items() if abs(v) >= least),
                                          key=lambda kv: -abs(kv[1])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to count")
    ap.add_argument("--against", type=Path, help="another result of this script: the differences per step")
    ap.add_argument("--out", default="benchmarks/results/step_ops.json")
    args = ap.parse_args()
    tree = args.tree.resolve()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"command": "python " + " ".join(sys.argv), "commit": commit, "model": "lenet300", "batch": 128,
              "steps_counted": STEPS, "steppers": {k: count(step) for k, step in steppers(tree, args.data).items()}}
    if args.against is not None:
        other = json.loads(args.against.read_text())
        result["against"] = {"file": str(args.against), "commit": other.get("commit"),
                             "more_per_step": differences(result["steppers"], other["steppers"])}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {m: v[m] for m in ("aten_ops_per_step", "python_calls_per_step")}
                      for k, v in result["steppers"].items()}))


if __name__ == "__main__":
    main()

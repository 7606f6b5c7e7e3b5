"""Where the joint form's step goes, timed: the step `mode: joint` trains under a size target with PCGrad every 10
steps (step_cost.py's `form_pcgrad_every10`, LeNet-300-100 at 100x, batch 128), its unmeasured steps and its
measured ones (every tenth: one backward per objective) apart, against a plain step timed in the same rounds; and
the largest quantized layer's quantizer forward against one multiply over the same weights.

    .venv/bin/python benchmarks/step_profile.py --data ../shared/datasets/mnist/mnist.npz \
        --out benchmarks/results/step_profile.json
    .venv/bin/python benchmarks/step_profile.py --data ../shared/datasets/mnist/mnist.npz --tree /path/to/old/checkout \
        --out benchmarks/results/step_profile_old.json

Why: step_cost.py reads a step's median, in which the measured steps (one in ten) hardly show; what they cost,
and what the quantizer costs beside the arithmetic it does, says where a step's time could still come from.
Process CPU time, medians over rounds; `--tree` takes the steppers and the package from another checkout
(step_ops.load_tree), so two commits are timed alike (one process each: compare their ratios to the plain step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_ops import load_tree

ROUNDS, WARMUP = 40, 30


def cpu_ms(fn, times: int = 1) -> float:
    """Process CPU time of `times` calls of fn, per call, in ms."""
    start = time.process_time()
    for _ in range(times):
        fn()
    return (time.process_time() - start) / times * 1000


def step_times(plain, joint, every: int = 10) -> dict:
    """Per round: `every` plain steps, then `every` joint steps, the first of them measured (the stepper starts on a
    step that is a multiple of `every`); medians of each kind. The plain steps are timed as a block like the joint
    ones: one plain step alone after ten joint ones started on caches the joint steps had filled, and read 3.45 ms
    against 2.8 in a block, which put this ratio at 1.65-1.78x where step_cost.py read 2.1-2.2x."""
    measured, unmeasured, plain_ms = [], [], []
    for _ in range(ROUNDS):
        plain_ms.append(cpu_ms(plain, every))
        measured.append(cpu_ms(joint))
        unmeasured.append(cpu_ms(joint, every - 1))
    med = {"plain": statistics.median(plain_ms), "unmeasured": statistics.median(unmeasured),
           "measured": statistics.median(measured)}
    mean_step = (med["measured"] + (every - 1) * med["unmeasured"]) / every
    return {"median_ms": med, "measured_extra_ms": med["measured"] - med["unmeasured"],
            "unmeasured_over_plain": med["unmeasured"] / med["plain"], "step_over_plain": mean_step / med["plain"]}


def quantizer_forward(model) -> dict:
    """The largest quantized layer's quantizer forward (its parametrized weight read) against one multiply over the
    same weights, per call."""
    import torch

    name, layer = max(((n, m) for n, m in model.named_modules() if hasattr(m, "parametrizations")),
                      key=lambda nm: nm[1].parametrizations.weight.original.numel())
    weights = layer.parametrizations.weight.original.detach()
    with torch.no_grad():
        quantizer = statistics.median(cpu_ms(lambda: layer.weight, 20) for _ in range(ROUNDS))
        multiply = statistics.median(cpu_ms(lambda: weights * 2.0, 20) for _ in range(ROUNDS))
    return {"layer": name, "weights": weights.numel(), "quantizer_forward_ms": quantizer, "multiply_ms": multiply}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to time")
    ap.add_argument("--out", default="benchmarks/results/step_profile.json")
    args = ap.parse_args()
    tree = args.tree.resolve()
    step_cost, teacher, split = load_tree(tree, args.data)
    plain = step_cost.plain_stepper(teacher, split)
    joint = step_cost.joint_stepper(teacher, split, "pcgrad",
                                    recipe=step_cost.joint_form_recipe(teacher, split, "pcgrad", 10, 100.0))
    for _ in range(WARMUP):
        plain()
    for _ in range(WARMUP // 10 * 10):  # whole rounds of ten: the next step measured (joint_stepper starts at 100)
        joint()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"command": "python " + " ".join(sys.argv), "commit": commit, "model": "lenet300", "batch": 128,
              "ratio": 100.0, "rounds": ROUNDS, "steps": step_times(plain, joint),
              "quantizer": quantizer_forward(joint.trainer.model)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "quantizer")}, indent=1))


if __name__ == "__main__":
    main()

"""What resolving PCGrad on the global batch costs under torchrun (2 processes, gloo, 1 thread each).

    .venv/bin/python benchmarks/torchrun_coordination_cost.py

A measured step of `pcgrad` (or `scale`) averages the ranks' per-term gradients and resolves them once
(coordination.py, `settle`), so every rank takes the global batch's update; before, each rank resolved its
own batch and the ranks averaged the results (one all-reduce of the gradient). This times a training step
of LeNet-300-100 on MNIST in the joint form at 100x (the user's-loop verbs, a global batch of 128) both
ways: `global` (the session as it is) and `per_rank` (the session's settle given no ranks to average
over, which is what a step did before). Every launch is a fresh `torch.distributed.run` of this file; the
two ways alternate over the rounds, with PCGrad every step and every 10 steps (`per_rank` builds every
coordinator without `mean_over_ranks`, so each rank's backward resolves its own batch, as before). Each launch times its
steps after a warm-up and reports rank 0's median. Writes benchmarks/results/torchrun_coordination_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(mode: str, every: int, steps: int, out: str) -> None:
    """One rank of one launch: the joint form's training steps, timed."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401  (before the group: docs/reliability.md, "Exit")
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "src"))
    import jointcompress
    from jointcompress.models import build_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = np.load(ROOT.parent / "shared" / "datasets" / "mnist" / "mnist.npz")
    x = torch.tensor(data["x_train"][:128 * 8], dtype=torch.float32).div(255).unsqueeze(1)
    y = torch.tensor(data["y_train"][:128 * 8], dtype=torch.long)
    torch.manual_seed(0)
    model = build_model("lenet300")
    recipe = {"mode": "joint", "target": {"ratio": 100}, "techniques": [{"type": "quant_lsq", "bits": 4}],
              "coordination": {"strategy": "pcgrad", "every": every}}
    if mode == "per_rank":  # every coordinator the session builds resolves its own rank's batch, as before
        from jointcompress.coordination import GradientCoordinator

        made = GradientCoordinator.__init__
        GradientCoordinator.__init__ = lambda self, *a, **kw: made(self, *a, **{**kw, "mean_over_ranks": None})
    session = jointcompress.prepare(model, recipe, total_steps=10 * steps, example_inputs=x[:2])
    optimizer = torch.optim.Adam(session.param_groups(lr=1e-3))
    session.bind(optimizer)
    times = []
    for step in range(steps):
        lo = (step % 8) * 128
        xb, yb = x[lo:lo + 128].chunk(world)[rank], y[lo:lo + 128].chunk(world)[rank]
        t0 = time.perf_counter()
        optimizer.zero_grad()
        session.backward(session.loss(model(xb), (xb, yb)))
        session.before_step()
        optimizer.step()
        session.after_step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        warm = times[steps // 5:]
        Path(out).write_text(json.dumps({"median_ms": 1000 * statistics.median(warm), "steps": len(warm)}))
    dist.destroy_process_group()


def launch(mode: str, every: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                        "--worker", mode, str(every), str(steps), out], env=env, check=True, capture_output=True)
        return json.loads(Path(out).read_text())["median_ms"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/torchrun_coordination_cost.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    ms: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for every in (1, 10):
            for mode in ("per_rank", "global"):
                ms.setdefault(f"{mode}_every{every}", []).append(launch(mode, every, args.steps))
        print(json.dumps(ms), flush=True)
    ratios = {f"every{e}": [g / p for g, p in zip(ms[f"global_every{e}"], ms[f"per_rank_every{e}"])] for e in (1, 10)}
    out = {"command": shlex.join(["python", "benchmarks/torchrun_coordination_cost.py", *sys.argv[1:]]),
           "setup": "torchrun 2 processes, gloo, 1 thread each, 2 cores; LeNet-300-100, joint form at 100x, "
                    "global batch 128, PCGrad", "median_step_ms": ms, "global_over_per_rank": ratios,
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

"""Latency targets, target vs measured: the allocator of `target: {latency_ms, batch}` for real.

    .venv/bin/python benchmarks/latency_target.py --model lenet5 [--fractions 0.75 0.5 0.25] [--threads 1]

For each batch (1 and 64) the dense model is timed in PyTorch fp32, and for each fraction the
target is that fraction of it. latency_targets.allocate_latency then measures the per-layer
table, allocates per-group widths, physically shrinks a copy, times it (deploy.timing, the
same thread count) and tightens the goal while it measures over. Written per run: target,
predicted and measured ms, every allocate -> time round, and the widths. Weights are random
(latency does not depend on them; the widths a trained model gets for the same target differ
only by which channels go, not how many). Writes benchmarks/results/latency_target_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jointcompress.latency_targets import allocate_latency, measure_table, timed_ms
from jointcompress.models import build_model
from jointcompress.recipe import Target
from jointcompress.targets import TargetError


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    example = torch.randn(2, 1, 28, 28)
    runs, t0 = [], time.perf_counter()
    for batch in (1, 64):
        dense = timed_ms(model, example, batch, args.threads)
        table = measure_table(model, example, batch, args.threads)
        for f in args.fractions:
            target = Target(latency_ms=dense * f, batch=batch)
            try:
                alloc = allocate_latency(model, example, target, table=table, threads=args.threads)
            except TargetError as err:  # below what removing channels can reach: say so
                runs.append({"batch": batch, "fraction": f, "dense_ms": dense, "target_ms": target.latency_ms,
                             "met": False, "error": str(err)})
                print(f"batch {batch}: target {target.latency_ms:.3f} ms: {err}")
                continue
            runs.append({"batch": batch, "fraction": f, "dense_ms": dense, "target_ms": target.latency_ms,
                         "predicted_ms": alloc.predicted_ms, "measured_ms": alloc.measured_ms,
                         "met": alloc.measured_ms is not None and alloc.measured_ms <= target.latency_ms,
                         "widths": alloc.widths, "rounds": alloc.rounds})
            print(f"batch {batch}: target {target.latency_ms:.3f} ms ({f:g} of dense {dense:.3f}) -> predicted "
                  f"{alloc.predicted_ms:.3f}, measured {alloc.measured_ms:.3f} ms after {len(alloc.rounds)} round(s); {alloc.widths}")
    out = Path(f"benchmarks/results/latency_target_{args.model}.json")
    out.write_text(json.dumps({
        "command": f"python benchmarks/latency_target.py --model {args.model} --fractions "
                   + " ".join(f"{f:g}" for f in args.fractions) + f" --threads {args.threads}",
        "threads": args.threads, "runtime": "torch fp32", "runs": runs, "wall_seconds": time.perf_counter() - t0,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Cost of one call of the zero-level quantizer's compiled kernels, called directly
(techniques/traced_kernel.py) and through torch.compile (TorchDynamo's guards and wrappers on
every call), on the weight shapes of a model's Linear layers; and the backward with a fixed
pattern (no dead-zone surrogate: no sigmoid per weight) beside the one with the surrogate.

    .venv/bin/python benchmarks/kernel_calls.py --model lenet300 --threads 1 \
        --out benchmarks/results/kernel_calls.json

Interleaved rounds, medians, microseconds per call; each contender also timed alone as a check.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from jointcompress.io import atomic_write_text
from jointcompress.models import build_model
from jointcompress.techniques import zero_level_compiled as zc


def kernel_args(shape: tuple[int, int], seed: int = 0):
    """Forward and backward arguments of a per-channel 4-bit quantizer on a weight of `shape`."""
    g = torch.Generator().manual_seed(seed)
    rows = shape[0]
    w = torch.randn(*shape, generator=g) * 0.05
    s, t, qmax = torch.full((rows, 1), 0.01), torch.full((rows, 1), 0.7), torch.tensor(7.0)
    grad, grad_count = torch.randn(*shape, generator=g), torch.tensor(1.0)
    aux = (torch.tensor(0.5), torch.tensor(4.0), torch.full((rows, 1), 0.01), torch.full((rows, 1), 0.01),
           torch.zeros(rows, 1))
    consts = torch.tensor([7.0, 6.0, 0.01])
    keep = (torch.rand(*shape, generator=g) > 0.5).float()
    return (w, s, t, qmax), (grad, grad_count, w, s, t, qmax), aux + (consts,), keep


def contenders(shape) -> dict:
    fwd_args, bwd_head, bwd_tail, keep = kernel_args(shape)
    direct, dynamo = zc._direct_kernels(), zc._kernels()
    return {
        "forward_direct": lambda: direct[0](*fwd_args, None),
        "forward_torch_compile": lambda: dynamo[0](*fwd_args, None),
        "backward_direct": lambda: direct[1](*bwd_head, None, *bwd_tail),
        "backward_torch_compile": lambda: dynamo[1](*bwd_head, None, *bwd_tail),
        "backward_fixed_pattern_direct": lambda: direct[1](*bwd_head, keep, *bwd_tail),
    }


def time_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(fns: dict, rounds: int, calls: int) -> dict:
    for fn in fns.values():  # compile (or read the disk cache) and warm up
        for _ in range(5):
            fn()
    interleaved = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            interleaved[k].append(time_us(fn, calls))
    alone = {k: statistics.median(time_us(fn, calls) for _ in range(rounds)) for k, fn in fns.items()}
    med = {k: statistics.median(v) for k, v in interleaved.items()}
    return {"us_per_call": med, "us_per_call_alone": alone,
            "alone_differs_over_20pct": [k for k in med if abs(alone[k] / med[k] - 1) > 0.2]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet300")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/kernel_calls.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model, 28, 10)
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    load_before = os.getloadavg()[0]
    per_layer = {f"{r}x{c}": measure(contenders((r, c)), args.rounds, args.calls) for r, c in shapes}
    result = {
        "command": f"python benchmarks/kernel_calls.py --model {args.model} --threads {args.threads} "
                   f"--rounds {args.rounds} --calls {args.calls} --out {args.out}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"{os.cpu_count()} cores, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after",
        "weight_shapes": per_layer,
    }
    print(json.dumps(result, indent=1))
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

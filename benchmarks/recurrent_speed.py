"""Training-step time of the converted recurrent module (recurrent.LinearRNN: a time loop in Python
over Linear layers) against torch's own fused nn.LSTM / nn.GRU, forward + backward, interleaved.

    PYTHONPATH=src .venv/bin/python benchmarks/recurrent_speed.py --out benchmarks/results/recurrent_speed.json

Same thread count for both (recorded), warm-up, interleaved rounds, medians; each contender also
timed alone as a check. No quantizer attached: this is the cost of the conversion itself (a quantized
recurrent weight is computed once per forward, like any other layer's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn as nn

from jointcompress.recurrent import LinearRNN


def step_fn(module: nn.Module, x: torch.Tensor):
    def step():
        out, _ = module(x)
        out[:, -1].sum().backward()
    return step


def timed(fn, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def measure(kind: type, features: int, hidden: int, batch: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    rnn = kind(features, hidden, batch_first=True)
    contenders = {"torch": step_fn(rnn, torch.randn(batch, steps, features)),
                  "converted": step_fn(LinearRNN.from_rnn(rnn), torch.randn(batch, steps, features))}
    for fn in contenders.values():  # warm-up
        timed(fn, 3)
    interleaved = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, fn in contenders.items():
            interleaved[k] += timed(fn, 1)
    alone = {k: statistics.median(timed(fn, rounds)) for k, fn in contenders.items()}
    med = {k: statistics.median(v) for k, v in interleaved.items()}
    return {"module": kind.__name__, "batch": batch, "steps": steps, "features": features, "hidden": hidden,
            "median_ms": med, "alone_median_ms": alone, "converted_over_torch": med["converted"] / med["torch"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/results/recurrent_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = [measure(kind, 28, 96, 128, steps, args.rounds) for kind in (nn.LSTM, nn.GRU) for steps in (28, 200)]
    result = {"command": f"python benchmarks/recurrent_speed.py --threads {args.threads} --rounds {args.rounds} --out {args.out}",
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"load average {load:.1f} before / {os.getloadavg()[0]:.1f} after",
              "rows": rows}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Would torch.compile pay for the fake-quant cost of a joint step? Mask + LSQ forward and
backward on LeNet-300-100's first layer (300 x 784), eager vs torch.compile, 1 thread.

    .venv/bin/python benchmarks/lsq_compile.py

Writes benchmarks/results/lsq_compile.json: median ms per forward+backward for both, and the
seconds the first compiled call took (tracing + C++ code generation, with an empty compile
cache, as on a user's first run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # cold: no code compiled by an earlier run

import torch  # noqa: E402

from jointcompress.techniques.quant_lsq import LSQFunction  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()  # --help, not a run
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.randn(300, 784, requires_grad=True)
    log_step = torch.full((300, 1), -3.0, requires_grad=True)
    mask = (torch.rand(300, 784) > 0.5).float()

    def step(w, log_step, mask):
        return LSQFunction.apply(w * mask, log_step, 7, 1.0 / math.sqrt(784 * 7))

    def median_ms(fn, rounds: int = 30, n: int = 20) -> float:
        for _ in range(10):
            fn(w, log_step, mask).sum().backward()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n):
                fn(w, log_step, mask).sum().backward()
            times.append((time.perf_counter() - t) / n * 1e3)
        return statistics.median(times)

    eager = median_ms(step)
    compiled = torch.compile(step)
    t0 = time.perf_counter()
    compiled(w, log_step, mask).sum().backward()
    compile_s = time.perf_counter() - t0
    fast = median_ms(compiled)
    result = {"command": "python benchmarks/lsq_compile.py",
              "machine": f"{platform.machine()}, 1 thread, torch {torch.__version__}",
              "eager_ms": eager, "compiled_ms": fast, "speedup": eager / fast, "first_call_seconds": compile_s}
    print(json.dumps(result, indent=1))
    (Path(__file__).parent / "results" / "lsq_compile.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where ONNX Runtime's time goes at batch 1 for a small CNN: per-call overhead vs compute.

    .venv/bin/python benchmarks/against_ort_overhead.py [--threads 1] [--rounds 200]

For LeNet-5 at a few widths (random weights: latency does not depend on them) every way of
calling the same ONNX file is timed with deploy.timing (same threads, ORT intra-op threads,
spinning off, interleaved rounds, medians, each also alone), at batch 1 and 64:

- `run`: session.run with a numpy input dict (deploy.onnx_export.ort_predict);
- `bound`: IOBinding with the input and output buffers bound once (bound_predict), what every
  ONNX Runtime contender of benchmarks/against_torch_pruning.py uses;
- `bound_extended`: the same with graph optimizations at "extended" instead of ORT's default
  "all" (which adds the NCHWc convolution layout);
- `floor`: a graph that only reshapes and slices its input, bound: ORT's per-call floor;
- `torch`: the same model in PyTorch eager fp32.

Writes benchmarks/results/against_ort_overhead.json (with this command).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from jointcompress.deploy.onnx_export import bound_predict, export_onnx, ort_predict
from jointcompress.deploy.timing import ort_session, ort_session_options, time_contenders
from jointcompress.io import atomic_write_text
from jointcompress.latency_targets import shrunk_to
from jointcompress.models import build_model

WIDTHS = [{"conv1": 20, "conv2": 50, "fc1": 500}, {"conv1": 8, "conv2": 16, "fc1": 500},
          {"conv1": 8, "conv2": 8, "fc1": 32}]


class Floor(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * 1.0


def extended_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort_session_options(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def contenders(widths: dict, work: Path, threads: int) -> dict:
    dense = build_model("lenet5").eval()
    example = torch.randn(2, 1, 28, 28)
    model = shrunk_to(dense, example, widths)
    path = export_onnx(model, work / "m.onnx", example)
    floor = export_onnx(Floor(), work / "floor.onnx", example)
    return {"torch": model, "run": ort_predict(ort_session(path, threads)), "bound": bound_predict(ort_session(path, threads)),
            "bound_extended": bound_predict(extended_session(path, threads)),
            "floor": bound_predict(ort_session(floor, threads))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--shared-machine", default="not stated (pass --shared-machine)")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="ort-overhead-"))
    rows = []
    for widths in WIDTHS:
        fns = contenders(widths, work, args.threads)
        row = {"widths": widths}
        for bs in (1, 64):
            x = torch.randn(bs, 1, 28, 28)
            t = time_contenders({k: (lambda f=f: f(x)) for k, f in fns.items()}, threads=args.threads,
                                rounds=args.rounds if bs == 1 else max(10, args.rounds // 10))
            row[f"batch{bs}"] = {"interleaved_us": {k: 1e3 * v for k, v in t.interleaved_ms.items()},
                                 "alone_us": {k: 1e3 * v for k, v in t.alone_ms.items()}, "flagged": t.flagged}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"command": f"python benchmarks/against_ort_overhead.py --threads {args.threads} --rounds {args.rounds}",
              "threads": args.threads, "machine": {"shared": args.shared_machine, "cpus": os.cpu_count()},
              "onnxruntime": __import__("onnxruntime").__version__, "rows": rows}
    atomic_write_text(Path("benchmarks/results/against_ort_overhead.json"), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

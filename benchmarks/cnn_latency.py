"""Re-time the models cnn_deploy.py built, with more back ends and a fixed thread count.

    .venv/bin/python benchmarks/cnn_latency.py --workdir /tmp/cnn-deploy-XXXX [--model lenet5] [--threads 1]

cnn_deploy.py compares against eager PyTorch fp32, whose convolutions are slow on this
machine, so the int8 speed-up it reports is partly ONNX Runtime's. This adds ONNX Runtime
fp32 for the dense and the pruned model, so each factor can be read separately:
pruning (dense -> pruned, same runtime), int8 (fp32 -> int8, same runtime) and runtime.
The dense model's weights are random here (its latency does not depend on their values; its
accuracy is in cnn_deploy's results); the pruned model is the saved artifact.
Batch 64, interleaved rounds, medians.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from jointcompress.artifact.store import load
from jointcompress.bench import batch_of, interleaved_latency
from jointcompress.deploy.onnx_export import export_onnx, ort_predict
from jointcompress.models import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    torch.manual_seed(0)
    dense = build_model(args.model).eval()
    pruned = load(work / "artifact", lambda: build_model(args.model)).eval()
    x = batch_of(torch.randn(64, 1, 28, 28), 64)
    dense_onnx = export_onnx(dense, work / "dense_fp32.onnx", x)

    def session(path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        return ort_predict(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))

    fns = {
        "dense_fp32_torch": lambda: dense(x),
        "dense_fp32_ort": (lambda f: lambda: f(x))(session(dense_onnx)),
        "pruned_fp32_torch": lambda: pruned(x),
        "pruned_fp32_ort": (lambda f: lambda: f(x))(session(work / "model_fp32.onnx")),
        "pruned_int8_ort": (lambda f: lambda: f(x))(session(work / "model_int8.onnx")),
    }
    lat = interleaved_latency(fns, runs=args.runs)
    result = {
        "command": f"python benchmarks/cnn_latency.py --workdir <cnn_deploy workdir> --model {args.model} --threads {args.threads}",
        "threads": args.threads,
        "batch": 64,
        "latency_ms": lat,
        "speedup_vs_dense_fp32_torch": {k: lat["dense_fp32_torch"] / v for k, v in lat.items()},
        "speedup_vs_dense_fp32_ort": {k: lat["dense_fp32_ort"] / v for k, v in lat.items()},
    }
    out = Path(args.out or f"benchmarks/results/cnn_latency_{args.model}_t{args.threads}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

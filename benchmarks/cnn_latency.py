"""Time the CNN that cnn_deploy.py compressed, in every back end, the honest way (deploy.timing).

    .venv/bin/python benchmarks/cnn_latency.py --channels-from benchmarks/results/cnn_deploy_lenet5.json [--threads 1]
    .venv/bin/python benchmarks/cnn_latency.py --workdir /tmp/cnn-deploy-XXXX [--model lenet5] [--threads 1]

Contenders: dense fp32 (PyTorch, ONNX Runtime), pruned fp32 (PyTorch, ONNX Runtime) and pruned
int8 (ONNX Runtime QDQ), at batch 1 and 64. Every contender runs with --threads threads
(torch.set_num_threads; ORT sessions with that many intra-op threads, one inter-op thread,
spinning off), warm-up, interleaved rounds, medians, each also timed alone (a contender whose
two medians differ by more than 20% is listed under "flagged").

Latency does not depend on the weights' values, so the dense model has random weights and,
with --channels-from, the pruned model is the same architecture cut to the channel counts the
trained run kept (its accuracy is in cnn_deploy's results); with --workdir the saved artifact
and its ONNX files are used.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from jointcompress.bench import batch_of
from jointcompress.deploy.int8 import quantize_int8
from jointcompress.deploy.onnx_export import export_onnx, ort_predict, ort_session
from jointcompress.deploy.timing import time_contenders
from jointcompress.latency_targets import shrunk_to
from jointcompress.models import build_model


def pruned_models(args, dense, example, work: Path):
    """(pruned torch model, its fp32 ONNX path, its int8 ONNX path)."""
    if args.workdir:
        from jointcompress.artifact.store import load

        work = Path(args.workdir)
        return load(work / "artifact", lambda: build_model(args.model)).eval(), work / "model_fp32.onnx", work / "model_int8.onnx"
    widths = {k: v for k, v in json.loads(Path(args.channels_from).read_text())["channels"].items()}
    pruned = shrunk_to(dense, example, widths)
    int8 = quantize_int8(pruned, None, torch.randn(256, 1, 28, 28), example, workdir=work, threads=args.threads)
    return pruned, work / "model_fp32.onnx", Path(int8.path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--channels-from", default=None)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not (args.workdir or args.channels_from):
        ap.error("give --workdir (a cnn_deploy.py work directory) or --channels-from (its results JSON)")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="cnn-latency-"))
    example = torch.randn(2, 1, 28, 28)
    dense = build_model(args.model).eval()
    pruned, fp32_onnx, int8_onnx = pruned_models(args, dense, example, work)
    dense_onnx = export_onnx(dense, work / "dense_fp32.onnx", example)
    runners = {
        "dense_fp32_torch": dense,
        "dense_fp32_ort": ort_predict(ort_session(dense_onnx, args.threads)),
        "pruned_fp32_torch": pruned,
        "pruned_fp32_ort": ort_predict(ort_session(fp32_onnx, args.threads)),
        "pruned_int8_ort": ort_predict(ort_session(int8_onnx, args.threads)),
    }
    result = {"command": "python benchmarks/cnn_latency.py "
              + (f"--channels-from {args.channels_from}" if args.channels_from else "--workdir <cnn_deploy workdir>")
              + f" --model {args.model} --threads {args.threads} --runs {args.runs}",
              "threads": args.threads, "weights": "random dense; pruned = " + ("saved artifact" if args.workdir else
                                                                              f"channels of {args.channels_from}"),
              "channels": {n: (m.out_channels if hasattr(m, "out_channels") else m.out_features)
                           for n, m in pruned.named_modules() if hasattr(m, "weight") and getattr(m, "weight", None) is not None and m.weight.dim() > 1}}
    for bs in (1, 64):
        x = batch_of(torch.randn(64, 1, 28, 28), bs)
        t = time_contenders({k: (lambda f=f: f(x)) for k, f in runners.items()}, threads=args.threads, rounds=args.runs)
        result[f"batch{bs}"] = {"latency_ms": t.interleaved_ms, "alone_ms": t.alone_ms, "flagged": t.flagged,
                                "speedup_vs_dense_fp32_torch": t.speedup("dense_fp32_torch"),
                                "speedup_vs_dense_fp32_ort": t.speedup("dense_fp32_ort"), "method": t.method}
    out = Path(args.out or f"benchmarks/results/cnn_latency_{args.model}_t{args.threads}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""int8 speed: a CNN with 50% of channels physically removed and int8 weights vs the dense fp32 model.

    .venv/bin/python benchmarks/int8_speed.py [--model resnet|lenet5] [--runs 30] [--weights random]

Batch 64, CPU, --threads threads for every variant (ORT: intra-op threads, one inter-op
thread, spinning off; torch.set_num_threads), timed by deploy.timing: warm-up, interleaved
rounds, medians, each variant also timed alone (over 20% apart: "flagged"). Writes
benchmarks/results/int8_speed.json. Without trained weights the model gets random weights put
on an 8-bit per-channel grid (speed does not depend on the values; accuracy is not measured).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from jointcompress.bench import count_macs
from jointcompress.deploy.timing import time_contenders
from jointcompress.deploy.int8 import quantize_int8
from jointcompress.deploy.onnx_export import export_onnx, ort_predict, ort_session
from jointcompress.graph import PRUNABLE_ROOTS, build_graph, discover_groups
from jointcompress.models import build_model
from jointcompress.spec import CompressionSpec, LayerSpec

RESULT = Path(__file__).parent / "results" / "int8_speed.json"


def prune_half(model: nn.Module, example: torch.Tensor) -> list:
    """Physically remove every second channel of each prunable group (Torch-Pruning)."""
    import torch_pruning as tp

    groups, _ = discover_groups(model, example)
    modules = dict(model.named_modules())
    dg = build_graph(model, example)
    for g in groups:
        root = modules[g.name]
        conv = isinstance(root, nn.Conv2d)
        n = root.out_channels if conv else root.out_features
        fn = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
        dg.get_pruning_group(root, fn, list(range(0, n, 2))).prune()
    return dg.pruning_history()


def to_grid(model: nn.Module, bits: int = 8) -> dict[str, LayerSpec]:
    """Put every weight on a symmetric per-channel grid, as finalize() leaves it."""
    layers, qmax = {}, 2 ** (bits - 1) - 1
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE_ROOTS):
            w = m.weight.data
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-8) / qmax
            s = scale.view(-1, *([1] * (w.dim() - 1)))
            m.weight.data = torch.round(w / s).clamp(-qmax, qmax) * s
            layers[name] = LayerSpec(bits, scale)
    return layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    example = torch.randn(2, 1, 28, 28)
    x = torch.randn(args.batch, 1, 28, 28)
    dense = build_model(args.model).eval()
    small = build_model(args.model).eval()
    small.load_state_dict(dense.state_dict())
    history = prune_half(small, example)
    spec = CompressionSpec(to_grid(small), history)
    work = Path(tempfile.mkdtemp(prefix="int8_speed-"))
    calib = torch.randn(128, 1, 28, 28)
    variants = {
        "torch fp32 dense (baseline)": dense,
        "onnxruntime fp32 dense": ort_predict(ort_session(export_onnx(dense, work / "dense.onnx", example), args.threads)),
        "torch fp32 pruned": small,
        "onnxruntime fp32 pruned": ort_predict(ort_session(export_onnx(small, work / "small.onnx", example), args.threads)),
        "onnxruntime int8 pruned (default)": quantize_int8(small, spec, calib, example, "onnxruntime", work, threads=args.threads),
    }
    for engine in ("x86", "qnnpack"):
        try:
            variants[f"torch int8 pruned ({engine})"] = quantize_int8(small, spec, calib, example, f"torch-{engine}")
        except Exception as exc:  # engine missing on this build
            print(f"skip torch-{engine}: {exc}", file=sys.stderr)
    with torch.inference_mode():
        ref = small(x)
        diffs = {k: float((fn(x) - ref).abs().max()) for k, fn in variants.items() if "pruned" in k}
    timing = time_contenders({k: (lambda fn=fn: fn(x)) for k, fn in variants.items()}, threads=args.threads, rounds=args.runs)
    ms = timing.interleaved_ms
    base = ms["torch fp32 dense (baseline)"]
    ort_base = ms["onnxruntime fp32 dense"]
    result = {
        "command": f".venv/bin/python benchmarks/int8_speed.py --model {args.model} --runs {args.runs} --batch {args.batch} --threads {args.threads}",
        "weights": "random (on an 8-bit per-channel grid); rerun with trained weights for accuracy",
        "model": args.model, "batch": args.batch, "runs": args.runs, "statistic": "median ms, interleaved (deploy.timing)",
        "threads": args.threads, "alone_ms": timing.alone_ms, "flagged": timing.flagged, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "macs_per_sample": {"dense": count_macs(dense, x), "pruned": count_macs(small, x)},
        "params": {"dense": sum(p.numel() for p in dense.parameters()), "pruned": sum(p.numel() for p in small.parameters())},
        "latency_ms": ms,
        "speedup_vs_torch_fp32_dense": {k: base / v for k, v in ms.items()},
        "speedup_vs_onnxruntime_fp32_dense": {k: ort_base / v for k, v in ms.items()},
        "max_abs_logit_diff_vs_torch_fp32_pruned": diffs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, ms))
    for k, v in ms.items():
        print(f"{k:{width}s} {v:8.2f} ms   x{base / v:5.2f} vs torch dense   x{ort_base / v:5.2f} vs ORT dense")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""A trained CNN with 50% of its channels removed and int8 weights vs the dense fp32 model.

    .venv/bin/python benchmarks/cnn_deploy.py --data ../shared/datasets/mnist/mnist.npz [--model lenet5]

Trains the dense model, compresses it jointly (structured pruning to 50% of channels + LSQ
8-bit weights, distilled from the dense model), finalizes it (channels physically removed),
saves the artifact, builds the int8 ONNX Runtime model with the trained scales, and times
dense fp32 (PyTorch), compressed fp32 (PyTorch) and compressed int8 (ONNX Runtime) at batch
64 with --threads threads for all (deploy.timing: ORT spinning off, interleaved rounds,
medians, each also timed alone). Accuracy of each on the 10,000 test images. Writes
benchmarks/results/cnn_deploy_<model>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from jointcompress import compress, finalize
from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.artifact.store import save
from jointcompress.bench import batch_of, count_macs
from jointcompress.deploy.timing import time_contenders
from jointcompress.data import accuracy, evaluator, load_mnist
from jointcompress.deploy.int8 import int8_parity, quantize_int8
from jointcompress.pipeline import builder_for, train_teacher


def recipe(epochs: int) -> dict:
    return {
        "mode": "joint",
        "training": {"epochs": epochs, "lr": 1e-3, "batch_size": 128},
        "coordination": {"strategy": "none", "every": 50},
        "techniques": [
            {"type": "prune_structured", "sparsity": 0.5, "criterion": "magnitude", "end": 0.5},
            {"type": "quant_lsq", "bits": 8, "start": 0.3},
            {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True},
        ],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    split = load_mnist(args.data)
    teacher = train_teacher(args.model, split, args.teacher_epochs, lr=1e-3, batch_size=128)
    model = copy.deepcopy(teacher)
    evaluate = evaluator(split.x_test, split.y_test)
    res = compress(model, recipe(args.epochs), (split.x_train, split.y_train), evaluate, teacher=teacher)
    spec = finalize(model, res.example_inputs)
    work = Path(tempfile.mkdtemp(prefix="cnn-deploy-"))
    manifest = save(model, spec, work / "artifact", builder=builder_for(args.model, split), example_inputs=res.example_inputs)
    x = batch_of(split.x_test, 64)
    int8 = quantize_int8(model, spec, (split.x_train[:2048], split.y_train[:2048]), x, workdir=work, threads=args.threads)
    parity = int8_parity(model, int8, (split.x_test, split.y_test))
    teacher.eval(), model.eval()
    timing = time_contenders({"dense_fp32_torch": lambda: teacher(x), "pruned_fp32_torch": lambda: model(x),
                              "pruned_int8_ort": lambda: int8(x)}, threads=args.threads, rounds=args.runs)
    lat = timing.interleaved_ms
    result = {
        "command": f"python benchmarks/cnn_deploy.py --data {args.data} --model {args.model} --teacher-epochs {args.teacher_epochs} --epochs {args.epochs} --threads {args.threads}",
        "threads": args.threads, "alone_ms": timing.alone_ms, "flagged": timing.flagged,
        "batch": 64,
        "latency_ms": lat,
        "speedup_vs_dense_fp32": {k: lat["dense_fp32_torch"] / v for k, v in lat.items()},
        "accuracy": {"dense_fp32": accuracy(teacher, split.x_test, split.y_test), "pruned_fp32": accuracy(model, split.x_test, split.y_test), "pruned_int8": parity.metric_deployed},
        "int8_max_abs_logit_diff": parity.max_abs_logit_diff,
        "macs": {"dense": count_macs(teacher, x), "pruned": count_macs(model, x)},
        "bytes": {"dense_fp32": dense_fp32_bytes(teacher), "artifact_weights": manifest["bytes"]["total"]},
        "channels": {n: (m.out_channels if hasattr(m, "out_channels") else m.out_features) for n, m in model.named_modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() > 1},
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out or f"benchmarks/results/cnn_deploy_{args.model}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

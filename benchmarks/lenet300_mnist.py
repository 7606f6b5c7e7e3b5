"""LeNet-300-100 on MNIST: joint vs sequential at 90% and 95% sparsity with 4-bit weights,
same epochs, same teacher; test accuracy (10,000 held-out images) and artifact bytes.

    .venv/bin/python benchmarks/lenet300_mnist.py --data ../shared/datasets/mnist/mnist.npz

Writes benchmarks/results/lenet300_mnist.json and prints a table. The teacher is trained once
and saved (safetensors) under runs/ so reruns can skip it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.data import load_mnist
from jointcompress.pipeline import builder_for, compress_and_save, load_weights, train_teacher, uncompressed_row
from jointcompress.models import build_model
from jointcompress.recipe import builtin_recipe, load_recipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None, help="compression epochs (default: the recipe's)")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--out", default="benchmarks/results/lenet300_mnist.json")
    ap.add_argument("--work", default="runs/bench_lenet300")
    args = ap.parse_args()
    split = load_mnist(args.data)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tpath = work / f"teacher_e{args.teacher_epochs}.safetensors"
    t0 = time.perf_counter()
    if tpath.exists():
        teacher = load_weights(build_model("lenet300"), tpath)
    else:
        teacher = train_teacher("lenet300", split, args.teacher_epochs, lr=1e-3, batch_size=128)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tpath))
    base = uncompressed_row(teacher, split)
    rows = {"uncompressed": base}
    recipe0 = load_recipe(builtin_recipe("lenet300_mnist"))
    if args.epochs:
        recipe0.training.epochs = args.epochs
    for sp in [float(s) for s in args.sparsities.split(",")]:
        for mode in ("sequential", "joint"):
            r = recipe0.model_copy(deep=True, update={"mode": mode})
            r.techniques[0].sparsity = sp
            name = f"{mode}-{int(sp * 100)}"
            out = compress_and_save(name, teacher, r, split, builder_for("lenet300", split), work)
            row = out.row
            row["ratio"] = base["bytes"] / row["bytes"]
            row["error"] = 1 - row["accuracy"]
            rows[name] = row
            print(f"{name}: acc {row['accuracy']:.4f} bytes {row['bytes']} ({row['ratio']:.1f}x) {row['wall_s']:.0f}s", flush=True)
    result = {
        "command": f"python benchmarks/lenet300_mnist.py --data {args.data} --teacher-epochs {args.teacher_epochs}"
        + (f" --epochs {args.epochs}" if args.epochs else ""),
        "recipe": recipe0.model_dump(),
        "fp32_bytes": dense_fp32_bytes(teacher),
        "rows": rows,
        "wall_seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: {kk: v.get(kk) for kk in ("accuracy", "bytes", "ratio")} for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()

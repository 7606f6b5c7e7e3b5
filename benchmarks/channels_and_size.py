"""Channels and a size target: in one joint run, in two runs, and the size target alone.

    .venv/bin/python benchmarks/channels_and_size.py --data ../shared/datasets/mnist/mnist.npz \
        --model lenet5 --ratio 100 --channels 0.5 --epochs 2 --teacher-epochs 4 --seeds 0,1,2 \
        --out benchmarks/results/channels_and_size_lenet5_100x.json

Per seed, one teacher, then three compressions of it with the same total epochs, distillation and
target bytes (the teacher's fp32 weights / ratio):
- `one_run`: `mode: joint` with `prune_structured` (`--channels` of every group's channels) beside the
  size target: the size budget measures the file with the masked channels removed and lands the rest;
- `two_runs`: `prune_structured` alone for half the epochs, finalized (the channels removed), then the
  joint form on the smaller model with the same target bytes for the other half;
- `size_only`: the joint form without channel pruning (what a size target alone gives: the same bytes,
  every channel kept).
Each finalized model is saved (the weights file's bytes are what is reported), evaluated on the test
set and timed in PyTorch fp32 (batch `--batch`, `--threads` threads, interleaved with the dense
teacher: deploy/timing.time_contenders). Differences are paired by seed (mean +- standard error).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from compare_mnist import balanced_subset, recipe as compare_recipe
from jointcompress.api import compress
from jointcompress.artifact.size import dense_fp32_bytes
from jointcompress.artifact.store import save
from jointcompress.data import evaluator, load_dataset
from jointcompress.deploy.timing import time_contenders
from jointcompress.finalize import finalize
from jointcompress.models import build_model
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import parse_recipe

VARIANTS = ("one_run", "two_runs", "size_only")


def joint_recipe(model: str, epochs: int, target: dict, channels: float | None) -> dict:
    """compare_mnist's prune + 4-bit + KD recipe in mode joint under `target`, with prune_structured
    (the learned criterion, its default) over the same ramp as the unstructured masks where `channels`."""
    data = compare_recipe(model, epochs).model_dump()
    data["target"] = target
    if channels:
        data["techniques"].insert(0, {"type": "prune_structured", "sparsity": channels, "end": 0.6})
    return data


def channels_recipe(model: str, epochs: int, channels: float) -> dict:
    """The two runs' first: prune_structured with distillation only."""
    return {"name": f"{model}-channels", "model": model, "training": {"epochs": epochs, "lr": 1e-3, "batch_size": 128},
            "techniques": [{"type": "prune_structured", "sparsity": channels, "end": 0.6},
                           {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7, "cache_teacher": True}]}


def run(model: torch.nn.Module, recipe: dict, split, teacher, seed: int):
    """compress + finalize `model` in place with `recipe` (seeded): (the spec, the example inputs)."""
    torch.manual_seed(seed)
    recipe = parse_recipe({**recipe, "training": {**recipe["training"], "seed": seed}}, source="channels_and_size")
    result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    return finalize(model, result.example_inputs), result.example_inputs


def measured(model, spec, example_inputs, split, builder, tmp: Path, name: str) -> dict:
    """The saved weights file's bytes (rebuilt from the dense builder at save), test error, layer widths."""
    save(model, spec, tmp / name, example_inputs=example_inputs, builder=builder)
    acc = evaluator(split.x_test, split.y_test)(model.eval())["accuracy"]
    widths = {n: int(m.weight.shape[0]) for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    return {"error": round(100 * (1 - acc), 3), "file_bytes": (tmp / name / "weights.jcw").stat().st_size, "widths": widths}


def one_seed(args, split, seed: int, tmp: Path) -> dict:
    builder = lambda: build_model(args.model, split.image_size, split.num_classes)  # noqa: E731
    teacher = train_teacher(args.model, split, args.teacher_epochs, seed=seed).eval()
    goal = dense_fp32_bytes(teacher) / args.ratio
    models, rows = {}, {}
    for name in VARIANTS:
        model = copy.deepcopy(teacher).train()
        if name == "two_runs":
            half = max(1, args.epochs // 2)
            run(model, channels_recipe(args.model, half, args.channels), split, teacher, seed)
            spec, example = run(model.train(), joint_recipe(args.model, args.epochs - half, {"size_kb": goal / 1024}, None),
                                split, teacher, seed)
        else:
            spec, example = run(model, joint_recipe(args.model, args.epochs, {"ratio": args.ratio},
                                                    args.channels if name == "one_run" else None), split, teacher, seed)
        rows[name] = measured(model, spec, example, split, builder, tmp / str(seed), name)
        models[name] = model.eval()
    x = split.x_test[: args.batch]
    timing = time_contenders({"teacher": lambda: teacher(x), **{k: (lambda m=m: m(x)) for k, m in models.items()}},
                             threads=args.threads, rounds=args.rounds)
    for name in VARIANTS:
        rows[name]["ms"] = round(timing.interleaved_ms[name], 4)
        rows[name]["speedup_vs_teacher"] = round(timing.interleaved_ms["teacher"] / timing.interleaved_ms[name], 3)
    teacher_err = round(100 * (1 - evaluator(split.x_test, split.y_test)(teacher)["accuracy"]), 3)
    return {"seed": seed, "target_bytes": round(goal), "teacher_error": teacher_err, "teacher_ms": timing.interleaved_ms["teacher"],
            "flagged": timing.flagged, "variants": rows}


def paired(per_seed: list[dict], a: str, b: str, key: str) -> dict:
    d = [s["variants"][a][key] - s["variants"][b][key] for s in per_seed]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"mean": round(statistics.mean(d), 4), "standard_error": round(se, 4), "per_seed": d}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--ratio", type=float, default=100.0)
    ap.add_argument("--channels", type=float, default=0.5, help="prune_structured.sparsity of the channel runs")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-images", type=int, default=None, help="a balanced subset of the training set (scarce data)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/channels_and_size.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = load_dataset(args.data)
    if args.train_images:
        split = balanced_subset(split, args.train_images)
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [one_seed(args, split, int(s), Path(tmp)) for s in args.seeds.split(",")]
    summary = {v: {k: round(statistics.mean(s["variants"][v][k] for s in per_seed), 4)
                   for k in ("error", "file_bytes", "ms", "speedup_vs_teacher")} for v in VARIANTS}
    result = {
        "command": f"python benchmarks/channels_and_size.py --data {args.data} --model {args.model} --ratio {args.ratio:g} "
                   f"--channels {args.channels:g} --epochs {args.epochs} --teacher-epochs {args.teacher_epochs} "
                   f"--seeds {args.seeds}{f' --train-images {args.train_images}' if args.train_images else ''} --batch {args.batch} --threads {args.threads} --rounds {args.rounds} --out {args.out}",
        "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}",
        "timing": "PyTorch fp32 (the finalized models), batch as given; deploy.timing.time_contenders (interleaved, medians)",
        "summary": summary,
        "paired": {f"{a}-{b}": {k: paired(per_seed, a, b, k) for k in ("error", "file_bytes", "speedup_vs_teacher")}
                   for a, b in (("one_run", "two_runs"), ("one_run", "size_only"))},
        "per_seed": per_seed,
    }
    print(json.dumps({k: result[k] for k in ("summary", "paired")}, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

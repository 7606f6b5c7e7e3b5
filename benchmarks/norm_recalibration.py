"""What re-estimating BatchNorm's statistics before each evaluation (training.recalibrate_norms) changes.

    .venv/bin/python benchmarks/norm_recalibration.py --seeds 3 --epochs 15

A depthwise-separable CNN with BatchNorm (the shape of a MobileNet block, 13k weights) is trained on
the embedded digits (no download), then compressed to 10x its fp32 bytes (4-bit LSQ, magnitude
masks, distillation) in sequential and joint mode, each with `recalibrate_norms: 0` (the running
averages training left) and 16. The weights trained are the same either way (the statistics pass puts
the RNG states back); only the statistics evaluated, kept and stored differ. Each run's artifact is
saved, loaded and evaluated on the held-out digits. One thread. Writes
benchmarks/results/norm_recalibration.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from jointcompress.api import compress, seed_everything, train_baseline
from jointcompress.artifact.store import load, save
from jointcompress.data import evaluator, load_digits


class DepthwiseSeparable(nn.Module):
    """Three depthwise 3x3 + pointwise 1x1 pairs, each followed by BatchNorm and ReLU."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 1
        for cout in (32, 64, 128):
            layers += [nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                       nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def recipe(mode: str, recalibrate: int, epochs: int, seed: int) -> dict:
    return {"mode": mode, "target": {"ratio": 10},
            "techniques": [{"type": "prune_unstructured", "scope": "global", "end": 0.6},
                           {"type": "quant_lsq", "bits": 4, "start": 0.3},
                           {"type": "distill_kd", "temperature": 4, "alpha": 0.7}],
            "training": {"epochs": epochs, "lr": 1e-3, "batch_size": 64, "seed": seed, "recalibrate_norms": recalibrate}}


def run(teacher, digits, mode: str, recalibrate: int, epochs: int, seed: int) -> dict:
    student = copy.deepcopy(teacher)
    seed_everything(seed)
    t0 = time.perf_counter()
    result = compress(student, recipe(mode, recalibrate, epochs, seed), (digits.x_train, digits.y_train),
                      evaluator(digits.x_test, digits.y_test), teacher=teacher)
    history = result.history
    spec = result.finalize()
    with tempfile.TemporaryDirectory() as tmp:
        save(student, spec, tmp, example_inputs=result.example_inputs)
        loaded = load(tmp, DepthwiseSeparable)
        file_bytes = (Path(tmp) / "weights.jcw").stat().st_size
    accuracy = evaluator(digits.x_test, digits.y_test)(loaded.eval())["accuracy"]
    return {"mode": mode, "recalibrate_norms": recalibrate, "seed": seed, "accuracy": round(accuracy, 4),
            "file_bytes": file_bytes, "kept_epoch": history.best_epoch,
            "epochs": [round(e["metrics"]["accuracy"], 4) for e in history.epochs],
            "weights_sum": float(sum(p.detach().double().abs().sum() for p in loaded.parameters())),
            "wall_s": round(time.perf_counter() - t0, 1)}


def paired(runs: list[dict], mode: str) -> dict:
    """recalibrate_norms 16 minus 0, paired by seed: mean and standard error of the accuracy difference."""
    by = {(r["recalibrate_norms"], r["seed"]): r["accuracy"] for r in runs if r["mode"] == mode}
    diffs = [by[(16, s)] - by[(0, s)] for (k, s) in by if k == 0 and (16, s) in by]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mode": mode, "n": len(diffs), "mean": statistics.mean(diffs), "se": se, "per_seed": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/norm_recalibration.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    torch.manual_seed(0)
    teacher = DepthwiseSeparable()
    seed_everything(0)
    train_baseline(teacher, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test),
                   epochs=args.teacher_epochs, lr=3e-3)
    teacher_accuracy = evaluator(digits.x_test, digits.y_test)(teacher.eval())["accuracy"]
    runs = []
    for seed in range(args.seeds):
        for mode in ("sequential", "joint"):
            for recalibrate in (0, 16):
                runs.append(run(teacher, digits, mode, recalibrate, args.epochs, seed))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "epochs"}), flush=True)
    out = {"command": " ".join([".venv/bin/python"] + sys.argv), "model": "depthwise-separable CNN with BatchNorm",
           "data": "embedded digits", "threads": 1, "teacher_accuracy": round(teacher_accuracy, 4),
           "runs": runs, "paired": [paired(runs, "sequential"), paired(runs, "joint")]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for p in out["paired"]:
        print(f"{p['mode']}: recalibrated - not: {p['mean']:+.4f} +- {p['se'] or 0:.4f} (n={p['n']})")


if __name__ == "__main__":
    main()

"""How close a size target lands, with and without steering, and why steering is needed.

    .venv/bin/python benchmarks/size_targets.py --data digits --ratios 10,30 --epochs 6 --teacher-epochs 3
    .venv/bin/python benchmarks/size_targets.py --data ../shared/datasets/mnist/mnist.npz --ratios 60 --epochs 4 --teacher-epochs 6

For each ratio, LeNet-300-100 is compressed twice from the same teacher with the recipe of
benchmarks/compare_mnist.py (joint, 4-bit LSQ, KD): once with `target.steer: false` (the
allocator's estimate before training decides alone) and once with steering. Each run's
weights file is saved and measured. The unsteered run also records `drift`: the bytes the
run's current state would encode to at its final per-layer targets, at every tenth of the
run after LSQ starts, i.e. how the trained weights move away from any early prediction.
Writes benchmarks/results/size_targets_<data>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from compare_mnist import recipe as compare_recipe
from jointcompress.api import compress
from jointcompress.artifact.store import save
from jointcompress.data import evaluator, load_dataset
from jointcompress.finalize import finalize
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import parse_recipe
from jointcompress.targets import Candidate, target_bytes


class Drift:
    """Bytes of the run's current state at its final per-layer targets, every tenth of the run."""

    def __init__(self):
        self.points = []

    def on_step(self, trainer, step, out):
        total = trainer.plan.total_steps
        prune = next(t for t in trainer.techniques if t.kind == "prune_unstructured")
        quant = next(t for t in trainer.techniques if t.kind == "quant_lsq")
        if not quant.attached or (step + 1) % max(1, total // 10):
            return
        cand = Candidate.from_training(trainer.model, prune, quant)
        targets = {n: prune.layer_target(n) for n in prune.layers}
        self.points.append({"share_of_run": round((step + 1) / total, 3),
                            "bytes": cand.file_bytes(targets, quant.config.layer_bits)})


def run(teacher, split, data: dict, steer: bool) -> dict:
    data = copy.deepcopy(data)
    data["target"]["steer"] = steer
    model = copy.deepcopy(teacher)
    drift = Drift()
    result = compress(model, data, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher,
                      callbacks=[] if steer else [drift])
    spec = finalize(model, result.example_inputs)
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = save(model, spec, Path(tmp) / "a", example_inputs=result.example_inputs)["weights_file_bytes"]
    goal = target_bytes(teacher, parse_recipe(data).target)
    row = {"steer": steer, "goal_bytes": round(goal), "file_bytes": file_bytes,
           "deviation_pct": round(100 * (file_bytes / goal - 1), 2), "accuracy": result.metrics["accuracy"],
           "events": [e for e in result.history.events if e["event"].startswith("size_")]}
    if not steer:
        row["drift"] = drift.points
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--ratios", default="10,30")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = load_dataset(args.data)
    teacher = train_teacher("lenet300", split, args.teacher_epochs, lr=1e-3, seed=0)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        data = compare_recipe("lenet300", args.epochs).model_dump()
        # the allocator and its steering: mode overlap (mode: joint under a size target trains the joint
        # form, joint_form.py, which has neither); the runs stored before joint_form.py ran this as mode: joint
        data["mode"], data["target"] = "overlap", {"ratio": ratio}
        for steer in (False, True):
            row = {"ratio": ratio, **run(teacher, split, data, steer)}
            rows.append(row)
            print(f"ratio {ratio:g} steer={steer}: {row['file_bytes']} B vs {row['goal_bytes']} B "
                  f"({row['deviation_pct']:+.2f}%), accuracy {100 * row['accuracy']:.2f}%", flush=True)
    name = "digits" if args.data == "digits" else Path(args.data).stem
    out = Path(__file__).parent / "results" / f"size_targets_{name}.json"
    out.write_text(json.dumps({"command": "python benchmarks/size_targets.py " + " ".join(sys.argv[1:]), "runs": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

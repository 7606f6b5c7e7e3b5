"""8-bit LSQ from the paper's first step (2*mean|w|/sqrt(Q), the package's) vs from at most headroom * max|w|/Q.

    .venv/bin/python benchmarks/lsq_init_8bit.py [--data ../shared/datasets/mnist/mnist.npz] [--seeds 3] [--headroom 1,2]

Per seed: a LeNet-5 teacher trained on --train-rows MNIST training images (its kept epoch chosen on 1,000 held-out
training images), then compressed from it with the same seed once per first step: half of every channel group removed
(learned scores), 8-bit LSQ from 0.3 of the run, distilled (the demo's fast-model recipe). Reads,
on the test split: the finalized model's accuracy (its weights are the int8 model's integers times their steps),
the largest integer level used of 127, and the relative logit change of finalize's rounding on the teacher's
weights (prepare + finalize with no step: the first step alone). Each `range_xH` arm against the paper's, paired by
seed, mean +- standard error.
Writes benchmarks/results/lsq_init_8bit.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import jointcompress
from jointcompress import compress
from jointcompress.data import evaluator, hold_out, load_dataset
from jointcompress.pipeline import builder_for, train_teacher
from jointcompress.techniques import quant_lsq

RESULT = Path(__file__).parent / "results" / "lsq_init_8bit.json"
PAPER_STEP = quant_lsq.lsq_init_step


def capped_step(headroom: float):
    """The paper's first step, at most `headroom` * max|w| / Q per channel (what an arm patches into quant_lsq)."""
    def step(w: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
        paper = PAPER_STEP(w, qmax, per_channel)
        flat = w.detach().flatten(1) if per_channel else w.detach().flatten().unsqueeze(0)
        cap = (headroom * flat.abs().amax(1) / qmax).view(paper.shape)
        return torch.where(cap > 0, torch.minimum(paper, cap), paper)
    return step


def recipe(epochs: int, seed: int) -> dict:
    return {"mode": "joint", "training": {"epochs": epochs, "batch_size": 128, "lr": 1e-3, "seed": seed},
            "techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": "learned", "end": 0.6},
                           {"type": "quant_lsq", "bits": 8, "start": 0.3},
                           {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7}]}


def levels_used(model, spec) -> int:
    modules = dict(model.named_modules())
    return max(int((modules[n].weight / ls.scale.view(-1, *[1] * (modules[n].weight.dim() - 1))).round().abs().max())
               for n, ls in spec.layers.items())


def rounding_change(teacher, x) -> float:
    """Relative logit change of finalize's 8-bit rounding of the teacher's weights, from the first step alone."""
    model = copy.deepcopy(teacher)
    jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, total_steps=1).finalize()
    with torch.no_grad():
        ref, got = teacher.eval()(x), model.eval()(x)
    return float((got - ref).norm() / ref.norm())


def one_seed(seed: int, split, args) -> dict:
    torch.manual_seed(seed)
    teacher = train_teacher("lenet5", split, args.teacher_epochs, seed=seed).eval()
    row = {"seed": seed}
    arms = [("paper", PAPER_STEP)] + [(f"range_x{h:g}", capped_step(h)) for h in args.headroom]
    for name, first_step in arms:
        quant_lsq.lsq_init_step = first_step
        try:
            row[f"{name}_rounding_change"] = rounding_change(teacher, split.x_test[:1000])
            result = compress(copy.deepcopy(teacher), recipe(args.epochs, seed), (split.x_train, split.y_train),
                              evaluator(*split.selection()), teacher=teacher)
            model, spec = result.model, result.finalize()
            row[f"{name}_accuracy"] = evaluator(split.x_test, split.y_test)(model.eval())["accuracy"]
            row[f"{name}_levels_used"] = levels_used(model, spec)
        finally:
            quant_lsq.lsq_init_step = PAPER_STEP
    return row


def paired(rows: list[dict], arm: str, key: str) -> dict:
    diffs = [r[f"{arm}_{key}"] - r[f"paper_{key}"] for r in rows]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean": statistics.mean(diffs), "se": se, "n": len(diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/mnist/mnist.npz")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-rows", type=int, default=10000)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--headroom", default="1,2", help="the arms' caps, headroom * max|w| / Q (comma-separated)")
    args = ap.parse_args()
    args.headroom = [float(h) for h in args.headroom.split(",")]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    split = load_dataset(args.data)
    split.x_train, split.y_train = split.x_train[:args.train_rows], split.y_train[:args.train_rows]
    split = hold_out(split, 1000)
    builder_for("lenet5", split)  # the model against the data, before any training
    t0 = time.perf_counter()
    rows = [one_seed(seed, split, args) for seed in range(args.seeds)]
    out = {"command": "python " + " ".join(sys.argv), "threads": 1, "test_rows": len(split.y_test), "rows": rows,
           "arms_minus_paper": {f"range_x{h:g}": {k: paired(rows, f"range_x{h:g}", k)
                                                  for k in ("accuracy", "rounding_change", "levels_used")}
                                for h in args.headroom},
           "wall_seconds": time.perf_counter() - t0}
    RESULT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["arms_minus_paper"], indent=1))


if __name__ == "__main__":
    main()

"""What the sensitivity scan reads on a BatchNorm model with and without re-estimated statistics.

    .venv/bin/python benchmarks/sensitivity_norms.py --seeds 3

The small ResNet (BatchNorm after every convolution) is trained on the embedded digits (no download),
once per seed, and scanned twice: with the running averages training left, and with the statistics
re-estimated on 8 batches of 128 training images before every reading (`scan(norm_batches=...)`,
the CLI's default). A pruned or rounded convolution changes what the BatchNorm after it sees; read
with the old averages, it is normalized as the layer it was. The fully connected layer has no
BatchNorm after it, so its drops must not move: the control. Both scans then feed the size-target
allocator (sequential, 10x), whose per-layer budgets are recorded. One thread. Writes
benchmarks/results/sensitivity_norms.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from jointcompress.sensitivity import shuffled_batches
from jointcompress.data import evaluator, load_digits
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import parse_recipe
from jointcompress.sensitivity import scan
from jointcompress.targets import resolve_target

SETTINGS = (("sparsity", "0.9"), ("sparsity", "0.98"), ("bits", "2"))


def budgets(model, result: dict, example) -> dict:
    recipe = parse_recipe({"mode": "sequential", "target": {"ratio": 10},
                           "techniques": [{"type": "prune_unstructured"}, {"type": "quant_lsq", "bits": 4}]})
    resolved = resolve_target(model, recipe, example, sensitivity=result)
    return {"sparsity": resolved.technique("prune_unstructured").layer_sparsity,
            "bits": resolved.technique("quant_lsq").layer_bits}


def one_seed(split, seed: int, epochs: int, batches: int) -> dict:
    model = train_teacher("resnet", split, epochs, lr=2e-3, seed=seed)
    evaluate, example = evaluator(split.x_test, split.y_test), split.x_train[:2]
    readings = {}
    for name, given in (("running", None), ("re_estimated", shuffled_batches(split.x_train, batches))):
        t0 = time.perf_counter()
        result = scan(model, evaluate, example, groups=False, norm_batches=given)
        readings[name] = {"baseline": result["baseline"], "norm_batches": result["norm_batches"],
                          "layers": {k: {"sparsity": v["sparsity"], "bits": v["bits"]} for k, v in result["layers"].items()},
                          "scan_s": round(time.perf_counter() - t0, 1), "allocation_10x": budgets(model, result, example)}
    return {"seed": seed, **readings}


def summary(runs: list[dict]) -> list[dict]:
    """Per layer and setting: the mean drop (points) each way over seeds, and the paired difference."""
    rows = []
    for layer in runs[0]["running"]["layers"]:
        for kind, key in SETTINGS:
            stale = [100 * r["running"]["layers"][layer][kind][key] for r in runs]
            fresh = [100 * r["re_estimated"]["layers"][layer][kind][key] for r in runs]
            diffs = [a - b for a, b in zip(stale, fresh)]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
            rows.append({"layer": layer, "setting": f"{kind} {key}", "running": round(statistics.mean(stale), 2),
                         "re_estimated": round(statistics.mean(fresh), 2), "difference": round(statistics.mean(diffs), 2),
                         "se": None if se is None else round(se, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sensitivity_norms.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_digits()
    runs = [one_seed(split, seed, args.epochs, args.batches) for seed in range(args.seeds)]
    out = {"command": " ".join([".venv/bin/python"] + sys.argv), "model": "small ResNet (BatchNorm)",
           "data": "embedded digits", "threads": 1, "teacher_epochs": args.epochs, "runs": runs, "summary": summary(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for row in out["summary"]:
        print(f"{row['layer']:20s} {row['setting']:14s} running {row['running']:6.2f}  re-estimated "
              f"{row['re_estimated']:6.2f}  difference {row['difference']:+6.2f} ± {row['se']}")


if __name__ == "__main__":
    main()

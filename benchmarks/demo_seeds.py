"""The demo's size point over several compression seeds: is joint's win in `jointcompress demo`
more than one lucky seed?

    .venv/bin/python benchmarks/demo_seeds.py [--ratios 100] [--seeds 3]

Same teacher (trained once per ratio with the demo's fixed seed), same recipe, same target as
`jointcompress demo`; only the compression seed changes. Writes benchmarks/results/demo_seeds.json
with every run, the paired differences (joint - sequential accuracy, per seed) and their mean ±
standard error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from jointcompress.demo import JOINT_VARIANT, VALIDATION_IMAGES, run_demo


def paired(diffs: list[float]) -> dict:
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": mean, "se": se, "n": n, "beyond_2se": abs(mean) > 2 * se if n > 1 else False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--ratios", default="100")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--joint-variant", default=JOINT_VARIANT, help=f"compare's variant for the joint row (default {JOINT_VARIANT}, the demo's)")
    ap.add_argument("--val-images", type=int, default=VALIDATION_IMAGES,
                    help=f"training images held out to choose every kept epoch on (default {VALIDATION_IMAGES}, the "
                         "demo's; 0: on the test images, as the results stored before this option)")
    ap.add_argument("--scale-format", choices=("auto", "fp16", "log8"), default="auto",
                    help="quant_lsq.scale_format of both runs (default auto, the demo's: log8 under its size target; "
                         "the results stored before it existed trained fp16 steps)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_seeds.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    points, selected_on = [], None
    for ratio in [float(r) for r in args.ratios.split(",")]:
        runs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as work:
                res = run_demo(Path(work), model=args.model, ratio=ratio, seed=seed, structured=False,
                               joint_variant=args.joint_variant, validation_images=args.val_images,
                               scale_format=args.scale_format)
            selected_on = res.selected_on
            runs.append({"seed": seed, **{m: {k: res.rows[m][k] for k in ("accuracy", "file_bytes")}
                                          for m in ("sequential", "joint")},
                         "teacher_accuracy": res.rows["uncompressed"]["accuracy"], "target_bytes": res.target_bytes})
            print(f"{ratio:g}x seed {seed}: sequential {runs[-1]['sequential']['accuracy']:.4f} "
                  f"joint {runs[-1]['joint']['accuracy']:.4f}", flush=True)
        diff = paired([r["joint"]["accuracy"] - r["sequential"]["accuracy"] for r in runs])
        points.append({"ratio": ratio, "runs": runs, "joint_minus_sequential_accuracy": diff})
    result = {"command": " ".join(["python benchmarks/demo_seeds.py"] + sys.argv[1:]), "model": args.model,
              "joint_variant": args.joint_variant, "scale_format": args.scale_format,
              "data": "digits (embedded; 449 held-out images)", "selected_on": selected_on, "threads": 1,
              "points": points,
              "wall_seconds": time.perf_counter() - t0}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for p in points:
        d = p["joint_minus_sequential_accuracy"]
        print(f"{p['ratio']:g}x: joint - sequential = {100 * d['mean']:+.2f} ± {100 * d['se']:.2f} points (n={d['n']})")


if __name__ == "__main__":
    main()

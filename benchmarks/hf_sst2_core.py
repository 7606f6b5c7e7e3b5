"""The SST-2 case through the core loop (the path `jointcompress compress` takes), at the
full budget: all 67,349 train rows, 1 epoch, vocabulary trimming on, packed artifact, ONNX
Runtime int8. --mode joint (prune heads + FFN, LSQ and KD at once), sequential (prune ->
fine-tune -> quantize -> fine-tune, KD throughout: the same steps, scheduled one after another)
or progressive (prune the 6-layer *teacher* for one epoch, build the student from the pruned
teacher's layers, distil for half an epoch-equivalent, then LSQ + KD; each stage runs one epoch
over the same random half of the train rows, so the step count equals the other modes').

    .venv/bin/python benchmarks/hf_sst2_core.py --data ../shared/datasets/sst2 --teacher runs/hf_teacher --mode joint
    .venv/bin/python benchmarks/hf_sst2_core.py --data ../shared/datasets/sst2 --teacher runs/hf_teacher --mode sequential
    .venv/bin/python benchmarks/hf_sst2_core.py --data ../shared/datasets/sst2 --teacher runs/hf_teacher --mode progressive
    .venv/bin/python benchmarks/hf_sst2_core.py --data ../shared/datasets/sst2 --teacher runs/hf_teacher --ratio 16

--ratio R gives the recipe a size target (R x the teacher's fp32 weights): the heads and FFN neurons
kept are planned to meet it (hf/size_target.py) instead of the recipe's sparsities.

Writes runs/hf_sst2_core[_MODE]/ (artifact, model folder, ONNX, summary.json) and copies
summary.json to benchmarks/results/hf_sst2_core[_MODE][_ratioR][_rowsN].json (no mode suffix for joint). The teacher folder comes
from `benchmarks/hf_sst2.py teacher` (MiniLM-L6 fine-tuned on SST-2).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from jointcompress.hf.pipeline import run_hf_recipe
from jointcompress.recipe import builtin_recipe, load_recipe, parse_recipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--mode", choices=["joint", "sequential", "progressive"], default="joint")
    ap.add_argument("--out", default=None, help="default runs/hf_sst2_core (joint), runs/hf_sst2_core_sequential")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=None,
                    help="a size target (x the teacher's fp32 weights): the heads and FFN neurons kept are planned to meet it")
    ap.add_argument("--train-limit", type=int, default=None, help="random subset of the train rows (default: all)")
    ap.add_argument("--scale-format", choices=("auto", "fp16", "log8"), default="fp16",
                    help="quant_lsq.scale_format (default fp16, as the stored runs trained; the library's default, "
                         "auto, stores step sizes in one byte under a size target)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suffix = ("" if args.mode == "joint" else "_" + args.mode) + (f"_ratio{args.ratio:g}" if args.ratio else "") + (
        f"_rows{args.train_limit}" if args.train_limit else "")
    base = load_recipe(builtin_recipe("hf_sst2")).model_dump()
    base["mode"] = "sequential" if args.mode == "sequential" else "joint"
    base["hf"]["train_limit"] = args.train_limit  # None: every train row
    if args.ratio:
        base["target"] = {"ratio": args.ratio}
    base["hf"]["trim_vocab"] = True
    for t in base["techniques"]:
        if t["type"] == "quant_lsq":
            t["scale_format"] = args.scale_format
    base["coordination"]["every"] = 1  # measured on every step, as the stored results were (now: every log_every)
    if args.mode == "progressive":  # two one-epoch stages over half the rows: the same number of steps
        base["hf"]["train_limit"] = 67349 // 2
        for t in base["techniques"]:
            if t["type"] == "quant_lsq":
                t["start"] = 0.5  # stage 2: distil first, then quantize (with KD)
    recipe = parse_recipe(base, source="benchmarks/hf_sst2_core.py")
    out = Path(args.out or f"runs/hf_sst2_core{suffix}")
    shutil.rmtree(out, ignore_errors=True)
    run_hf_recipe(recipe, out, args.data, weights=args.teacher, log=print, progressive=args.mode == "progressive")
    summary = json.loads((out / "summary.json").read_text())
    summary["command"] = (f"python benchmarks/hf_sst2_core.py --data {args.data} --teacher {args.teacher} "
                          f"--mode {args.mode} --threads {args.threads}" + (f" --ratio {args.ratio:g}" if args.ratio else "")
                          + (f" --train-limit {args.train_limit}" if args.train_limit else "")
                          + (f" --scale-format {args.scale_format}" if args.scale_format != "fp16" else ""))
    Path(f"benchmarks/results/hf_sst2_core{suffix}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps({k: summary.get(k) for k in ("artifact", "int8")}, indent=1, default=str))


if __name__ == "__main__":
    main()

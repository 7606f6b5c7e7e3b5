"""Our accuracy-vs-latency curve on LeNet-5 / MNIST, Torch-Pruning's, and the paired verdict at
equal accuracy over seeds, from runs of benchmarks/against_torch_pruning.py (each stores its
own command):

    # the decisive point, 3 seeds (ours at 0.70 ms ORT fp32 batch 64; Torch-Pruning in 12 steps,
    # kept at the fastest stage that matches our accuracy after at least our training budget)
    for s in 0 1 2; do python benchmarks/against_torch_pruning.py --data ../shared/datasets/mnist/mnist.npz \
        --model lenet5 --teacher-epochs 8 --epochs 4 --target-ms 0.70 --both-batches False --tp-steps 12 \
        --seed $s --teacher /tmp/jc-teacher-lenet5-e8.safetensors \
        --out benchmarks/results/against_torch_pruning_lenet5_equal_acc_seed$s.json; done
    # more points of our curve (ours only, seed 0)
    for t in 0.95 1.2 1.6; do python benchmarks/against_torch_pruning.py ... --target-ms $t --torch-pruning False \
        --out benchmarks/results/against_sweep_lenet5_t$t.json; done
    python benchmarks/against_curve.py

(against_torch_pruning_lenet5.json and ..._both_batches.json, earlier runs with the channel-norm
importance and 6 Torch-Pruning steps, are read too, as more points of both curves.)

Paired statistics: for every seed, Torch-Pruning's latency over ours (same run, interleaved
and alone medians, ONNX Runtime fp32, batch 1 and 64) and our test accuracy minus theirs;
mean +- standard error over seeds, called a difference only beyond 2 SE.

Writes benchmarks/results/against_curve_lenet5.json (with this command).

The runs deployed with the pooled-convolution rewrite (deploy.pooled_conv) and a 4-channel floor,
re-timed on a quiet machine by benchmarks/against_retime.py, are summarized the same way:

    python benchmarks/against_curve.py --seeds 'against_torch_pruning_lenet5_fold_w24_seed*.json' --no-extra \
        --retime benchmarks/results/against_retime_lenet5_fold_quiet.json --out against_curve_lenet5_fold.json
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

from jointcompress.io import atomic_write_text

RESULTS = Path("benchmarks/results")


def load(pattern: str) -> list[dict]:
    return [{**json.loads(Path(p).read_text()), "file": p} for p in sorted(glob.glob(str(RESULTS / pattern)))]


def point(run: dict, side: str) -> dict:
    """One contender of one run: widths, test accuracy, ORT fp32 ms and speed-ups (both batches)."""
    key = f"{side}_fp32_ort"
    widths_key = "ours" if side == "ours" else "torch_pruning"
    importance = (run["ours"]["allocation"].get("importance") or {"kind": "norm"})["kind"]
    out = {"file": run["file"], "seed": run["config"].get("seed", 0), "target_ms_b64": run["target"]["latency_ms_b64"],
           "importance": importance if side == "ours" else None,
           "target_met_at_allocation": run["ours"]["allocation"]["measured_ms"] <= run["target"]["latency_ms_b64"]
           if side == "ours" else None,
           "widths": run["widths"][widths_key], "test_accuracy": run["accuracy"][key]}
    for b in ("batch1", "batch64"):
        t = run["timing"][b]
        out[b] = {"ms": t["latency_ms"][key], "alone_ms": t["alone_ms"][key],
                  "speedup": t["speedup_vs_dense_fp32_torch"][key], "speedup_alone": t["speedup_alone_vs_dense_fp32_torch"][key],
                  "dense_ms": t["latency_ms"]["dense_fp32_torch"], "dense_alone_ms": t["alone_ms"]["dense_fp32_torch"],
                  "flagged": key in t["flagged"]}
    return out


def mean_se(xs: list[float]) -> dict:
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else None
    return {"mean": m, "se": se, "n": len(xs), "values": xs, "beyond_2se": bool(se is not None and abs(m) > 2 * se)}


def paired(runs: list[dict]) -> dict:
    """Per seed: Torch-Pruning's ms over ours (> 1: we are faster) and accuracy differences."""
    out = {"accuracy_ours_minus_tp_points": mean_se([100 * (r["accuracy"]["ours_fp32_ort"] - r["accuracy"]["tp_fp32_ort"])
                                                      for r in runs]),
           # against each run's own dense teacher (runs on other machines may have retrained it)
           "ours_accuracy_lost_points": mean_se([100 * (r["accuracy"]["dense_fp32_torch"] - r["accuracy"]["ours_fp32_ort"])
                                                 for r in runs])}
    for b in ("batch1", "batch64"):
        for kind in ("latency_ms", "alone_ms"):
            t = [r["timing"][b][kind] for r in runs]
            out[f"tp_over_ours_{b}_{kind}"] = mean_se([x["tp_fp32_ort"] / x["ours_fp32_ort"] - 1 for x in t])
    return out


def paired_retime(retime: dict) -> dict:
    """The same paired statistics from a re-timing of several runs (benchmarks/against_retime.py):
    per seed, Torch-Pruning's ms over ours, all contenders interleaved, alone, and each right
    after dense PyTorch; and ours' speed-ups over dense PyTorch."""
    tags = sorted({k.split("_")[0] for k in retime["accuracy"] if k.startswith("s") and k.endswith("ours_fp32_ort")})
    out = {"accuracy_ours_minus_tp_points": mean_se([100 * (retime["accuracy"][f"{t}_ours_fp32_ort"]
                                                            - retime["accuracy"][f"{t}_tp_fp32_ort"]) for t in tags]),
           "ours_accuracy_lost_points": mean_se([100 * (retime["accuracy"]["dense_fp32_torch"]
                                                        - retime["accuracy"][f"{t}_ours_fp32_ort"]) for t in tags])}
    for b in ("batch1", "batch64"):
        t = retime["timing"][b]
        reads = {"interleaved_all": t["all"]["interleaved_ms"], "alone": t["all"]["alone_ms"],
                 "after_dense": {k: v["interleaved_ms"][k] for k, v in t["after_dense"].items()}}
        for name, ms in reads.items():
            out[f"tp_over_ours_{b}_{name}"] = mean_se([ms[f"{g}_tp_fp32_ort"] / ms[f"{g}_ours_fp32_ort"] - 1 for g in tags])
        out[f"ours_speedup_{b}_after_dense"] = mean_se([t["after_dense"][f"{g}_ours_fp32_ort"]["speedup_interleaved"][
            f"{g}_ours_fp32_ort"] for g in tags])
        out[f"ours_speedup_{b}_alone"] = mean_se([t["all"]["speedup_alone"][f"{g}_ours_fp32_ort"] for g in tags])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="against_torch_pruning_lenet5_equal_acc_seed*.json")
    ap.add_argument("--no-extra", action="store_true", help="leave out the sweep and the earlier runs")
    ap.add_argument("--retime", default=None, help="a re-timing of the seeds' runs (benchmarks/against_retime.py)")
    ap.add_argument("--out", default="against_curve_lenet5.json")
    args = ap.parse_args()
    seeds = load(args.seeds)
    if not seeds:
        ap.error(f"--seeds {args.seeds!r} matches no file in {RESULTS}/ (a file pattern inside that folder, "
                 "e.g. 'against_torch_pruning_lenet5_equal_acc_seed*.json')")
    sweep = [] if args.no_extra else load("against_sweep_lenet5_t*.json")
    earlier = [] if args.no_extra else (load("against_torch_pruning_lenet5.json")
                                        + load("against_torch_pruning_lenet5_both_batches.json"))
    ours = [point(r, "ours") for r in seeds + sweep + earlier]
    tp = [{**point(r, "tp"), "matched": r["torch_pruning"]["matched"], "chosen_step": r["torch_pruning"]["chosen_step"],
           "candidates": r["torch_pruning"]["candidates"],
           "stages": [{k: s[k] for k in ("step", "widths", "selection_accuracy", "steps_so_far", "ort_fp32_alone_ms")}
                      for s in r["torch_pruning"]["stages"]]} for r in seeds + earlier]
    command = "python benchmarks/against_curve.py" + (
        "" if args.seeds == ap.get_default("seeds") and not args.no_extra and not args.retime and args.out == ap.get_default("out")
        else f" --seeds '{args.seeds}'" + (" --no-extra" if args.no_extra else "")
        + (f" --retime {args.retime}" if args.retime else "") + f" --out {args.out}")
    result = {"command": command,
              "sources": [r["file"] for r in seeds + sweep + earlier], "ours_curve": sorted(ours, key=lambda p: p["batch64"]["alone_ms"]),
              "torch_pruning": tp, "paired_over_seeds": paired(seeds) if seeds else None,
              "rule": "ORT fp32 both; Torch-Pruning at its fastest stage whose selection accuracy >= ours after >= our "
                      "training steps; a difference is called only beyond 2 SE (paired over seeds)"}
    if args.retime:
        result["paired_over_seeds_retimed"] = {"file": args.retime, **paired_retime(json.loads(Path(args.retime).read_text()))}
    atomic_write_text(RESULTS / args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["paired_over_seeds"], indent=1))
    for p in result["ours_curve"]:
        print("ours", p["seed"], p["importance"], p["widths"], p["test_accuracy"], round(p["batch64"]["speedup"], 1), round(p["batch1"]["speedup"], 1))
    for p in tp:
        print("tp", p["seed"], p["widths"], p["test_accuracy"], round(p["batch64"]["speedup"], 1), round(p["batch1"]["speedup"], 1))


if __name__ == "__main__":
    main()

"""Write BENCHMARKS.md at the repo root from benchmarks/results/compare_*/compare.json.

Only numbers that `benchmarks/compare_mnist.py` wrote are used; a model whose results are
missing is listed as "not run yet". Verdicts against the goals and against sequential are
computed, not hand-written.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

from jointcompress.compare import (beyond_two_se, collapsed_sides, paired_differences, paired_stats,
                                  seed_differences, summarize)
from jointcompress.joint_form import JOINT_FORM_VARIANT, NONZERO_GRID_BITS, joint_form_variant

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "resnet": "Small ResNet",
          "mobilenet": "Small MobileNetV2 (mobilenet)", "seqcnn": "1-D CNN (seqcnn)", "vit": "Small ViT (vit)",
          "lstm": "LSTM (lstm)"}
REF = {"lenet300": (40.0, 1.58), "lenet5": (39.0, 0.74)}  # Deep Compression's points (none for the small ResNet)
GOAL = {"lenet300": (100.0, 1.80), "lenet5": (200.0, 1.00)}  # the joint-compression issue's goals


# Re-runs of the joint variant alone after a joint-only change (size_budget's landing: channel
# floors in the projection, catch-up before the freeze): their sequential runs come from the
# folder they replace. Sequential never builds a size budget, so the change cannot reach it
# (re-running seed 0 of compare_lenet5_400x_2k's sequential reproduced 19.70% and 4,287 B), and
# the teachers are the same (checked below: every seed's uncompressed accuracy must match).
SEQUENTIAL_FROM = {"compare_lenet300_100x_e20_paced_obd_guard": "compare_lenet300_100x_e20_paced_obd",  # the guard steps
                   "compare_lenet5_100x_2k_v2": "compare_lenet5_100x_2k",
                   "compare_lenet5_200x_2k_v2": "compare_lenet5_2k",
                   "compare_lenet5_400x_2k_v2": "compare_lenet5_400x_2k",
                   "compare_lenet5_200x_e6_v2": "compare_lenet5_200x_e6",
                   "compare_lenet5_100x_v2": "compare_lenet5_100x",
                   "compare_lenet5_400x_v2": "compare_lenet5_400x"}
# Runs of a further joint variant beside a folder that stays (the stiffer constraint, joint-stiff-*):
# paired with that folder's sequential runs (same teachers, checked), without replacing it.
SEQUENTIAL_BESIDE = {"compare_lenet300_100x_stiff_v3": "compare_lenet300_100x_bits_fixed",
                     "compare_lenet300_100x_e10_stiff_v3": "compare_lenet300_100x_e10_fixed",
                     "compare_lenet300_100x_2k_stiff_v3": "compare_lenet300_100x_2k_fixed",
                     # the early freeze (joint-early-*): decisions in the first 30% of the run, then fine-tuning
                     "compare_lenet300_100x_e10_early_v4": "compare_lenet300_100x_e10_fixed",
                     "compare_lenet300_100x_2k_early_v4": "compare_lenet300_100x_2k_fixed",
                     "compare_lenet300_100x_early_v4": "compare_lenet300_100x_bits_fixed",
                     # the paced window (joint-paced-*): ~1,000 steps of decisions, then fine-tuning
                     "compare_lenet300_100x_e10_paced_v4": "compare_lenet300_100x_e10_fixed",
                     "compare_lenet300_100x_2k_paced_v4": "compare_lenet300_100x_2k_fixed",
                     "compare_lenet300_100x_paced_v4": "compare_lenet300_100x_bits_fixed",
                     "compare_lenet300_100x_e10_paced_aw_v4": "compare_lenet300_100x_e10_fixed",
                     "compare_lenet300_100x_e10_paced_pcgrad_v4": "compare_lenet300_100x_e10_fixed",
                     # the paced recipe on LeNet-5 (is one recipe good at every point?)
                     "compare_lenet5_200x_paced": "compare_lenet5_200x",
                     "compare_lenet5_200x_2k_paced": "compare_lenet5_2k",
                     "compare_lenet5_400x_paced": "compare_lenet5_400x",
                     "compare_lenet5_100x_paced": "compare_lenet5_100x",
                     "compare_lenet5_100x_2k_paced": "compare_lenet5_100x_2k",
                     "compare_lenet5_200x_3bit_paced": "compare_lenet5_200x_3bit",
                     # the paced recipe whose landing cuts by Fisher cost per byte (joint-paced-obd-none)
                     "compare_lenet5_400x_paced_obd": "compare_lenet5_400x",
                     "compare_lenet5_200x_paced_obd": "compare_lenet5_200x",
                     "compare_lenet5_400x_2k_paced": "compare_lenet5_400x_2k",
                     "compare_lenet5_200x_2k_paced_obd": "compare_lenet5_2k",
                     "compare_lenet5_400x_2k_paced_obd": "compare_lenet5_400x_2k",
                     "compare_lenet5_100x_2k_paced_obd": "compare_lenet5_100x_2k",
                     "compare_lenet5_100x_paced_obd": "compare_lenet5_100x",
                     "compare_lenet5_200x_3bit_paced_obd": "compare_lenet5_200x_3bit",
                     "compare_lenet300_60x_paced_obd_10seeds": "compare_lenet300_60x_paced_10seeds",
                     "compare_lenet300_100x_paced_obd_10seeds": "compare_lenet300_100x_paced_10seeds",
                     "compare_lenet300_100x_e10_paced_obd_10seeds": "compare_lenet300_100x_e10_paced_10seeds",
                     "compare_lenet300_60x_2k_paced_obd_10seeds": "compare_lenet300_60x_2k_paced_10seeds",
                     "compare_lenet300_100x_2k_paced_obd_10seeds": "compare_lenet300_100x_2k_paced_10seeds",
                     # the same point after the saliency's closed form, on another machine (its own teachers)
                     "compare_lenet300_100x_paced_obd_10seeds_closed_form":
                         "compare_lenet300_100x_paced_obd_10seeds_closed_form_seq",
                     # ten more seeds of that point on the same machine, and the twenty pooled
                     "compare_lenet300_100x_paced_obd_seeds10to19": "compare_lenet300_100x_paced_obd_seeds10to19_seq",
                     "compare_lenet300_100x_paced_obd_20seeds": "compare_lenet300_100x_paced_obd_20seeds_seq",
                     # the 2,000-image points over 20 seeds on this machine, after the fused Adam
                     "compare_lenet300_60x_2k_paced_obd_20seeds": "compare_lenet300_60x_2k_paced_obd_20seeds_seq",
                     "compare_lenet300_100x_2k_paced_obd_20seeds": "compare_lenet300_100x_2k_paced_obd_20seeds_seq",
                     # the size-neutral saliency (joint-paced-obdrank-none) on ten of those seeds
                     "compare_lenet300_60x_2k_obdrank_10seeds": "compare_lenet300_60x_2k_paced_obd_20seeds_seq",
                     "compare_lenet300_60x_2k_obdland_10seeds": "compare_lenet300_60x_2k_paced_obd_20seeds_seq",
                     "compare_lenet300_60x_2k_obdland_s10to19": "compare_lenet300_60x_2k_paced_obd_20seeds_seq",
                     "compare_lenet300_60x_2k_obdland_20seeds": "compare_lenet300_60x_2k_paced_obd_20seeds_seq",
                     "compare_lenet300_100x_2k_obdland_10seeds": "compare_lenet300_100x_2k_paced_obd_20seeds_seq",
                     # the Fisher estimate in the landing only (joint-paced-obdland-none), beside the folder
                     # of the size-neutral saliency (its sequential and joint-paced-obd-none runs)
                     "compare_vit_30x_2k_obdland": "compare_vit_30x_2k_obdrank",
                     "compare_lstm_30x_2k_obdland": "compare_lstm_30x_2k",
                     "compare_vit_30x_obdland": "compare_vit_30x_fp16norm",
                     # both on LeNet-5 at 200x with 2,000 images (a CNN where joint-paced-obd-none wins), beside
                     # joint-paced-obd-none and sequential re-run with the same teachers (the stored ones' teachers
                     # differ in the fourth digit: trained on another machine)
                     "compare_lenet5_200x_2k_rank_land": "compare_lenet5_200x_2k_obd_seq",
                     # the state cut back onto its goal inside the window (joint-paced-obdtrack-none), beside
                     # the folders of joint-paced-obd-none and sequential (and of joint-paced-obdland-none)
                     "compare_vit_30x_2k_obdtrack": "compare_vit_30x_2k_obdrank",
                     "compare_lenet5_200x_2k_obdtrack": "compare_lenet5_200x_2k_obd_seq",
                     "compare_lenet300_60x_2k_obdtrack_10seeds": "compare_lenet300_60x_2k_paced_obd_20seeds_seq",
                     "compare_lstm_30x_2k_obdtrack": "compare_lstm_30x_2k",
                     "compare_vit_30x_obdtrack": "compare_vit_30x_fp16norm",
                     "compare_lenet300_100x_2k_obdtrack_10seeds": "compare_lenet300_100x_2k_paced_obd_20seeds_seq",
                     # (its 60,000-image teachers differ from the stored ones: the pull and sequential re-run beside it)
                     "compare_lenet300_100x_obdtrack_10seeds": "compare_lenet300_100x_obd_seq_10seeds",
                     # LeNet-5 at 200x after the fused Adam and the size term's single node (a check)
                     "compare_lenet5_200x_paced_obd_fused": "compare_lenet5_200x_paced_obd_fused_seq",
                     # the paced recipe on a log-linear budget schedule (joint-paced-lin-*)
                     "compare_lenet5_400x_paced_lin": "compare_lenet5_400x",
                     "compare_lenet5_200x_paced_lin": "compare_lenet5_200x",
                     "compare_lenet300_100x_paced_lin_5seeds": "compare_lenet300_100x_paced_5seeds",
                     "compare_lenet300_100x_2k_paced_lin_5seeds": "compare_lenet300_100x_2k_paced_5seeds",
                     "compare_lenet300_100x_e10_paced_lin_5seeds": "compare_lenet300_100x_e10_paced_5seeds",
                     # PCGrad between accuracy (task + distill as one gradient) and size (joint-acc-pcgrad) beside
                     # per-term PCGrad, with sequential re-run on the same teachers
                     "compare_lenet5_100x_acc": "compare_lenet5_100x_acc_seq",
                     "compare_lenet300_100x_acc": "compare_lenet300_100x_acc_seq"}


# Runs with `finetune_phase` (the joint-fisher-* and joint-bits-* variants) made before the fix of
# the pattern cache (zero_level._keep_float): their half-way re-projection measured a stale file
# and flipped up to 3x the decisions it needed. Marked in the summary table.
STALE_TRIM = {"compare_lenet300_100x_v2", "compare_lenet300_100x_2k_v2", "compare_lenet300_60x", "compare_lenet300_60x_2k",
              "compare_lenet5_200x_fisher", "compare_lenet300_100x_bits", "compare_lenet5_200x_bits", "compare_lenet300_100x_e10"}


# Runs of 20 epochs made before size_budget's guard steps: the values drifted after the half-way trim
# and the files ended 1.4-1.95% over the target (within 2%, but over); `_guard` re-runs them.
BEFORE_GUARD = {"compare_lenet300_100x_e20_paced_obd", "compare_lenet300_100x_e20_paced_obd_s0to2",
                "compare_lenet300_100x_e20_paced_obd_s3to4"}


def stale_trim(folder: str, variant: str) -> bool:
    return folder in STALE_TRIM and variant.startswith(("joint-fisher", "joint-bits"))


def superseded() -> set[str]:
    """The folders whose joint variant was re-run (and whose re-run has finished)."""
    return {old for new, old in SEQUENTIAL_FROM.items() if (ROOT / "benchmarks" / "results" / new / "compare.json").is_file()}


def load_compare(folder: str) -> dict | None:
    """A compare.json; for a joint-only re-run, with the sequential runs of the folder it replaces."""
    path = ROOT / "benchmarks" / "results" / folder / "compare.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    base_folder = SEQUENTIAL_FROM.get(folder, SEQUENTIAL_BESIDE.get(folder))
    if base_folder is None or not (ROOT / "benchmarks" / "results" / base_folder / "compare.json").is_file():
        return r
    r["sequential_from"] = (base_folder, _add_runs_from(r, folder, base_folder, "sequential"))
    r["joint_from"] = [(other, variant, _add_runs_from(r, folder, other, variant)) for other, variant in JOINT_BESIDE.get(folder, [])]
    return r


def _add_runs_from(r: dict, folder: str, other: str, variant: str) -> str | None:
    """Add `variant`'s runs of r's seeds from folder `other` (its teachers must be r's); its command."""
    base = json.loads((ROOT / "benchmarks" / "results" / other / "compare.json").read_text())
    teachers = lambda x: {u["seed"]: round(u["accuracy"], 6) for u in x.get("uncompressed", [])}  # noqa: E731
    mine, theirs = teachers(r), teachers(base)
    if any(theirs.get(seed) != acc for seed, acc in mine.items()):  # by seed: a later batch starts past 0
        raise SystemExit(f"{folder}: its teachers differ from {other}'s; {variant} cannot be paired from there")
    seeds = {row["seed"] for row in r.get("runs", []) if row["variant"] != variant}
    added = [row for row in base.get("runs", [])
             if row["variant"] == variant and row["seed"] in seeds and row["ratio_target"] in r["ratios"]]
    r["runs"] = r.get("runs", []) + added
    r["summary"] = (r.get("summary") or []) + summarize(added)  # over the paired seeds, not all of the other's
    r["variants"] = list(r["variants"]) + [variant]
    return base.get("command")


def pooled_into() -> dict[str, str]:
    """Folder -> the folder that pools its runs with another batch of seeds (benchmarks/pool_compare.py)."""
    into = {}
    for path in sorted((ROOT / "benchmarks" / "results").glob("compare_*/compare.json")):
        for part in json.loads(path.read_text()).get("pooled_from", []):
            into[Path(part["folder"]).name] = path.parent.name
    return into


def _reproduce(r: dict | None, model: str) -> str:
    """The command(s) that wrote a folder: for a pooled one, each batch's run, then the pooling."""
    cmd = (r or {}).get("command") or f"nice -n 10 .venv/bin/python benchmarks/compare_mnist.py --model {model}"
    runs = [f"`{part['command']}`" for part in (r or {}).get("pooled_from", [])]
    return ", then ".join(runs + [f"`{cmd}`"])


def seed_range(seeds: list[int]) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


def batch_lines(r: dict) -> list[str]:
    """For a pooled folder, each batch of seeds alone: does the pooled verdict hold in both halves?
    (A batch of one seed has no standard error: it is not listed.)"""
    lines = []
    for part in r.get("pooled_from", []):
        if len(part["seeds"]) < 2:
            continue
        runs = [row for row in r.get("runs", []) if row["seed"] in part["seeds"]]
        for ratio in r["ratios"]:
            for variant in (v for v in r["variants"] if v.startswith("joint")):
                lines.append(f"- Seeds {seed_range(part['seeds'])} alone (`{Path(part['folder']).name}`), "
                             f"{variant} at {ratio:g}x: {paired_difference(runs, variant, ratio)}.")
    return lines


def section(model: str, folder: str | None = None, title: str = "") -> list[str]:
    folder = folder or f"compare_{model}"
    r = load_compare(folder)
    lines = [f"## {MODELS[model]} on MNIST{title}", "",
             f"Reproduce: {_reproduce(r, model)} (then `python benchmarks/write_benchmarks_md.py`).", ""]
    if r is not None and r.get("pooled_from"):
        lines += [f"Seeds {', '.join(seed_range(p['seeds']) for p in r['pooled_from'])} ran as "
                  "separate batches of the same command (`--first-seed`; every seed trains its own teacher) and are "
                  "pooled here; each run stays in its batch's folder.", ""]
    if r is not None and r.get("sequential_from"):
        why = ("This folder adds a joint variant beside another" if folder in SEQUENTIAL_BESIDE
               else "The joint variant was re-run after a change to the joint mode only")
        lines += [f"{why}; its sequential runs are those of "
                  f"`{r['sequential_from'][0]}` (`{r['sequential_from'][1]}`), the same teachers and seeds.", ""]
    for other, variant, command in (r or {}).get("joint_from", []):
        lines += [f"Its {variant} runs are those of `{other}` (`{command}`), the same teachers and seeds.", ""]
    if model in REF:
        lines += [f"Deep Compression (Han et al. 2016): **{REF[model][0]:g}x at {REF[model][1]:.2f}% error**. "
                  f"Goal here: >= {GOAL[model][0]:g}x at <= {GOAL[model][1]:.2f}%.", ""]
    if r is None:
        return lines + ["**Not run yet**: no results file; the numbers will appear once the command above finishes.", ""]
    summary = r.get("summary") or []
    done = len(r.get("runs", []))
    expected = len(r["ratios"]) * r["seeds"] * len(r["variants"])
    lines.append(f"Setting: {r['epochs']} compression epochs, teacher {r.get('teacher_epochs')} epochs, ratios {r['ratios']}, "
                 f"{r['seeds']} seed(s), variants {', '.join(r['variants'])}; {done}/{expected} runs finished"
                 + (f", wall {r['wall_seconds'] / 60:.1f} min" if r.get("wall_seconds") else "") + ". "
                 "Ratio = fp32 safetensors file / artifact weights file on disk; error on the 10,000 test images.")
    lines.append("")
    if r.get("train_images") and r["train_images"] < 60_000:
        lines += [f"Training images: {r['train_images']:,} (class-balanced subset; the scarce-data case).", ""]
    if any(row["variant"].startswith("joint") for row in r.get("runs", [])) and not any("changed_share" in row for row in r.get("runs", [])):
        lines += ["**Measured with the earlier joint mode** (magnitude masks and LSQ at overlapping times, the allocator's "
                  "budgets: today's `overlap` variant), not yet re-run with the size-budget joint mode.", ""]
    base = [100 * (1 - u["accuracy"]) for u in r.get("uncompressed", [])]
    lines.append(f"Uncompressed teacher error: {', '.join(f'{b:.2f}%' for b in base)}.")
    lines += ["", "| variant | target | achieved ratio | error (mean) | error range over seeds | n |", "| --- | --- | --- | --- | --- | --- |"]
    for s in sorted(summary, key=lambda s: (s["ratio_target"], s["variant"])):
        lines.append(f"| {s['variant']} | {s['ratio_target']:g}x | {s['ratio_mean']:.1f}x | {100 * s['error_mean']:.2f}% | "
                     f"{100 * (1 - s['accuracy_max']):.2f}-{100 * (1 - s['accuracy_min']):.2f}% | {s['n']} |")
    lines += ["", f"![Pareto front](benchmarks/results/{folder}/pareto.png)", "", "Verdicts:", ""]
    lines += goal_lines(model, summary)
    for ratio in r["ratios"]:
        seq = next((s for s in summary if s["variant"] == "sequential" and s["ratio_target"] == ratio), None)
        joint = [s for s in summary if s["variant"].startswith("joint") and s["ratio_target"] == ratio]
        if seq is None or not joint:
            continue
        best = min(joint, key=lambda s: s["error_mean"])
        paired = paired_difference(r.get("runs", []), best["variant"], ratio)
        stats = paired_stats(r.get("runs", []), best["variant"], ratio)
        if stats is not None and best["error_mean"] < seq["error_mean"] and stats[0] + 2 * stats[1] >= 0:
            lines.append(f"- At {ratio:g}x joint's mean error is lower, within noise: {best['variant']} "
                         f"{100 * best['error_mean']:.2f}% vs {100 * seq['error_mean']:.2f}% error; {paired}.")
        elif best["error_mean"] < seq["error_mean"]:
            lines.append(f"- At {ratio:g}x joint is ahead of sequential: {best['variant']} {100 * best['error_mean']:.2f}% vs "
                         f"{100 * seq['error_mean']:.2f}% error; {paired}.")
        else:
            lines.append(f"- **At {ratio:g}x joint does not beat sequential**: best joint ({best['variant']}) "
                         f"{100 * best['error_mean']:.2f}% vs sequential {100 * seq['error_mean']:.2f}% error; {paired}.")
    lines += batch_lines(r)
    lines.append(f"- Size targets: {size_accuracy(r.get('runs', []))}")
    for s_ in summary:
        if s_.get("changed_share_mean") is not None and s_["variant"] != "sequential":
            flag = " **(changed nothing: it trained exactly like `none`)**" if s_.get("changed_nothing") else ""
            lines.append(f"- Coordination {s_['variant']} at {s_['ratio_target']:g}x changed the update on "
                         f"{100 * s_['changed_share_mean']:.0f}% of the measured steps, by {100 * s_['changed_mean']:.0f}% "
                         f"of its norm on average{flag}.")
    return lines + [""]


def goal_lines(model: str, summary: list[dict]) -> list[str]:
    """The goal's and Deep Compression's verdicts, for the models that have them."""
    if model not in REF:
        return []
    (ref_ratio, ref_err), (goal_ratio, goal_err) = REF[model], GOAL[model]
    met = [s for s in summary if s["ratio_mean"] >= goal_ratio and 100 * s["error_mean"] <= goal_err]
    if met:
        lines = [f"- Goal met by: {', '.join(sorted({s['variant'] for s in met}))}."]
    else:
        best = min(summary, key=lambda s: s["error_mean"]) if summary else None
        lines = [f"- **Goal missed**: no variant reached >= {goal_ratio:g}x at <= {goal_err:.2f}% error"
                 + (f" (lowest error {100 * best['error_mean']:.2f}% at {best['ratio_mean']:.1f}x, {best['variant']})." if best else ".")]
    beats_dc = [s for s in summary if s["ratio_mean"] >= ref_ratio and 100 * s["error_mean"] <= ref_err]
    return lines + [f"- {'Matches or beats' if beats_dc else 'Does **not** match'} Deep Compression's point "
                    f"({ref_ratio:g}x at {ref_err:.2f}%)" + (f": {', '.join(sorted({s['variant'] for s in beats_dc}))}." if beats_dc else ".")]


def point_rows() -> list[dict]:
    """Every compare point measured with today's joint mode, one record per joint variant, paired
    by seed against the folder's sequential runs (± one standard error)."""
    rows = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("compare_*/compare.json")):
        if path.parent.name in superseded():
            continue  # its joint variant was re-run (SEQUENTIAL_FROM)
        r = _finished(load_compare(path.parent.name))
        if r is None:
            continue  # a run still in progress (its compare.json is rewritten after every run)
        runs = r.get("runs", [])
        if not any("changed_share" in row for row in runs):
            continue  # measured with the earlier joint mode
        if r.get("device", "cpu") != "cpu":
            continue  # a run on a GPU: its own section (gpu_section), beside the CPU runs of its point
        quant = next((t for t in r["recipe"]["techniques"] if t["type"] == "quant_lsq"), {})
        bits = quant.get("bits", "-")
        if quant.get("norm_format", "fp32") != "fp32":  # normalization layers stored narrower: another point
            bits = f"{bits}, {quant['norm_format']} norms"
        if quant.get("scale_format", "fp16") != "fp16":  # step sizes stored another way: another point too
            bits = f"{bits}, {quant['scale_format']} steps"
        if r["recipe"].get("training", {}).get("recalibrate_norms"):  # BatchNorm re-estimated before each evaluation
            bits = f"{bits}, norms re-estimated"
        for ratio in r["ratios"]:
            seq = next((s for s in r["summary"] if s["variant"] == "sequential" and s["ratio_target"] == ratio), None)
            # another folder's point, or a baseline (sequential-sens has its own section, stronger_baseline_section)
            borrowed = ("sequential", "overlap", "sequential-sens", "sequential-norefit",
                        *(v for _, v, _ in r.get("joint_from", [])))
            for s in sorted((s for s in r["summary"] if s["ratio_target"] == ratio and s["variant"] not in borrowed),
                            key=lambda s: s["variant"]):
                st = paired_stats(runs, s["variant"], ratio)
                if seq is None or st is None:
                    continue
                mine = [row for row in runs if row["variant"] == s["variant"] and row["ratio_target"] == ratio and row.get("target_bytes")]
                rows.append({"model": r["model"], "ratio": ratio, "images": r.get("train_images", 60000), "bits": bits,
                             "epochs": r["epochs"], "teacher_epochs": r.get("teacher_epochs"), "keep": _keep_rule(r),
                             "variant": s["variant"],
                             "folder": path.parent.name,
                             # the sequential runs paired from another folder (same teachers, checked), named beside it
                             "sequential_folder": (r.get("sequential_from") or (None,))[0],
                             "joint": s["error_mean"], "sequential": seq["error_mean"], "stats": st,
                             "landed": sum(abs(row["file_bytes"] / row["target_bytes"] - 1) <= 0.02 for row in mine),
                             "runs": len(mine), "teacher": teacher_error(r),
                             "per_seed": {row["seed"]: (row["error"], row["file_bytes"]) for row in mine},
                             "teachers": {u["seed"]: u["accuracy"] for u in r.get("uncompressed", [])},
                             "collapsed": _collapsed(r, runs, s["variant"], ratio)})
    return rows


COLLAPSED_WORDS = ("A side marked nearer chance than its teachers (its mean accuracy closer to chance, 10%, than to "
                   "the teachers') failed to train at that point: its difference measures the failure, not a method's "
                   "lead.")
STORED_CLASSES = 10  # every folder here is MNIST's (or its 2,000-image subsets): what a result without "classes" had


def _collapsed(r: dict, runs: list[dict], variant: str, ratio: float) -> list[str]:
    """The sides of a point nearer chance than their teachers (compare.collapsed_sides), over the seeds both ran."""
    point = next(p for p in paired_differences(runs) if p["variant"] == variant and p["ratio_target"] == ratio)
    return [c["variant"] for c in collapsed_sides({**r, "classes": r.get("classes", STORED_CLASSES)}, point)]


def _keep_rule(r: dict) -> str:
    """How a folder's runs chose the epoch they ended with: "best" on the test split (every stored folder
    without a record of it), "last kept", or the best on training images held out (training.validation_images)."""
    if r.get("keep", "best") == "last":
        return "last kept"
    held = r.get("recipe", {}).get("training", {}).get("validation_images", 0)
    return f"best on {held:,} held-out training images" if held else "best"


def _epochs_cell(r: dict) -> str:
    """A folder's epochs, the rule that chose the kept one, and its teachers' epochs where not the default."""
    teachers = r.get("teacher_epochs")
    shown = teachers not in (None, DEFAULT_TEACHER_EPOCHS.get(r["model"]))
    return f"{r['epochs']}, {_keep_rule(r)}" + (f"; teachers {teachers}" if shown else "")


def _paired_cell(st: tuple | None, words: tuple[str, str] = ("joint", "sequential")) -> str:
    """paired_stats' (mean, standard error, n) as a table cell with its verdict, "-" without a pair."""
    return "-" if st is None else f"{st[0]:+.2f} ± {st[1]:.2f} (n={st[2]}) {_verdict(st[0], st[1], words)}"


def teacher_error(r: dict) -> float | None:
    """The uncompressed teachers' mean error over the folder's seeds (the floor both methods chase)."""
    accs = [u["accuracy"] for u in r.get("uncompressed", [])]
    return 1 - statistics.mean(accs) if accs else None


def _verdict(mean: float, se: float, words: tuple[str, str] = ("joint", "sequential")) -> str:
    if not beyond_two_se(mean, se):
        return "tie"
    return f"**{words[0]} better**" if mean < 0 else f"**{words[1]} better**"


def _row_cells(p: dict, variant_text: str) -> str:
    mean, se, n = p["stats"]
    landed = f"{p['landed']}/{p['runs']}" + ("" if p["landed"] == p["runs"] else " **(missed the target)**")
    epochs = p["epochs"] if p["keep"] == "best" else f"{p['epochs']}, {p['keep']}"  # docs/reliability.md
    if p.get("teacher_epochs") not in (None, DEFAULT_TEACHER_EPOCHS.get(p["model"])):
        epochs = f"{epochs}; teachers {p['teacher_epochs']}"
    return (f"| {MODELS[p['model']]} | {p['ratio']:g}x | {p['images']:,} | {p['bits']} | {epochs} | {variant_text} | "
            f"{100 * p['joint']:.2f}% | {100 * p['sequential']:.2f}% | {mean:+.2f} ± {se:.2f} (n={n}) | {_verdict(mean, se)}"
            f"{_collapsed_words(p.get('collapsed'))} | {landed} | `{p['folder']}`{_sequential_from(p)} |")


def _sequential_from(p: dict) -> str:
    """The folder a row's sequential runs come from where it is not the row's own (a reader recomputing the row from
    the folder it names found no sequential runs there)."""
    other = p.get("sequential_folder")
    return f" (sequential: `{other}`)" if other and other != p["folder"] else ""


def _collapsed_words(sides: list[str] | None) -> str:
    """Beside a verdict: the sides whose mean accuracy is nearer chance than their teachers' (a failed run, not a
    method's lead or loss)."""
    if not sides:
        return ""
    whose = "their" if len(sides) > 1 else "its"
    return f" ({' and '.join('joint' if v != 'sequential' else v for v in sides)} nearer chance than {whose} teachers)"


TABLE_HEAD = ["| model | target | training images | bits | epochs | joint variant | joint error | sequential error | "
              "difference | verdict | joint files within 2% of the target | results |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
HEADLINE_VARIANT = "joint-paced-obd-none"
HEADLINE_BASE = "joint-paced-none"  # the same recipe with the landing's default (margin) order
HEADLINE_INTRO = ("The benchmarks' recipe (described above; `recipes/lenet300_mnist_joint.yaml` ships it; the last column: "
                  "the same recipe landing in the margin order, since the Fisher order only acts where the landing cuts "
                  "before the freeze). ")
JOINT_FORM_INTRO = ("What `mode: joint` trains under a size target (the joint form, `joint_form.py`: Fisher estimate in the "
                    "landing only, described above; at 2 bits its kept weights on the nonzero grid, below). ")


# compare_mnist.py's teacher epochs per model; a folder whose teachers trained longer says so in its epochs cell
DEFAULT_TEACHER_EPOCHS = {"lenet300": 6, "lenet5": 3, "resnet": 3, "mobilenet": 3, "seqcnn": 3, "vit": 3, "lstm": 3}


def _point_key(p: dict) -> tuple:
    return p["model"], p["ratio"], p["images"], p["bits"], p["epochs"], p.get("teacher_epochs"), p["keep"]


# re-runs of a stored point made only to pair other variants with today's teachers, where the headline
# keeps the stored point (both are in the full table); and points re-measured after the kept-weight count fix
# (docs/joint.md), whose later folder the headline takes
HEADLINE_SKIP = {"compare_lenet5_200x_2k_obd_seq",
                 "compare_vit_30x_2k_obdland",  # compare_vit_30x_2k_obdland_fixed
                 "compare_lenet5_200x_2k_rank_land",  # compare_lenet5_2k_obdland
                 # sequential as run by default loses about half a point to its own re-fit on LSQ's rounding there;
                 # longer_two_bit_section sets joint beside sequential-norefit, the stronger baseline
                 "compare_lenet300_100x_2bit_t15_e12_val"}


def most_seeds(points: list[dict], variant: str) -> dict[tuple, dict]:
    """Per point, the variant's folder with the most paired seeds."""
    best: dict[tuple, dict] = {}
    for p in points:
        key = _point_key(p)
        if p["folder"] in HEADLINE_SKIP:
            continue
        if p["variant"] == variant and (key not in best or p["stats"][2] > best[key]["stats"][2]):
            best[key] = p
    return best


def same_as_base(p: dict, base: dict | None, base_variant: str = HEADLINE_BASE) -> str:
    """Whether the headline recipe's runs are the base recipe's runs, seed by seed (error and bytes):
    the Fisher order only acts where the landing cuts before the freeze, so elsewhere they must be."""
    if base is None:
        return "-"
    common = sorted(set(p["per_seed"]) & set(base["per_seed"]))
    if any(p["teachers"].get(s) != base["teachers"].get(s) for s in common):  # run on another machine
        return f"{base_variant}: {100 * base['joint']:.2f}%, other teachers (another machine), not paired"
    differ = [s for s in common if p["per_seed"][s] != base["per_seed"][s]]
    if not differ:
        return f"same files ({len(common)}/{len(common)} seeds)"
    return f"{base_variant}: {100 * base['joint']:.2f}%, differs on {len(differ)}/{len(common)} seeds"


def headline_table(points: list[dict], variant: str = HEADLINE_VARIANT, base_variant: str = HEADLINE_BASE,
                   intro: str = "", at_two_bits: str | None = None) -> list[str]:
    """One joint recipe (`variant`) at every point it ran, from the folder with the most paired seeds at
    that point: what a user who picks one recipe gets, wins and losses alike; the last column sets its
    runs beside `base_variant`'s, seed by seed. `at_two_bits`: the variant that recipe trains at 2 bits (the joint
    form's nonzero grid, joint_form.joint_form_variant), whose runs stand in for `variant`'s at those points."""
    best, base = most_seeds(points, variant), most_seeds(points, base_variant)
    if at_two_bits is not None:
        best = {k: p for k, p in best.items() if p["bits"] != NONZERO_GRID_BITS}
        best.update({k: p for k, p in most_seeds(points, at_two_bits).items() if p["bits"] == NONZERO_GRID_BITS})
    if not best:
        return []
    rows = [_row_cells(p, p["variant"]) + (f" {100 * p['teacher']:.2f}% |" if p["teacher"] is not None else " - |")
            + f" {same_as_base(p, base.get(key), base_variant)} |"
            for key, p in sorted(best.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1], kv[0][4], kv[0][5]))]
    named = f"`{variant}`" + (f" (`{at_two_bits}` at {NONZERO_GRID_BITS} bits)" if at_two_bits else "")
    return [f"## One joint recipe at every point ({variant}{f'; {at_two_bits} at 2 bits' if at_two_bits else ''})", "",
            f"{intro}{named} against sequential at "
            "every point where it ran, each from the folder with the most seeds at that point (the full table below lists "
            "every folder). Paired by seed, ± one standard error; a difference counts only beyond 2 standard errors. "
            f"{COLLAPSED_WORDS} The teacher's error (uncompressed, same seeds) is the floor both chase: where both sit on it there is no gap for "
            f"joint to close. The last column compares each seed's error and file bytes with `{base_variant}`.", "",
            TABLE_HEAD[0] + f" teacher error | vs {base_variant} |", TABLE_HEAD[1] + " --- | --- |", *rows, ""]


def points_table(points: list[dict]) -> list[str]:
    """Every point and joint variant: the summary the sections below explain."""
    rows = [_row_cells(p, p["variant"] + (" †" if stale_trim(p["folder"], p["variant"]) else "")
                       + (" ‡" if p["folder"] in BEFORE_GUARD else "")) for p in points]
    if not rows:
        return []
    return ["## Every point, joint vs sequential", "",
            "Joint − sequential error in points, paired by seed (same teacher, data and target), ± one standard error; "
            f"a difference counts only beyond 2 standard errors. {COLLAPSED_WORDS} Bytes = the weights file on disk; a joint variant that "
            "missed its target bytes is not a fair comparison. Error on the 10,000 "
            "MNIST test images. Each folder's section below gives the command and details. "
            f"Folders measured with today's landing (channel floors in the projection, catch-up before the freeze): "
            f"{', '.join(f'`{new}`' for new, old in SEQUENTIAL_FROM.items() if old in superseded())}; the others with the projection before it "
            "(`compare_lenet5_100x_v2` against `compare_lenet5_100x` shows how little it moves a 60,000-image point). † measured before a fix of the pattern cache: the half-way re-projection of "
            "`finetune_phase` read a stale file and flipped up to 3x the decisions it needed (docs/joint.md); "
            "the `*_fixed` folders re-measure those points after the fix. ‡ measured before the size budget's guard steps: "
            "over 20 epochs the fine-tuned values moved the file after the trim, and it ended 1.4-1.95% over the target "
            "(`compare_lenet300_100x_e20_paced_obd_guard` re-measures the point).", "",
            *TABLE_HEAD, *rows, ""]


# folders where the sequential baseline also ran on the sensitivity allocator's budgets (compare's sequential-sens)
STRONGER_BASELINE = ("compare_lenet5_sens_val", "compare_lenet5_2k_sens_val", "compare_lenet300_100x_sens_val",
                     "compare_lenet300_100x_2k_sens_val")


def stronger_baseline_section(folders=STRONGER_BASELINE) -> list[str]:
    """Joint against both baselines at the points where sequential also trained the sensitivity allocator's budgets:
    the strongest baseline the library offers (a reviewer's doubt: the ERK proxy is the weaker allocator)."""
    rows = []
    for folder in folders:
        r = _finished(load_compare(folder))
        if r is None:
            continue
        runs = r["runs"]
        for ratio in r["ratios"]:
            cells = []
            for variant in (JOINT_FORM_VARIANT, "sequential", "sequential-sens"):
                mine = [x for x in runs if x["variant"] == variant and x["ratio_target"] == ratio]
                if not mine:
                    break
                error = statistics.fmean(x["error"] for x in mine)
                files = statistics.fmean(x["file_bytes"] / x["target_bytes"] for x in mine)
                cells.append(f"{100 * error:.2f}% ({files:.3f})")
            if len(cells) < 3:
                continue
            pairs = []
            for variant, baseline, words in ((JOINT_FORM_VARIANT, "sequential-sens", ("joint", "sequential-sens")),
                                             ("sequential-sens", "sequential", ("sensitivity", "ERK"))):
                st = paired_stats(runs, variant, ratio, baseline)
                pairs.append(_paired_cell(st, words))
            epochs = _epochs_cell(r)
            rows.append(f"| {MODELS[r['model']]} | {ratio:g}x | {r.get('train_images', 60000):,} | {epochs} | "
                        f"{' | '.join(cells)} | {pairs[0]} | {pairs[1]} | `{folder}` |")
    if not rows:
        return []
    return ["## The sequential baseline on the sensitivity allocator's budgets (sequential-sens)", "",
            "`sequential` trains the allocator's ERK-proxy budgets (from the layers' shapes); `sequential-sens` the budgets the "
            "allocator makes from a sensitivity scan of each seed's teacher (each layer pruned and rounded alone, read on the "
            "held-out training images the runs choose their epoch on; kept as `teachers/s<seed>.sensitivity.json`), the "
            "allocator's measured mode (`target.allocator: sensitivity`), which a reviewer expected to be the stronger "
            "baseline. Same teacher, steps, distillation and target "
            f"bytes; the joint variant is `{JOINT_FORM_VARIANT}` (what `mode: joint` trains). Error on the 10,000 test "
            "images, mean over seeds, with each variant's file over its target in brackets (a file far under its target spent "
            "fewer bytes: at 2 bits, which the scan often allows, many kept weights round to zero); differences paired by "
            "seed, ± one standard error, counted only beyond 2 standard errors.", "",
            "| model | target | training images | epochs | joint error (file/target) | sequential error (file/target) | "
            "sequential-sens error (file/target) | joint − sequential-sens | sequential-sens − sequential | results |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            *[f"Reproduce: `{r['command']}`." for r in (_finished(load_compare(f)) for f in folders) if r and r.get("command")],
            ""]


# (a folder at 3 bits, the folder of the same command at 4 bits): the same teachers, seeds, steps and target bytes,
# only quant_lsq.bits differs (benchmarks/compare_mnist.py --bits 3). The 4-bit commands were run again beside the
# 3-bit ones (_rerun, and the batches pooled into _20seeds): the earlier folders' teachers differ on some seeds.
BIT_CHOICE = (("compare_lenet300_60x_3bit_val", "compare_lenet300_60x_val_rerun"),
              ("compare_lenet300_100x_3bit_val", "compare_lenet300_100x_sens_val"),
              ("compare_lenet300_100x_e10_t20_3bit_val", "compare_lenet300_100x_e10_t20_val_rerun"),
              ("compare_lenet300_60x_2k_3bit_val_10seeds", "compare_lenet300_60x_2k_obdland_val_10seeds_rerun"),
              ("compare_lenet300_100x_2k_3bit_val_20seeds", "compare_lenet300_100x_2k_obdland_val_20seeds"),
              ("compare_lenet5_3bit_val", "compare_lenet5_sens_val"), ("compare_lenet5_2k_3bit_val", "compare_lenet5_2k_sens_val"))


# said where a section's held-out column reads histories its committed folders lack
HISTORIES_NOT_KEPT = " The held-out choice reads each run's held-out accuracy from its history.json, which the four 2-bit folders (`compare_lenet300_2bit_val`, `compare_lenet300_2k_2bit_val`, `compare_lenet5_2bit_val`, `compare_lenet5_2k_2bit_val`) were committed without: that column is as this script wrote it where they were present, and cannot be recomputed from a checkout; their Reproduce commands remake it (compare.json now keeps each run's held-out reading, kept_metric, itself)."


class MissingHistory(FileNotFoundError):
    """A run's history.json, which the runs' folders (benchmarks/results/*/runs/, ignored by git) hold only where
    the run was made or its folder was committed with them."""


def _kept_validation(folder: str, row: dict) -> float:
    """The held-out reading of the epoch a run kept, which chose nothing on the test split: compare.json's
    kept_metric, or the run's history's best_metric in folders written before compare stored it."""
    if row.get("kept_metric") is not None:
        return row["kept_metric"]
    history = ROOT / "benchmarks" / "results" / folder / row["dir"] / "history.json"
    if not history.is_file():
        raise MissingHistory(f"{history.relative_to(ROOT)} is not in this checkout")
    return json.loads(history.read_text())["best_metric"]


def section_or_last(build: Callable[[], list[str]], heading: str) -> list[str]:
    """A section whose runs' histories this checkout lacks: its text as BENCHMARKS.md holds it (written by this
    script where the histories were present), said on stderr, rather than a section with its columns blanked."""
    try:
        return build()
    except MissingHistory as exc:
        lines = (ROOT / "BENCHMARKS.md").read_text().split("\n")
        if heading not in lines:
            raise
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        print(f"{heading[3:]}: kept as last written ({exc})", file=sys.stderr)
        return lines[start:end]


def _at_bits(folder: str, bits: int) -> tuple[dict | None, list[dict]]:
    """A folder's joint-form and sequential runs renamed "<variant>@<bits>", so that paired_stats pairs them by seed
    across folders."""
    r = _finished(load_compare(folder))
    if r is None:
        return None, []
    runs = [{**row, "variant": f"{row['variant']}@{bits}", "validation": _kept_validation(folder, row)}
            for row in r["runs"] if row["variant"] in (JOINT_FORM_VARIANT, "sequential")]
    return r, runs


def _chosen_bits(runs: list[dict], variant: str, ratio: float) -> int:
    """The width whose runs read best, on average over the seeds, on the held-out images that chose their epochs."""
    def reading(bits: int) -> float:
        return statistics.fmean(x["validation"] for x in runs if x["variant"] == f"{variant}@{bits}" and x["ratio_target"] == ratio)
    return max((3, 4), key=reading)


def _bit_choice_cells(runs: list[dict], ratio: float) -> str:
    """One point's cells: each method's error (file/target) at 3 and 4 bits, then joint − sequential both at 3, both
    at 4, joint at 3 against sequential at 4, and each at the width its held-out images chose."""
    cells = []
    for variant in (JOINT_FORM_VARIANT, "sequential"):
        for bits in (3, 4):
            mine = [x for x in runs if x["variant"] == f"{variant}@{bits}" and x["ratio_target"] == ratio]
            files = statistics.fmean(x["file_bytes"] / x["target_bytes"] for x in mine)
            cells.append(f"{100 * statistics.fmean(x['error'] for x in mine):.2f}% ({files:.3f})")
    chosen = {v: _chosen_bits(runs, v, ratio) for v in (JOINT_FORM_VARIANT, "sequential")}
    for jb, sb in ((3, 3), (4, 4), (3, 4), (chosen[JOINT_FORM_VARIANT], chosen["sequential"])):
        st = paired_stats(runs, f"{JOINT_FORM_VARIANT}@{jb}", ratio, f"sequential@{sb}")
        cells.append(_paired_cell(st))
    cells[-1] = f"{chosen[JOINT_FORM_VARIANT]} / {chosen['sequential']}: {cells[-1]}"
    return " | ".join(cells)


def bit_choice_section(pairs=BIT_CHOICE) -> list[str]:
    """Each method at 3 and at 4 bits on the same teachers: does joint win only at the width it likes, or also against
    sequential at sequential's own better width? The width each method gets is chosen on the held-out images."""
    rows, commands, unpaired = [], [], []
    for low, high in pairs:
        (r3, runs3), (r4, runs4) = _at_bits(low, 3), _at_bits(high, 4)
        if r3 is None or r4 is None:
            continue
        teachers = [{u["seed"]: u["accuracy"] for u in r.get("uncompressed", [])} for r in (r3, r4)]
        if any(teachers[1].get(seed) != acc for seed, acc in teachers[0].items()):
            unpaired.append(f"`{low}` and `{high}`")  # other teachers: said, not paired
            continue
        epochs = _epochs_cell(r3)
        for ratio in (x for x in r3["ratios"] if x in r4["ratios"]):
            rows.append(f"| {MODELS[r3['model']]} | {ratio:g}x | {r3.get('train_images', 60000):,} | {epochs} | "
                        f"{_bit_choice_cells(runs3 + runs4, ratio)} | `{low}`, `{high}` |")
        commands += [_reproduce(r, r["model"]) for r in (r3, r4)]
    if not rows and not unpaired:
        return []
    skipped = ([f"Not paired (their teachers differ on some seed): {', '.join(unpaired)}.", ""] if unpaired else [])
    return ["## Bits as a choice: each method at 3 and at 4 bits", "",
            "The same command at `--bits 3` and `--bits 4` (same teachers, seeds, steps and target bytes): the 3-bit "
            "file keeps about a third more weights, each on a coarser grid. Error on the test split, mean over seeds, with "
            "the weights file over its target in brackets; "
            f"joint is `{JOINT_FORM_VARIANT}`, sequential the ERK-budget baseline. Differences paired by seed, ± one "
            "standard error, counted only beyond 2 standard errors. \"joint 3 − sequential 4\" sets joint at 3 bits "
            "against sequential at 4; the last difference gives each method the width whose runs read best on the held-out "
            "training images that chose their epochs (mean over seeds; the test split chose nothing).", "",
            "| model | target | training images | epochs | joint 3-bit | joint 4-bit | sequential 3-bit | sequential 4-bit | "
            "joint − sequential, both 3-bit | both 4-bit | joint 3 − sequential 4 | each at its held-out choice (joint / "
            "sequential bits) | results |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            *(["Reproduce: " + "; ".join(commands) + ".", ""] if commands else []), *skipped]


# (the 2-bit folder, the target, the same command's 3-bit and 4-bit folders): every point where the joint form and
# sequential also ran at 2 bits, on the same teachers
TWO_BIT_POINTS = (("compare_lenet300_2bit_val", 60.0, "compare_lenet300_60x_3bit_val", "compare_lenet300_60x_val_rerun"),
                  ("compare_lenet300_2bit_val", 100.0, "compare_lenet300_100x_3bit_val", "compare_lenet300_100x_sens_val"),
                  ("compare_lenet300_2k_2bit_val", 60.0, "compare_lenet300_60x_2k_3bit_val_10seeds",
                   "compare_lenet300_60x_2k_obdland_val_10seeds_rerun"),
                  ("compare_lenet300_2k_2bit_val", 100.0, "compare_lenet300_100x_2k_3bit_val_20seeds",
                   "compare_lenet300_100x_2k_obdland_val_20seeds"),
                  ("compare_lenet5_2bit_val", 100.0, "compare_lenet5_3bit_val", "compare_lenet5_sens_val"),
                  ("compare_lenet5_2bit_val", 200.0, "compare_lenet5_3bit_val", "compare_lenet5_sens_val"),
                  ("compare_lenet5_2k_2bit_val", 100.0, "compare_lenet5_2k_3bit_val", "compare_lenet5_2k_sens_val"),
                  ("compare_lenet5_2k_2bit_val", 200.0, "compare_lenet5_2k_3bit_val", "compare_lenet5_2k_sens_val"))
# the one-shot projection's picks (benchmarks/bit_choice_proxy.py) on the 2-bit folders' teachers
PROXY_RESULTS = {"compare_lenet300_2bit_val": "bit_choice_proxy_lenet300.json",
                 "compare_lenet300_2k_2bit_val": "bit_choice_proxy_lenet300_2k.json",
                 "compare_lenet5_2bit_val": "bit_choice_proxy_lenet5.json",
                 "compare_lenet5_2k_2bit_val": "bit_choice_proxy_lenet5_2k.json"}


def _proxy_picks(folder: str, ratio: float) -> str:
    """The widths the one-shot projection picked by its loss (Fisher-ranked / magnitude-ranked), over the seeds."""
    r = _load(PROXY_RESULTS.get(folder, ""))
    if r is None:
        return "-"
    picks = {rank: sorted(row["chosen_by_loss"] for rows in r["seeds"].values() for row in rows
                          if row["ratio"] == ratio and row["rank"] == rank) for rank in ("fisher", "magnitude")}
    return " / ".join(",".join(str(b) for b in picks[rank]) or "-" for rank in ("fisher", "magnitude"))


def _two_bit_row(folder: str, ratio: float, low: str, high: str) -> tuple[str, list[str]] | None:
    """One point's row (each method at 2 bits, paired differences, the held-out choice among 2, 3 and 4 bits, the
    projection's pick) and the commands of its folders; None where a folder is missing or its teachers differ."""
    results = [_at_bits(name, bits) for name, bits in ((folder, 2), (low, 3), (high, 4))]
    if any(r is None for r, _ in results):
        return None
    teachers = [{u["seed"]: u["accuracy"] for u in r.get("uncompressed", [])} for r, _ in results]
    if any(t.get(seed) != acc for t in teachers[1:] for seed, acc in teachers[0].items()):
        return None
    runs = [x for _, rs in results for x in rs]
    r2 = results[0][0]

    def at(variant: str, bits: int) -> list[dict]:
        return [x for x in runs if x["variant"] == f"{variant}@{bits}" and x["ratio_target"] == ratio]

    cells = []
    for variant in (JOINT_FORM_VARIANT, "sequential"):
        mine = at(variant, 2)
        files = statistics.fmean(x["file_bytes"] / x["target_bytes"] for x in mine)
        cells.append(f"{100 * statistics.fmean(x['error'] for x in mine):.2f}% ({files:.3f})")
    chosen = {v: max((2, 3, 4), key=lambda b: statistics.fmean(x["validation"] for x in at(v, b)))
              for v in (JOINT_FORM_VARIANT, "sequential")}
    for (jv, jb), (sv, sb) in (((JOINT_FORM_VARIANT, 2), ("sequential", 2)),
                               ((JOINT_FORM_VARIANT, 2), (JOINT_FORM_VARIANT, 3)),
                               ((JOINT_FORM_VARIANT, chosen[JOINT_FORM_VARIANT]), ("sequential", chosen["sequential"]))):
        st = paired_stats(runs, f"{jv}@{jb}", ratio, f"{sv}@{sb}")
        words = ("joint", "sequential") if sv == "sequential" else ("2 bits", "3 bits")
        cells.append(_paired_cell(st, words))
    cells[-1] = f"{chosen[JOINT_FORM_VARIANT]} / {chosen['sequential']}: {cells[-1]}"
    epochs = _epochs_cell(r2)
    row = (f"| {MODELS[r2['model']]} | {ratio:g}x | {r2.get('train_images', 60000):,} | {epochs} | {' | '.join(cells)} | "
           f"{_proxy_picks(folder, ratio)} | `{folder}`, `{low}`, `{high}` |")
    proxy = _load(PROXY_RESULTS.get(folder, ""))
    return row, [_reproduce(r, r["model"]) for r, _ in results] + ([f"`{proxy['command']}`"] if proxy else [])


def two_bit_section(points=TWO_BIT_POINTS) -> list[str]:
    """Both methods at 2 bits beside their 3- and 4-bit runs, and the width a one-shot projection of the teacher picks:
    where the joint form loses, and why the width is not chosen before training."""
    rows, commands = [], []
    for folder, ratio, low, high in points:
        made = _two_bit_row(folder, ratio, low, high)
        if made is not None:
            rows.append(made[0])
            commands += [c for c in made[1] if c not in commands]
    if not rows:
        return []
    return ["## Two bits, and choosing the width before training (what did not work)", "",
            "The commands of \"Bits as a choice\" again at `--bits 2` (the same teachers, seeds, steps and target bytes; "
            "measured later, at today's code, while the 3- and 4-bit folders are older). At 2 bits each kept weight is "
            "plus or minus its channel's step. Error on the test split, mean over seeds, the weights file over its target "
            "in brackets; differences paired by seed, ± one standard error, counted only beyond 2 standard errors. \"held-out "
            "choice\" gives each method the width among 2, 3 and 4 whose runs read best on the held-out training images "
            "(mean over seeds). The last column: the width a one-shot projection of each seed's teacher picks "
            "(`benchmarks/bit_choice_proxy.py`: for each width from 2 to 8, keep the weights that fit the target's bytes, "
            "ranked by Fisher cost or by magnitude, round them, read the loss on 2,000 training images), one pick per seed, "
            "Fisher-ranked / magnitude-ranked."
            + HISTORIES_NOT_KEPT, "",
            "| model | target | training images | epochs | joint 2-bit | sequential 2-bit | joint − sequential, both 2-bit | "
            "joint 2-bit − joint 3-bit | each at its held-out choice of 2, 3, 4 (joint / sequential bits) | "
            "one-shot projection picks | results |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            "How to read it. At 2 bits the joint form loses to sequential where it has few images (LeNet-300-100 at "
            "60x and 100x, LeNet-5 at 200x, with 2,000): its kept weights are held non-zero, each at plus or minus its "
            "step, while sequential's LSQ rounds the small ones of its masks to zero, so its files land under their "
            "targets (the brackets) and still read better. Sequential's held-out images choose 2 bits at most points, "
            "where \"Bits as a choice\" allowed it only 3 or 4; given that choice, joint keeps its lead on LeNet-5 and "
            "on LeNet-300-100 at 100x with 55,000 images, and ties at the other LeNet-300-100 points. The one-shot "
            "projection of the teacher picks 2 bits at most seeds (ranked by magnitude, at every one): it reads the "
            "pruning's damage, which training mostly repairs, as worse than the rounding's, where the joint form's "
            "trained runs read best at 3 or 4: "
            "a width chosen before training would have been the wrong one, so the joint form keeps `quant_lsq.bits`.",
            "", "Reproduce: " + "; ".join(commands) + ".", ""]


NONZERO_GRID_VARIANT = "joint-paced-obdland-nz-none"
# (folder, ratio): the joint form, the joint form on the nonzero grid and sequential in one command
NONZERO_GRID_POINTS = (("compare_lenet300_2bit_nz_val", 60.0), ("compare_lenet300_2bit_nz_val", 100.0),
                       ("compare_lenet5_2bit_nz_val", 100.0), ("compare_lenet5_2bit_nz_val", 200.0),
                       ("compare_lenet300_2k_2bit_nz_val", 60.0), ("compare_lenet300_2k_2bit_nz_val", 100.0),
                       ("compare_lenet5_2k_2bit_nz_val_6seeds", 100.0), ("compare_lenet5_2k_2bit_nz_val_6seeds", 200.0),
                       ("compare_lenet300_100x_2k_3bit_nz_val", 100.0),
                       ("compare_lenet5_2k_3bit_nz_val", 100.0), ("compare_lenet5_2k_3bit_nz_val", 200.0),
                       ("compare_lenet300_100x_2k_4bit_nz_val_10seeds", 100.0),
                       ("compare_lenet300_60x_2k_4bit_nz_val_10seeds", 60.0),
                       ("compare_lenet300_2k_2bit_nz_smaller_val", 117.0), ("compare_lenet300_2k_2bit_nz_smaller_val", 150.0))


def _nonzero_grid_row(folder: str, ratio: float) -> tuple[str, str] | None:
    """One point's row: the joint form, the nonzero grid and sequential; None where the folder is missing."""
    return _three_way_row(folder, ratio, JOINT_FORM_VARIANT, NONZERO_GRID_VARIANT, ("nonzero grid", "joint"))


def _three_way_row(folder: str, ratio: float, before: str, after: str, words: tuple[str, str],
                   kept: bool = False) -> tuple[str, str] | None:
    """One point's row of a change to a joint recipe (`before` -> `after`, both beside sequential in one command):
    each variant's mean error and file over its target, `after` paired against sequential and against `before`,
    `before` against sequential (with `kept`, each joint variant's kept weights per layer, mean over seeds), and the
    folder's command; None where the folder or `after` or sequential is missing."""
    r = load_compare(folder)
    if r is None:
        return None
    runs = [x for x in r["runs"] if x["ratio_target"] == ratio]
    ran = {x["variant"] for x in runs}
    if not {after, "sequential"} <= ran:
        return None
    cells = []
    for variant in (before, after, "sequential"):
        mine = [x for x in runs if x["variant"] == variant]
        files = statistics.fmean(x["file_bytes"] / x["target_bytes"] for x in mine) if mine else None
        cells.append(f"{100 * statistics.fmean(x['error'] for x in mine):.2f}% ({files:.3f})" if mine else "not run")
    for base, pair in (("sequential", (words[0], "sequential")), (before, words)):
        cells.append(_paired_cell(paired_stats(runs, after, ratio, base), pair) if base in ran else "-")
    cells.append(_paired_cell(paired_stats(runs, before, ratio, "sequential")) if before in ran else "-")
    if kept:
        cells += [_kept_cell([x for x in runs if x["variant"] == variant]) for variant in (before, after, "sequential")]
    bits = next((t.get("bits", "-") for t in r["recipe"]["techniques"] if t["type"] == "quant_lsq"), "-")
    row = (f"| {MODELS[r['model']]} | {ratio:g}x | {r.get('train_images', 60000):,} | {bits} | "
           f"{_epochs_cell(r)} | {' | '.join(cells)} | `{folder}` |")
    return row, _reproduce(r, r["model"])


def _kept_cell(runs: list[dict]) -> str:
    """Kept weights per layer, mean over the runs (compare.json's layers), as 'name count / ...'."""
    if not runs or not runs[0].get("layers"):
        return "-"
    return " / ".join(f"{name} {statistics.fmean(x['layers'][name]['nonzero'] for x in runs):,.0f}"
                      for name in runs[0]["layers"])


ALLOCATION_FOLDER = "compare_lenet300_100x_2k_2bit_overlap_val"  # overlap beside the nonzero grid and sequential


def allocation_lines(folder: str = ALLOCATION_FOLDER) -> list[str]:
    """Where the nonzero grid still loses: each variant's kept weights per layer (mean over seeds, compare.json's
    layers) and error, with overlap (masks and LSQ on the allocator's per-layer budgets) paired against sequential."""
    r = load_compare(folder)
    if r is None:
        return []
    ratio = r["ratios"][0]
    rows = []
    for variant in ("overlap", NONZERO_GRID_VARIANT, "sequential"):
        mine = [x for x in r["runs"] if x["variant"] == variant and x["ratio_target"] == ratio]
        if not mine:
            return []
        kept = {name: statistics.fmean(x["layers"][name]["nonzero"] for x in mine) for name in mine[0]["layers"]}
        rows.append(f"| {variant} | {100 * statistics.fmean(x['error'] for x in mine):.2f}% | "
                    + " | ".join(f"{kept[name]:,.0f}" for name in kept) + " |")
    names = list(next(x for x in r["runs"] if x["variant"] == "overlap")["layers"])
    return ["Where it still loses (LeNet-300-100, 2 bits, 2,000 images, 100x) the per-layer split is what differs most: the "
            "kept weights of each layer, mean over the seeds (`" + folder + "`), beside `overlap`, masks and LSQ at "
            "overlapping times on the allocator's per-layer budgets (ERK), which reads "
            + _paired_cell(paired_stats(r["runs"], "overlap", ratio, "sequential"), ("overlap", "sequential"))
            + " against sequential. The joint form learns to keep fewer weights in the input layer and several "
            "times more in the hidden one; the allocator's split, trained by masks and LSQ, reads as sequential does. "
            "A Fisher price on the dead zones, or a shorter decision window, did not change that (not stored).", "",
            "| variant | error | " + " | ".join(f"kept in {name}" for name in names) + " |",
            "| --- | --- | " + " | ".join("---" for _ in names) + " |", *rows, "",
            f"Reproduce: {_reproduce(r, r['model'])}.", ""]


def _rows_and_commands(points, make) -> tuple[list[str], list[str]]:
    """Each (folder, ratio) point's row from `make` (None where its folder is missing), and their commands once each."""
    rows, commands = [], []
    for folder, ratio in points:
        made = make(folder, ratio)
        if made is not None:
            rows.append(made[0])
            commands += [made[1]] if made[1] not in commands else []
    return rows, commands


def nonzero_grid_section(points=NONZERO_GRID_POINTS) -> list[str]:
    """The joint form on the nonzero grid (quant_lsq.nonzero_grid) where it lost at 2 bits."""
    rows, commands = _rows_and_commands(points, _nonzero_grid_row)
    if not rows:
        return []
    return ["## Two bits on the nonzero grid (quant_lsq.nonzero_grid)", "",
            "The joint form's dead-zone quantizer never rounds a kept weight to zero, and the artifact stores zero by "
            "position, so a kept value at b bits needs no zero code: on the nonzero grid its levels are ±1 to "
            "±2^(b-1) steps (every code a level; at 2 bits ±1 and ±2, where the joint form otherwise keeps ±1 only, "
            "2 of its 4 codes). `" + NONZERO_GRID_VARIANT + "` is " + JOINT_FORM_VARIANT + " with "
            "`quant_lsq.nonzero_grid: true`; all three variants ran in one command, on the same teachers, seeds, steps "
            "and target bytes. Error on the test split, mean over seeds, the weights file over its target in brackets; "
            "differences paired by seed, ± one standard error, counted only beyond 2 standard errors. The LeNet-300-100 "
            "rows at 117x and 150x ask the nonzero grid for about the file sequential lands at 100x (its files end under "
            "their targets): whether the joint form lacks bytes there or something else.", "",
            f"| model | target | training images | bits | epochs | {JOINT_FORM_VARIANT} | {NONZERO_GRID_VARIANT} | "
            "sequential | nonzero grid − sequential | nonzero grid − joint | joint − sequential | results |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            "How to read it. At 2 bits the nonzero grid doubles a kept weight's levels, and the joint form on it reads "
            "better than on the symmetric grid or ties, at every 2-bit point, with 55,000 images and with 2,000; it "
            "beats sequential at every LeNet-5 point and at LeNet-300-100 100x with 55,000 images, and on LeNet-5 with "
            "2,000 images it turns the 200x loss to sequential into a lead. LeNet-300-100 with 2,000 images still loses "
            "at 2 bits, and asking it for smaller files (117x, 150x: what sequential's files come to) reads worse, not "
            "better: what it lacks there is not bytes. At 3 bits (8 levels against 6) it ties the symmetric grid at "
            "the three points measured, and at 4 bits (16 against 14) it changes nothing measurable. So the joint form "
            "`compress()` runs takes the nonzero grid at 2 bits, where a recipe leaves `quant_lsq.nonzero_grid` unset "
            "(joint_form.py); at 3 and 4 bits the grid stays as the recipe has it.", "",
            "Reproduce: " + "; ".join(commands) + ".", "", *allocation_lines()]


LAYER_SPLIT_VARIANT = "joint-paced-obdland-nz-erk-none"
# (folder, ratio): the nonzero grid with the learned split, with each layer near its ERK share, and sequential
LAYER_SPLIT_POINTS = (("compare_lenet300_2k_2bit_erk_val_10seeds", 60.0), ("compare_lenet300_2k_2bit_erk_val_10seeds", 100.0),
                      ("compare_lenet300_2k_2bit_e160_val_10seeds", 100.0), ("compare_lenet300_100x_2k_4bit_erk_val", 100.0),
                      ("compare_lenet5_2k_2bit_erk_val", 100.0), ("compare_lenet5_2k_2bit_erk_val", 200.0))


def layer_split_section(points=LAYER_SPLIT_POINTS) -> list[str]:
    """The nonzero grid with each layer's bytes within a factor 2 of its ERK share (size_budget.layer_split)."""
    rows, commands = _rows_and_commands(points, lambda folder, ratio: _three_way_row(
        folder, ratio, NONZERO_GRID_VARIANT, LAYER_SPLIT_VARIANT, ("ERK band", "learned split"), kept=True))
    if not rows:
        return []
    return ["## Each layer near its ERK share (size_budget.layer_split: erk)", "",
            "Under one budget for the whole file the joint form learns how many bytes each layer keeps. `"
            + LAYER_SPLIT_VARIANT + "` is " + NONZERO_GRID_VARIANT + " with `size_budget.layer_split: erk`: every "
            "layer's bytes must also stay between half and twice its share of the budget at the ERK densities (the "
            "allocator's data-free split that sequential trains), each bound with its own multiplier. Inside that "
            "band the split is still learned. All three variants ran in one command; columns as in the section "
            "above, then each variant's kept weights per layer (mean over seeds).", "",
            f"| model | target | training images | bits | epochs | {NONZERO_GRID_VARIANT} (learned split) | "
            f"{LAYER_SPLIT_VARIANT} | sequential | ERK band − sequential | ERK band − learned split | "
            "learned split − sequential | kept, learned split | kept, ERK band | kept, sequential | results |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            "How to read it. On LeNet-300-100 with 2,000 images at 2 bits and 100x the learned split keeps about four "
            "times ERK's share in the hidden layer; the band moves those bytes back into the input layer, reads "
            "better than the learned split, and the loss to sequential becomes a tie (sequential still ahead in the mean, "
            "at the edge of 2 standard errors), not a lead. Trained longer (160 epochs, all three variants; 40 above) "
            "the loss closes: sequential reads no better than at 40 epochs, the joint form's learned split ties it and "
            "the band reads ahead by a little over 2 standard errors, with sequential's files some 5% smaller (its "
            "ternary rounding lands them under the target); at 4 bits the same length ties, both methods there as accurate "
            "as the band at 2 bits (`compare_lenet300_100x_2k_4bit_e160_val_10seeds`, in the tables above). At 60x, and "
            "at 4 bits over 40 epochs, "
            "the learned split is inside the band already and the runs are the same to the byte. On LeNet-5 the band "
            "costs accuracy at both points: there the learned split keeps some twenty times ERK's share in conv2 and beats "
            "sequential, so ERK's split is the guess the learned one improves on. No band width helps both models, "
            "so `layer_split` stays an option, off in the joint form `compress()` runs.", "",
            "Reproduce: " + "; ".join(commands) + ".", ""]


def paired_difference(runs: list[dict], variant: str, ratio: float, baseline: str = "sequential") -> str:
    """Joint minus sequential (or `baseline`) error per seed (same teacher, same budgets), with its
    standard error: a difference counts only when it exceeds two standard errors."""
    diffs = seed_differences(runs, variant, ratio, baseline)
    stats = paired_stats(runs, variant, ratio, baseline)
    if stats is None:
        return "one seed: not significant"
    mean, se, _ = stats
    verdict = "significant" if beyond_two_se(mean, se) else "not significant"
    against = "joint − sequential" if baseline == "sequential" else f"{variant} − {baseline}"
    return (f"paired over {len(diffs)} seeds the difference is {mean:+.2f} ± {se:.2f} points ({against}, "
            f"± one standard error; per seed {', '.join(f'{d:+.2f}' for d in diffs)}): {verdict}")


def size_accuracy(runs: list[dict]) -> str:
    """How close every run's weights file came to the bytes its ratio target asked for."""
    devs = [100 * (row["file_bytes"] / row["target_bytes"] - 1) for row in runs if row.get("target_bytes")]
    if not devs:
        return "no run recorded its target bytes."
    within = sum(abs(d) <= 2.0 for d in devs)
    return (f"the weights file was within 2% of the target bytes in {within} of {len(devs)} runs "
            f"(deviation {min(devs):+.1f}% to {max(devs):+.1f}%; negative = smaller than asked).")


# joint variants paired against another joint variant of the same folder (a change to one recipe)
JOINT_AGAINST_JOINT = (("joint-acc-pcgrad", "joint-pcgrad"),
                       ("joint-paced-obdrank-none", "joint-paced-obd-none"),
                       ("joint-paced-obdland-none", "joint-paced-obd-none"),
                       ("joint-paced-obdtrack-none", "joint-paced-obd-none"),
                       ("joint-paced-obdtrack-none", "joint-paced-obdland-none"))
# a folder of one joint variant paired also with another joint variant's runs of the same seeds from
# other folders (same teachers, checked): folder -> [(that folder, its variant), ...]
OBD, OBD_LAND = "joint-paced-obd-none", "joint-paced-obdland-none"
JOINT_BESIDE = {
    "compare_lenet300_60x_2k_obdrank_10seeds": [("compare_lenet300_60x_2k_paced_obd_20seeds", OBD)],
    "compare_lenet300_60x_2k_obdland_10seeds": [("compare_lenet300_60x_2k_paced_obd_20seeds", OBD)],
    "compare_lenet300_60x_2k_obdland_s10to19": [("compare_lenet300_60x_2k_paced_obd_20seeds", OBD)],
    "compare_lenet300_60x_2k_obdland_20seeds": [("compare_lenet300_60x_2k_paced_obd_20seeds", OBD)],
    "compare_lenet300_100x_2k_obdland_10seeds": [("compare_lenet300_100x_2k_paced_obd_20seeds", OBD)],
    "compare_vit_30x_2k_obdland": [("compare_vit_30x_2k_obdrank", OBD)],
    "compare_lstm_30x_2k_obdland": [("compare_lstm_30x_2k", OBD)],
    "compare_vit_30x_obdland": [("compare_vit_30x_fp16norm", OBD)],
    "compare_lenet5_200x_2k_rank_land": [("compare_lenet5_200x_2k_obd_seq", OBD)],
    "compare_vit_30x_2k_obdtrack": [("compare_vit_30x_2k_obdrank", OBD), ("compare_vit_30x_2k_obdland", OBD_LAND)],
    "compare_lenet5_200x_2k_obdtrack": [("compare_lenet5_200x_2k_obd_seq", OBD),
                                        ("compare_lenet5_200x_2k_rank_land", OBD_LAND)],
    "compare_lenet300_60x_2k_obdtrack_10seeds": [("compare_lenet300_60x_2k_paced_obd_20seeds", OBD),
                                                 ("compare_lenet300_60x_2k_obdland_10seeds", OBD_LAND)],
    "compare_lenet300_100x_2k_obdtrack_10seeds": [("compare_lenet300_100x_2k_paced_obd_20seeds", OBD),
                                                  ("compare_lenet300_100x_2k_obdland_10seeds", OBD_LAND)],
    "compare_lenet300_100x_obdtrack_10seeds": [("compare_lenet300_100x_obd_seq_10seeds", OBD)],
    "compare_vit_30x_obdtrack": [("compare_vit_30x_fp16norm", OBD), ("compare_vit_30x_obdland", OBD_LAND)],
    "compare_lstm_30x_2k_obdtrack": [("compare_lstm_30x_2k", OBD), ("compare_lstm_30x_2k_obdland", OBD_LAND)],
}


FISHER_RUNS = (("lenet300", "compare_lenet300_100x_v2", " at 100x, Fisher-weighted size budget"),
               ("lenet300", "compare_lenet300_100x_2k_v2", ", 2,000 training images, at 100x, Fisher-weighted size budget"),
               ("lenet300", "compare_lenet300_60x", " at 60x, Fisher-weighted size budget"),
               ("lenet300", "compare_lenet300_60x_2k", ", 2,000 training images, at 60x, Fisher-weighted size budget"),
               ("lenet5", "compare_lenet5_200x_fisher", " at 200x, Fisher-weighted size budget (one seed, a check)"),
               ("lenet300", "compare_lenet300_100x_bits", " at 100x, learned bit-widths"),
               ("lenet300", "compare_lenet300_100x_e10_fixed", " at 100x, 10 compression epochs, Fisher budget and learned widths after the trim fix"),
               ("lenet300", "compare_lenet300_100x_bits_fixed", " at 100x, Fisher budget and learned widths after the trim fix"),
               ("lenet300", "compare_lenet300_100x_2k_fixed", ", 2,000 training images, at 100x, Fisher budget after the trim fix"),
               ("lenet300", "compare_lenet300_60x_fixed", " at 60x, Fisher budget after the trim fix"),
               ("lenet300", "compare_lenet300_60x_2k_fixed", ", 2,000 training images, at 60x, Fisher budget after the trim fix"),
               ("lenet5", "compare_lenet5_200x_bits", " at 200x, learned bit-widths (one seed, a check)"),
               ("lenet300", "compare_lenet300_100x_stiff_v3", " at 100x, learned widths with a stiffer size constraint (penalty 30)"),
               ("lenet300", "compare_lenet300_100x_e10_stiff_v3", " at 100x, 10 compression epochs, learned widths with penalty 30"),
               ("lenet300", "compare_lenet300_100x_2k_stiff_v3", ", 2,000 training images, at 100x, learned widths with penalty 30"),
               ("lenet300", "compare_lenet300_100x_e10_early_v4", " at 100x, 10 compression epochs, early freeze (joint-early: decide in 30% of the run, fine-tune 70%)"),
               ("lenet300", "compare_lenet300_100x_early_v4", " at 100x, early freeze (joint-early)"),
               ("lenet300", "compare_lenet300_100x_2k_early_v4", ", 2,000 training images, at 100x, early freeze (joint-early)"),
               ("lenet300", "compare_lenet300_100x_e10_paced_v4", " at 100x, 10 compression epochs, paced window (joint-paced: ~1,000 steps of decisions)"),
               ("lenet300", "compare_lenet300_100x_paced_v4", " at 100x, paced window (joint-paced)"),
               ("lenet300", "compare_lenet300_100x_2k_paced_v4", ", 2,000 training images, at 100x, paced window (joint-paced)"),
               ("lenet300", "compare_lenet300_100x_e10_paced_aw_v4", " at 100x, 10 compression epochs, paced window with the multiplier's anti-windup"),
               ("lenet300", "compare_lenet300_100x_e10_paced_pcgrad_v4", " at 100x, 10 compression epochs, paced window with PCGrad (joint-paced-pcgrad)"),
               ("lenet5", "compare_lenet5_100x_acc", " at 100x, PCGrad between accuracy and size (joint-acc-pcgrad) beside per-term PCGrad"),
               ("lenet300", "compare_lenet300_100x_acc", " at 100x, PCGrad between accuracy and size (joint-acc-pcgrad) beside per-term PCGrad"),
               ("lenet5", "compare_lenet5_200x_acc", " at 200x, PCGrad between accuracy and size (joint-acc-pcgrad) beside per-term PCGrad"),
               ("lenet300", "compare_lenet300_100x_e10_paced_5seeds", " at 100x, 10 compression epochs, joint-paced-none vs sequential, 5 seeds"),
               ("lenet300", "compare_lenet300_100x_paced_5seeds", " at 100x, joint-paced-none vs sequential, 5 seeds"),
               ("lenet300", "compare_lenet300_100x_2k_paced_5seeds", ", 2,000 training images, at 100x, joint-paced-none vs sequential, 5 seeds"),
               ("lenet300", "compare_lenet300_60x_2k_paced_5seeds", ", 2,000 training images, at 60x, joint-paced-none vs sequential, 5 seeds"),
               ("lenet300", "compare_lenet300_60x_paced_5seeds", " at 60x, joint-paced-none vs sequential, 5 seeds"),
               ("lenet5", "compare_lenet5_200x_paced", " at 200x, the paced recipe (joint-paced-none)"),
               ("lenet5", "compare_lenet5_200x_2k_paced", ", 2,000 training images, at 200x, the paced recipe (joint-paced-none)"),
               ("lenet5", "compare_lenet5_400x_paced", " at 400x, the paced recipe (joint-paced-none)"),
               ("lenet5", "compare_lenet5_100x_paced", " at 100x, the paced recipe (joint-paced-none)"),
               ("lenet5", "compare_lenet5_100x_2k_paced", ", 2,000 training images, at 100x, the paced recipe (joint-paced-none)"),
               ("lenet5", "compare_lenet5_400x_paced_lin", " at 400x, the paced recipe on a log-linear schedule (joint-paced-lin-none)"),
               ("lenet5", "compare_lenet5_200x_paced_lin", " at 200x, the paced recipe on a log-linear schedule (joint-paced-lin-none)"),
               ("lenet300", "compare_lenet300_100x_paced_lin_5seeds", " at 100x, the paced recipe on a log-linear schedule, 5 seeds"),
               ("lenet300", "compare_lenet300_100x_2k_paced_lin_5seeds", ", 2,000 training images, at 100x, the paced recipe on a log-linear schedule, 5 seeds"),
               ("lenet300", "compare_lenet300_100x_e10_paced_lin_5seeds", " at 100x, 10 compression epochs, the paced recipe on a log-linear schedule, 5 seeds"),
               *((model, f"compare_{model}_{point}_paced_obd{tail}", f"{where}, the paced recipe landing by Fisher cost (joint-paced-obd-none)")
                 for model, point, tail, where in (
                     ("lenet5", "100x", "", " at 100x"), ("lenet5", "200x", "", " at 200x"), ("lenet5", "400x", "", " at 400x"),
                     ("lenet5", "200x_3bit", "", " at 200x, 3-bit weights"), ("lenet5", "100x_2k", "", ", 2,000 training images, at 100x"),
                     ("lenet5", "200x_2k", "", ", 2,000 training images, at 200x"), ("lenet5", "400x_2k", "", ", 2,000 training images, at 400x"),
                     ("lenet300", "60x", "_10seeds", " at 60x, 10 seeds"), ("lenet300", "100x", "_10seeds", " at 100x, 10 seeds"),
                     ("lenet300", "100x_e10", "_10seeds", " at 100x, 10 compression epochs, 10 seeds"),
                     ("lenet300", "60x_2k", "_10seeds", ", 2,000 training images, at 60x, 10 seeds"),
                     ("lenet300", "100x_2k", "_10seeds", ", 2,000 training images, at 100x, 10 seeds"))),
               ("lenet300", "compare_lenet300_100x_e20_paced_obd_guard", " at 100x, 20 compression epochs, joint-paced-obd-none with the guard steps, 5 seeds"),
               # seeds 0-9 after the saliency's closed form (on another machine than the 10-seed folders
               # above, its own teachers), pooled with seeds 10-19 run there too: one section, the pooled one
               ("lenet300", "compare_lenet300_100x_paced_obd_20seeds",
                " at 100x, 20 seeds, joint-paced-obd-none after the saliency's closed form (another machine)"),
               ("lenet300", "compare_lenet300_100x_paced_obd_10seeds_closed_form", ""),
               *(("lenet300", f"compare_lenet300_{r}x_2k_paced_obd_20seeds",
                  f", 2,000 training images, at {r}x, 20 seeds, joint-paced-obd-none after the fused Adam (another machine)")
                 for r in (60, 100)),
               ("lenet5", "compare_lenet5_200x_paced_obd_fused",
                " at 200x, joint-paced-obd-none after the fused Adam and the size term's single node (a check)"),
               ("resnet", "compare_resnet_2k", ", 2,000 training images, at 20x and 30x"),
               ("resnet", "compare_resnet_fp16norm", " at 20x and 30x, BatchNorm stored in fp16 (quant_lsq.norm_format: fp16)"),
               ("resnet", "compare_resnet_30x_fp32norm",
                " at 30x, BatchNorm in fp32, on the machine of the fp16 runs (their teachers)"),
               ("resnet", "compare_resnet_2k_fp16norm", ", 2,000 training images, at 20x, BatchNorm stored in fp16"),
               ("mobilenet", "compare_mobilenet_12x",
                " (MobileNetV2-style: depthwise separable convolutions, inverted residuals; 74k weights) at 12x, "
                "BatchNorm stored in fp16"),
               ("mobilenet", "compare_mobilenet_12x_2k", ", 2,000 training images, at 12x, BatchNorm stored in fp16"),
               ("mobilenet", "compare_mobilenet_12x_2k_folded", ", 2,000 training images, at 12x, BatchNorm stored in fp16 "
                "and folded into a scale and a shift per channel (quant_lsq.norm_format: fp16_folded)"),
               ("mobilenet", "compare_mobilenet_20x_2k_folded", ", 2,000 training images, at 20x (below the floor with "
                "fp16 BatchNorm), BatchNorm folded (quant_lsq.norm_format: fp16_folded)"),
               ("seqcnn", "compare_seqcnn_30x_fp16norm",
                " (Conv1d + BatchNorm1d over the image's columns as a sequence, the shape of an audio model) at 30x, "
                "BatchNorm stored in fp16"),
               ("seqcnn", "compare_seqcnn_30x_2k_fp16norm", ", 2,000 training images, at 30x, BatchNorm stored in fp16"),
               ("seqcnn", "compare_seqcnn_60x_fp16norm", " at 60x, BatchNorm stored in fp16"),
               ("seqcnn", "compare_seqcnn_60x_2k_fp16norm", ", 2,000 training images, at 60x, BatchNorm stored in fp16"),
               ("vit", "compare_vit_30x_fp16norm",
                " (torch's nn.TransformerEncoder, its attention converted to Linear projections by attention.mha_to_linear; "
                "7x7 patches) at 30x, LayerNorm stored in fp16"),
               ("vit", "compare_vit_30x_joint_none",
                " at 30x, LayerNorm stored in fp16: the joint mode at size_budget's defaults (joint-none: no Fisher saliency)"),
               ("vit", "compare_vit_30x_e4_fp16norm", " at 30x, teachers of 15 epochs, 4 compression epochs, LayerNorm stored in fp16"),
               ("vit", "compare_vit_30x_e4_joint_none",
                " at 30x, teachers of 15 epochs, 4 compression epochs, LayerNorm stored in fp16: the joint mode at "
                "size_budget's defaults (joint-none: no Fisher saliency)"),
               ("vit", "compare_vit_30x_2k_fp16norm", ", 2,000 training images, at 30x, LayerNorm stored in fp16"),
               ("vit", "compare_vit_30x_2k_joint_none",
                ", 2,000 training images, at 30x, LayerNorm stored in fp16: the joint mode at size_budget's defaults "
                "(joint-none: no Fisher saliency)"),
               ("lenet300", "compare_lenet300_60x_2k_obdrank_10seeds",
                ", 2,000 training images, at 60x, 10 seeds: the Fisher saliency made size-neutral "
                "(joint-paced-obdrank-none, size_budget.saliency_mode: rank) beside joint-paced-obd-none"),
               ("vit", "compare_vit_30x_2k_obdrank",
                ", 2,000 training images, at 30x, LayerNorm stored in fp16: the Fisher saliency made size-neutral "
                "(joint-paced-obdrank-none, size_budget.saliency_mode: rank) beside joint-paced-obd-none"),
               ("lenet300", "compare_lenet300_60x_2k_obdland_10seeds",
                ", 2,000 training images, at 60x, 20 seeds: the Fisher estimate in the landing only "
                "(joint-paced-obdland-none, size_budget.saliency_mode: landing) beside joint-paced-obd-none"),
               ("lenet300", "compare_lenet300_100x_2k_obdland_10seeds",
                ", 2,000 training images, at 100x, 10 seeds: the Fisher estimate in the landing only "
                "(joint-paced-obdland-none, size_budget.saliency_mode: landing) beside joint-paced-obd-none"),
               ("lenet5", "compare_lenet5_200x_2k_rank_land",
                ", 2,000 training images, at 200x: the size-neutral saliency and the Fisher estimate in the landing "
                "only (joint-paced-obdrank-none, joint-paced-obdland-none) beside joint-paced-obd-none"),
               ("vit", "compare_vit_30x_obdland", " at 30x, LayerNorm stored in fp16: the Fisher estimate in the landing "
                "only (joint-paced-obdland-none, size_budget.saliency_mode: landing)"),
               ("vit", "compare_vit_30x_2k_obdland",
                ", 2,000 training images, at 30x, LayerNorm stored in fp16: the Fisher estimate in the landing only "
                "(joint-paced-obdland-none, size_budget.saliency_mode: landing)"),
               ("lstm", "compare_lstm_30x",
                " (torch's nn.LSTM, 96 units, reading each image row by row, converted to Linear layers by "
                "recurrent.rnn_to_linear) at 30x: the benchmarks' recipe and the joint mode at size_budget's defaults"),
               ("lstm", "compare_lstm_30x_2k", ", 2,000 training images, at 30x"),
               ("lstm", "compare_lstm_30x_2k_obdland", ", 2,000 training images, at 30x: the Fisher estimate in the landing "
                "only (joint-paced-obdland-none, size_budget.saliency_mode: landing)"),
               ("vit", "compare_vit_30x_obdtrack", " at 30x, LayerNorm stored in fp16: the state cut back onto its goal "
                "inside the window (joint-paced-obdtrack-none, size_budget.lag_tolerance: 0.25)"),
               ("vit", "compare_vit_30x_2k_obdtrack",
                ", 2,000 training images, at 30x, LayerNorm stored in fp16: the state cut back onto its goal inside the "
                "window (joint-paced-obdtrack-none, size_budget.lag_tolerance: 0.25)"),
               ("lenet5", "compare_lenet5_200x_2k_obdtrack", ", 2,000 training images, at 200x: the state cut back onto its "
                "goal inside the window (joint-paced-obdtrack-none, size_budget.lag_tolerance: 0.25)"),
               ("lenet300", "compare_lenet300_60x_2k_obdtrack_10seeds", ", 2,000 training images, at 60x, 10 seeds: the "
                "state cut back onto its goal inside the window (joint-paced-obdtrack-none, size_budget.lag_tolerance: 0.25)"),
               ("lenet300", "compare_lenet300_100x_obdtrack_10seeds", " at 100x, 10 seeds: the state cut back onto its "
                "goal inside the window (joint-paced-obdtrack-none, size_budget.lag_tolerance: 0.25)"),
               ("lenet300", "compare_lenet300_100x_2k_obdtrack_10seeds", ", 2,000 training images, at 100x, 10 seeds: "
                "the state cut back onto its goal inside the window (joint-paced-obdtrack-none, size_budget.lag_tolerance: 0.25)"),
               ("lstm", "compare_lstm_30x_2k_obdtrack", ", 2,000 training images, at 30x: the state cut back onto its goal "
                "inside the window (joint-paced-obdtrack-none, size_budget.lag_tolerance: 0.25)"),
               ("lstm", "compare_lstm_8x_15x_seed0", " at 8x and 15x (one seed, a check of the baseline where the cut is mild)"),
               ("lenet5", "compare_lenet5_200x_obdland", " at 200x: the joint form `mode: joint` runs under a size target "
                "(joint-paced-obdland-none, joint_form.py) beside joint-paced-obd-none and sequential"),
               ("lenet300", "compare_lenet300_100x_obdland", " at 100x: the joint form `mode: joint` runs under a size target "
                "(joint-paced-obdland-none, joint_form.py) beside joint-paced-obd-none and sequential"),
               ("lenet5", "compare_lenet5_400x_obdland", " at 400x: the joint form `mode: joint` runs under a size target "
                "(joint-paced-obdland-none, joint_form.py) beside sequential"),
               ("lenet5", "compare_lenet5_100x_obdland", " at 100x: the joint form `mode: joint` runs under a size target "
                "(joint-paced-obdland-none, joint_form.py) beside sequential"),
               ("resnet", "compare_resnet_20x_obdland", " at 20x: the joint form `mode: joint` runs under a size target "
                "(joint-paced-obdland-none, joint_form.py) beside sequential"),
               ("vit", "compare_vit_30x_2k_obdland_fixed", ", 2,000 training images, at 30x, LayerNorm stored in fp16: "
                "the joint form `mode: joint` runs (joint-paced-obdland-none) after the kept-weight count fix, beside sequential"))


def fisher_budget_section() -> list[str]:
    """The size budget with the Fisher cost on the dead zones (variant joint-fisher-*, docs/joint.md):
    every joint variant paired against sequential, not only the best one."""
    lines, into, shown = [], pooled_into(), set()
    for model, folder, title in FISHER_RUNS:
        folder = into.get(folder, folder)  # a batch of seeds pooled with another: the pooled folder's section, once
        if folder in shown:
            continue
        shown.add(folder)
        r = load_compare(folder)
        if r is not None and r.get("pooled_from"):
            title = title.replace(", 5 seeds", f", {r['seeds']} seeds")
        if r is None:
            continue
        lines += section(model, folder, title)[:-1]
        joint_variants = [v for v in r["variants"] if v.startswith("joint")]
        if len(joint_variants) < 2:  # the section's own line already pairs the one joint variant
            lines.append("")
            continue
        for ratio in r["ratios"]:
            for variant in joint_variants if "sequential" in r["variants"] else ():  # a joint-only folder: no pairing
                lines.append(f"- {variant} at {ratio:g}x: {paired_difference(r.get('runs', []), variant, ratio)}.")
            for variant, baseline in JOINT_AGAINST_JOINT:
                if variant in joint_variants and baseline in joint_variants:
                    lines.append(f"- {variant} against {baseline} at {ratio:g}x: "
                                 f"{paired_difference(r.get('runs', []), variant, ratio, baseline)}.")
        lines.append("")
    return lines


# BatchNorm stored one way / another, the same seeds on the same machine (the same teachers):
# (model, (format, folder), (format, folder), variants paired)
NORM_FORMAT_RUNS = (("resnet", ("fp32", "compare_resnet_30x_fp32norm"), ("fp16", "compare_resnet_fp16norm"),
                     ("joint-paced-obd-none", "sequential")),
                    ("seqcnn", ("fp32", "compare_seqcnn_30x_fp32norm"), ("fp16", "compare_seqcnn_30x_fp16norm"),
                     ("joint-paced-obd-none", "sequential")),
                    ("mobilenet", ("fp16", "compare_mobilenet_12x_2k"), ("fp16_folded", "compare_mobilenet_12x_2k_folded"),
                     ("joint-paced-obdland-none", "sequential")))
NORM_FORMAT_WORDS = {"fp32": "fp32", "fp16": "fp16", "fp16_folded": "fp16 and folded"}
NORM_FORMAT_HOW = {  # what each format does, after the first
    "fp16": "affine weights trained as stored, running statistics rounded after each update",
    "fp16_folded": "each BatchNorm evaluated and stored as its fp16 scale and shift per channel, its statistics one "
                   "stored value each"}


def norm_bytes(model: str) -> dict[str, int]:
    """Bytes of the model's normalization layers in the weights file in each format, measured by the
    writer itself on the untrained model (norms rounded to fp16; folded as finalize folds them)."""
    from jointcompress.artifact.encode import encode_model
    from jointcompress.models import build_model
    from jointcompress.spec import CompressionSpec
    from jointcompress.techniques.norm_storage import fold_norms, norm_state_keys, round_norms

    sizes = {}
    for fmt in ("fp32", "fp16", "fp16_folded"):
        net = build_model(model, 28, 10).eval()
        keys = norm_state_keys(net) + [k for k in net.state_dict() if k.endswith("num_batches_tracked")]
        folded = []
        if fmt != "fp32":
            round_norms(net)
            folded = fold_norms(net) if fmt == "fp16_folded" else []
        enc = encode_model(net, CompressionSpec(folded_norms=folded), narrow=lambda key: fmt != "fp32")
        sizes[fmt] = sum(enc.others[k]["bytes"] for k in keys)
    return sizes


def norm_format_section() -> list[str]:
    """Each model with BatchNorm trained and stored one way against the same points stored another."""
    return [line for model, first, second, variants in NORM_FORMAT_RUNS
            for line in norm_format_pair(model, first, second, variants)]


def norm_format_pair(model: str, first: tuple[str, str], second: tuple[str, str], variants: tuple[str, ...]) -> list[str]:
    """The second format against the first on one model, each variant paired by seed where the teachers are the same."""
    (fmt_a, folder_a), (fmt_b, folder_b) = first, second
    wide, narrow = _finished(load_compare(folder_a)), _finished(load_compare(folder_b))
    if wide is None or narrow is None:
        return []  # a run not written yet, or still in progress
    sizes = norm_bytes(model)
    word_a, word_b = NORM_FORMAT_WORDS[fmt_a], NORM_FORMAT_WORDS[fmt_b]
    same = same_teachers(wide, narrow)
    images = narrow.get("train_images") or 60_000
    where = "" if images >= 60_000 else f", {images:,} training images"
    lines = [f"## {MODELS[model]} on MNIST{where}: BatchNorm stored in {word_b} (quant_lsq.norm_format: {fmt_b}) against {word_a}", "",
             f"Reproduce, {fmt_b}: {_reproduce(narrow, model)}; {fmt_a}: {_reproduce(wide, model)}. The model's BatchNorm takes "
             f"{sizes['fp32']:,} B of the weights file in fp32, {sizes['fp16']:,} B in fp16 and {sizes['fp16_folded']:,} B "
             f"folded (`norm_bytes`: the writer run on the untrained model); with `norm_format: {fmt_b}` "
             f"({NORM_FORMAT_HOW[fmt_b]}) the bytes it frees go to the weights, for both methods alike (the allocator and the "
             "budget measure the file as it will be stored). "
             + (f"Same teachers (same seeds, same machine), so {fmt_b} − {fmt_a} is paired by seed." if same else
                f"The {fmt_a} runs had other teachers (another machine): the {fmt_b} − {fmt_a} difference is not paired."), "",
             f"| target | variant | error, {word_a} BatchNorm | error, {word_b} BatchNorm | {fmt_b} − {fmt_a} (points) |",
             "| --- | --- | --- | --- | --- |"]
    return lines + paired_rows(wide, narrow, variants, same) + [""]


# LeNet-300-100 at 100x, 2 bits, on the same 15-epoch teachers: (folder, compression epochs)
LONGER_TWO_BIT = (("compare_lenet300_100x_2bit_t15_e4_val", 4), ("compare_lenet300_100x_2bit_t15_e12_val", 12))


def _cross_pair(joint: dict, seq: dict, ratio: float, variant: str, baseline: str = "sequential",
                words: tuple[str, str] = ("joint", "sequential")) -> str:
    """`variant` in one result against `baseline` in another, paired by seed (the same teachers)."""
    a, b = by_seed(joint, variant, ratio), by_seed(seq, baseline, ratio)
    diffs = [100 * (a[k] - b[k]) for k in sorted(set(a) & set(b))]
    if len(diffs) < 2 or not same_teachers(joint, seq):
        return "not paired"
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.2f} ± {se:.2f} (n={len(diffs)}) {_verdict(mean, se, words)}"


SEQUENTIAL_FORMS = ("sequential", "sequential-norefit")


def longer_two_bit_section(points=LONGER_TWO_BIT) -> list[str]:
    """Each method at 4 and at 12 compression epochs, sequential with and without the re-fit on LSQ's rounding, and
    the joint form at its better length against the best of sequential's forms and lengths."""
    results = [(load_compare(folder), epochs, folder) for folder, epochs in points]
    if any(r is None for r, _, _ in results):
        return []
    variant, ratio = NONZERO_GRID_VARIANT, 100.0
    mean = lambda r, v, key="error", scale=100: scale * statistics.mean(by_seed(r, v, ratio, key).values())  # noqa: E731
    cell = lambda r, v: f"{mean(r, v):.2f}% ({mean(r, v, 'file_bytes', 1):,.0f} B)"  # noqa: E731
    rows = [f"| {epochs} | {cell(r, variant)} | {cell(r, 'sequential')} | {cell(r, 'sequential-norefit')} | "
            f"{_cross_pair(r, r, ratio, variant)} | {_cross_pair(r, r, ratio, variant, 'sequential-norefit')} | "
            f"`{folder}` |" for r, epochs, folder in results]
    best_joint = min(results, key=lambda t: mean(t[0], variant))
    best_seq = min(((t, form) for t in results for form in SEQUENTIAL_FORMS), key=lambda tf: mean(tf[0][0], tf[1]))
    (seq_result, seq_epochs, _), seq_form = best_seq
    teacher = 100 * teacher_error(results[0][0])
    return ["## LeNet-300-100 at 100x, 2 bits, longer training", "",
            f"The joint form (`{variant}`) and sequential on the same teachers (15 epochs, {teacher:.2f}% error, 3 seeds), "
            "at 4 and at 12 compression epochs; sequential twice: as it runs by default, and as `sequential-norefit` "
            "(`target.refit_on_rounding: false`), whose masks stay as fitted when LSQ first rounds them. The kept epoch "
            "is chosen on 5,000 held-out training images; error on the 10,000 test images, mean file bytes in brackets; "
            "paired by seed, ± one standard error.", "",
            "| compression epochs | joint form | sequential | sequential-norefit | joint − sequential | "
            "joint − sequential-norefit | results |", "| --- | --- | --- | --- | --- | --- | --- |", *rows, "",
            f"Each at its best: the joint form at {best_joint[1]} epochs ({mean(best_joint[0], variant):.2f}%) against "
            f"`{seq_form}` at {seq_epochs} ({mean(seq_result, seq_form):.2f}%): "
            f"{_cross_pair(best_joint[0], seq_result, ratio, variant, seq_form)}. The joint form meets the goal of >= 100x "
            "at <= 1.80% error at both lengths on the mean over seeds (not on every seed: its worst reads "
            f"{max(100 * e for e in by_seed(best_joint[0], variant, ratio).values()):.2f}% at {best_joint[1]} epochs). "
            "Sequential as it runs by default reads worse at 12 epochs than at 4: at 2 bits LSQ rounds many of its kept "
            "weights to zero, so its size steering re-fits the masks then (`size_requant`: their density goes from 5% "
            "to about 63% mid-QAT) and cuts them back before the end (`size_recheck_cut`, the trim); without that "
            "re-fit its files land 12-25% under the target and read better at 12 epochs, tie at 4; "
            "`sequential-norefit` is the stronger baseline here." + _refit_elsewhere(), "",
            "Reproduce: " + "; ".join(f"`{r['command']}`" for r in [*(t[0] for t in results), *_refit_results()])
            + ".", ""]


# sequential with and without the re-fit on LSQ's rounding at other 2-bit points (one command each)
REFIT_ELSEWHERE = ("compare_lenet5_2bit_norefit_val", "compare_lenet5_2k_2bit_norefit_val_6seeds",
                   "compare_lenet300_2k_2bit_norefit_val_10seeds")


def _refit_results() -> list[dict]:
    return [r for r in (load_compare(folder) for folder in REFIT_ELSEWHERE) if r is not None]


def _refit_elsewhere() -> str:
    """Where else the re-fit was measured, and why it stays the default."""
    cells = []
    for r in _refit_results():
        for ratio in r["ratios"]:
            mean = lambda v, key="error", scale=100: scale * statistics.mean(by_seed(r, v, ratio, key).values())  # noqa: E731
            images = r["data"].rpartition("-")[2]
            scarce = f"{int(images):,} training images, " if images.isdigit() else ""
            cells.append(f"{MODELS[r['model']]} at {ratio:g}x ({scarce}{r['epochs']} epochs) {mean('sequential'):.2f}% with it "
                         f"({mean('sequential', 'file_bytes', 1):,.0f} B) and {mean('sequential-norefit'):.2f}% without "
                         f"({mean('sequential-norefit', 'file_bytes', 1):,.0f} B), without − with "
                         f"{_cross_pair(r, r, ratio, 'sequential-norefit', words=('no re-fit', 're-fit'))}")
    if not cells:
        return ""
    return (" Elsewhere at 2 bits the re-fit helps or ties (" + "; ".join(cells) + "), so it stays the default, and "
            "`compare --variants ...,sequential-norefit` runs both.")


def same_teachers(a: dict, b: dict) -> bool:
    """Whether two compare results trained the same teachers (every seed's teacher accuracy equal)."""
    teachers = lambda r: {u["seed"]: u["accuracy"] for u in r["uncompressed"]}  # noqa: E731
    return all(teachers(a).get(k) == v for k, v in teachers(b).items())


def by_seed(result: dict, variant: str, ratio: float, key: str = "error") -> dict[int, float]:
    """seed -> `key` of `variant`'s runs at `ratio` in a compare result."""
    return {row["seed"]: row[key] for row in result["runs"] if row["variant"] == variant and row["ratio_target"] == ratio}


def paired_rows(first: dict, second: dict, variants: tuple[str, ...], same: bool, files: bool = False) -> list[str]:
    """Table rows: each target and variant, the two results' mean errors over the seeds both ran and the second
    minus the first paired by seed (where the teachers are the same); with `files`, the mean file bytes too."""
    rows = []
    for ratio in second["ratios"]:
        for variant in variants:
            pick = lambda r, key: by_seed(r, variant, ratio, key)  # noqa: E731
            err = {"a": pick(first, "error"), "b": pick(second, "error")}
            seeds = sorted(set(err["a"]) & set(err["b"]))
            if not seeds:
                continue
            diffs = [100 * (err["b"][k] - err["a"][k]) for k in seeds]
            paired = (f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs) / math.sqrt(len(diffs)):.2f} (n={len(diffs)})"
                      if same and len(diffs) > 1 else "not paired")
            mean = lambda d, scale=100: scale * statistics.mean(d[k] for k in seeds)  # noqa: E731
            sizes = (f" {mean(pick(first, 'file_bytes'), 1):,.0f} B | {mean(pick(second, 'file_bytes'), 1):,.0f} B |"
                     if files else "")
            rows.append(f"| {ratio:g}x | {variant} | {mean(err['a']):.2f}% | {mean(err['b']):.2f}% |{sizes} {paired} |")
    return rows


LOG8_HOW = ("Both on today's code; `scale_format: log8` (every variant) trains and stores each step size on a 2^(1/16) "
            "grid in one byte, and both methods spend the freed bytes on weights (the budget and the allocator measure "
            "the file as it will be stored).")
STEP_FORMAT_VARIANTS = ("joint-paced-obdland-none", "sequential")


def _log8_pair(model: str, where: str, fp16_folder: str, log8_folder: str) -> tuple:
    """A STEP_FORMAT_RUNS entry: the same point with step sizes in log8 against fp16."""
    return (model, f"{where}: step sizes in 1 byte (quant_lsq.scale_format: log8) against 2 (fp16)",
            ("fp16 steps", fp16_folder), ("log8 steps", log8_folder), STEP_FORMAT_VARIANTS, LOG8_HOW)


# (model, title, (label, folder) before, (label, folder) after, variants, what changed): the step sizes'
# storage against the same points stored another way
STEP_FORMAT_RUNS = (
    ("lenet5", "at 400x: today's writer (the live channels' step sizes only, batch counters narrow) against the stored run",
     ("stored run", "compare_lenet5_400x_obdland"), ("today's code", "compare_lenet5_400x_live_steps"),
     STEP_FORMAT_VARIANTS,
     "The same command re-run on today's code, which stores only the step sizes of channels that keep a weight "
     "(`live_only`, docs/artifact_format.md) and BatchNorm's batch counters in the narrowest integer type; every "
     "other change since the stored run is in the difference too."),
    _log8_pair("lenet5", "at 400x", "compare_lenet5_400x_live_steps", "compare_lenet5_400x_log8"),
    _log8_pair("lenet300", "at 100x", "compare_lenet300_100x_fp16_steps", "compare_lenet300_100x_log8"),
    _log8_pair("resnet", "at 20x", "compare_resnet_20x_fp16_steps", "compare_resnet_20x_log8"),
    _log8_pair("lenet5", "at 100x and 200x", "compare_lenet5_100_200x_fp16_steps", "compare_lenet5_100_200x_log8"),
    _log8_pair("lenet5", "with 2,000 training images at 200x", "compare_lenet5_200x_2k_fp16_steps",
               "compare_lenet5_200x_2k_log8"),
    _log8_pair("seqcnn", "at 60x, BatchNorm in fp16", "compare_seqcnn_60x_fp16_steps", "compare_seqcnn_60x_log8"),
    _log8_pair("lenet300", "at 100x, 10 compression epochs", "compare_lenet300_100x_e10_fp16_steps",
               "compare_lenet300_100x_e10_log8"),
    _log8_pair("lenet300", "with 2,000 training images at 100x", "compare_lenet300_100x_2k_fp16_steps_10seeds",
               "compare_lenet300_100x_2k_log8_10seeds"),
    _log8_pair("vit", "at 30x, LayerNorm in fp16", "compare_vit_30x_fp16_steps", "compare_vit_30x_log8"))


def _differences(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """b minus a in points, per seed both have."""
    return [100 * (b[k] - a[k]) for k in sorted(set(a) & set(b))]


def _mean_se(diffs: list[float]) -> str:
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    bold = "**" if beyond_two_se(mean, se) else ""
    return f"{bold}{mean:+.2f} ± {se:.2f}{bold}"


def kept_weights(result: dict, variant: str, ratio: float) -> dict[int, int]:
    """seed -> the weights `variant`'s run at `ratio` kept (non-zero, over its compressed layers)."""
    return {row["seed"]: sum(layer["nonzero"] for layer in row["layers"].values())
            for row in result["runs"] if row["variant"] == variant and row["ratio_target"] == ratio and row.get("layers")}


def _kept_change(first: dict, second: dict, variant: str, ratio: float) -> str:
    """The weights kept with fp16 steps and with log8, mean over the seeds both ran, and the change."""
    a, b = kept_weights(first, variant, ratio), kept_weights(second, variant, ratio)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "-"
    mean_a, mean_b = statistics.mean(a[k] for k in seeds), statistics.mean(b[k] for k in seeds)
    return f"{mean_a:,.0f} → {mean_b:,.0f} ({100 * (mean_b / mean_a - 1):+.1f}%)"


def step_format_summary() -> list[str]:
    """Every log8-against-fp16 pair of STEP_FORMAT_RUNS in one table: what `scale_format: auto` (log8 under
    a size target) changes for each method, and joint against sequential with it; and how many more weights
    each method kept with the bytes log8 frees, so a method that gains less is seen to gain less per weight,
    not to get fewer weights."""
    rows = []
    for model, _, (_, folder_a), (_, folder_b), (joint, seq), what in STEP_FORMAT_RUNS:
        first, second = _finished(load_compare(folder_a)), _finished(load_compare(folder_b))
        if what != LOG8_HOW or first is None or second is None or not same_teachers(first, second):
            continue
        for ratio in second["ratios"]:
            change = [_differences(by_seed(first, v, ratio), by_seed(second, v, ratio)) for v in (joint, seq)]
            gap = _differences(by_seed(second, seq, ratio), by_seed(second, joint, ratio))
            if min(len(change[0]), len(change[1]), len(gap)) < 2:
                continue
            images = f"{second.get('train_images', 60000):,}"
            rows.append(f"| {MODELS[model]} | {ratio:g}x | {images} | {second['epochs']} | {_mean_se(change[0])} | "
                        f"{_mean_se(change[1])} | {_mean_se(gap)} | {_kept_change(first, second, joint, ratio)} | "
                        f"{_kept_change(first, second, seq, ratio)} | `{folder_b}` |")
    if not rows:
        return []
    return ["## Step sizes in one byte (the default under a size target) against two, every measured point", "",
            "`quant_lsq.scale_format: auto`, the default, trains and stores step sizes on a 2^(1/16) grid in one byte "
            "each (log8) when the run has a size target, fp16 otherwise. Each point below ran both ways on the same "
            "teachers and code (the sections after this one); differences in points of test error, log8 minus fp16, "
            "paired by seed (3 seeds unless the sections say more), bold beyond 2 standard errors; then joint minus "
            "sequential with log8, and the weights each method kept (non-zero, over the compressed layers; mean over "
            "the seeds) with fp16 steps and with log8: what it bought with the bytes log8 frees.", "",
            "| model | target | training images | epochs | joint: log8 − fp16 | sequential: log8 − fp16 | joint − sequential, "
            "log8 | joint: weights kept, fp16 → log8 | sequential: weights kept, fp16 → log8 | log8 results |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + rows + [""]


def step_format_section() -> list[str]:
    """Each pair of STEP_FORMAT_RUNS: errors and files, the second minus the first paired by seed."""
    lines = []
    for model, title, (label_a, folder_a), (label_b, folder_b), variants, what in STEP_FORMAT_RUNS:
        first, second = _finished(load_compare(folder_a)), _finished(load_compare(folder_b))
        if first is None or second is None:
            continue  # a run not written yet, or still in progress
        same = same_teachers(first, second)
        lines += [f"## {MODELS[model]} on MNIST {title}", "",
                  f"Reproduce, {label_b}: {_reproduce(second, model)}; {label_a}: {_reproduce(first, model)}. {what} "
                  + ("Same teachers (same seeds, the same teacher accuracies), so the difference is paired by seed." if same
                     else "The teachers differ: the difference is not paired."), "",
                  f"| target | variant | error, {label_a} | error, {label_b} | file, {label_a} | file, {label_b} | "
                  f"{label_b} − {label_a} (points) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += paired_rows(first, second, variants, same, files=True) + [""]
    return lines


# (best on the test split, last, best on held-out training images) of one point: the first two on the same
# teachers, the third on teachers trained without the held-out images
KEEP_RULE_PAIRS = (("compare_lenet300_100x_e10_keep_best", "compare_lenet300_100x_e10_keep_last",
                    "compare_lenet300_100x_e10_keep_best_val"),
                   ("compare_lenet5_200x_e6_keep_best", "compare_lenet5_200x_e6_keep_last",
                    "compare_lenet5_200x_e6_keep_best_val"),
                   ("compare_lenet5_2k_obdland", None, "compare_lenet5_200x_2k_obdland_val"),
                   ("compare_lenet5_2k_obdland", None, "compare_lenet5_100x_2k_obdland_val"),
                   ("compare_lenet300_100x_e20_obdland_10seeds", None, "compare_lenet300_100x_e20_obdland_val"),
                   ("compare_lenet300_100x_obdland", None, "compare_lenet300_100x_obdland_val"),
                   ("compare_lenet5_100x_obdland", None, "compare_lenet5_100x_obdland_val"),
                   ("compare_lenet5_400x_obdland", None, "compare_lenet5_400x_obdland_val"),
                   ("compare_lenet5_400x_2k_obdland", None, "compare_lenet5_400x_2k_obdland_val"),
                   ("compare_lenet300_100x_2k_obdland_10seeds", None, "compare_lenet300_100x_2k_obdland_val_10seeds"),
                   ("compare_resnet_20x_obdland", None, "compare_resnet_20x_obdland_val"),
                   ("compare_lenet300_60x_2k_obdland_20seeds", None, "compare_lenet300_60x_2k_obdland_val_10seeds"),
                   ("compare_lenet300_60x_paced_10seeds", None, "compare_lenet300_60x_obdland_val_10seeds"),
                   ("compare_lenet5_200x_3bit_paced_obd", None, "compare_lenet5_200x_3bit_obdland_val"),
                   ("compare_lstm_30x_2k", None, "compare_lstm_30x_2k_obdland_val"),
                   ("compare_seqcnn_60x_fp16norm", None, "compare_seqcnn_60x_obdland_val"),
                   ("compare_vit_30x_fp16norm", None, "compare_vit_30x_obdland_val"),
                   ("compare_lstm_30x", None, "compare_lstm_30x_obdland_val"))


def keep_rule_section(pairs=KEEP_RULE_PAIRS) -> list[str]:
    """Points run with each rule: the best epoch at the target chosen on the test split, the last, or the best
    chosen on training images held out: how much of joint's difference is the choice of epoch on the test split."""
    pairs = [(b, l, load_compare(b), l and load_compare(l), v, _finished(load_compare(v))) for b, l, v in pairs]
    pairs = [p for p in pairs if p[2] is not None and (p[3] is not None or p[5] is not None)]
    if not pairs:
        return []
    out = ["## Which epoch a run keeps (best on the test split, the last, or best on held-out training images)", "",
           "compress() ends with the best evaluated epoch at the target (`training.keep: best`); the command line and "
           "the benchmarks evaluate on the test split they report, unless `training.validation_images` (`--val-images`) "
           "holds training images out to choose on. The joint form is at its target from its half-way "
           "trim, sequential only after its trim at 0.9 of the run, so in a long run joint keeps the best of more test "
           "readings. The same points, the same teachers and seeds, run with the first two rules (paired by seed, ± one "
           "standard error); the third rule's runs train their teachers and variants without the held-out images (5,000 "
           "of 60,000; 200 of a 2,000-image set), the same seeds, so they pair with each other only:", "",
           "| model | target | training images | epochs | rule | variant | joint error | sequential error | difference | verdict | epochs it "
           "could end with (joint / sequential) | results |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    shown = set()  # a folder paired with two held-out folders (one per ratio) is listed once
    for best, last, rb, rl, val, rv in pairs:
        for name, r in ((best, rb), (last, rl), (val, rv)):
            if r is not None and name not in shown:
                shown.add(name)
                out += _keep_rule_rows(_keep_rule(r), name, r)
    out += ["", "Each variant's error with `last` minus with `best`, the same seeds:", ""]
    for best, last, rb, rl, _, _ in (p for p in pairs if p[3] is not None):
        moved = {v: _rule_change(rb, rl, v) for v in sorted({row["variant"] for row in rb["runs"]})}
        out.append(f"- {MODELS[rb['model']]} at {', '.join(f'{x:g}x' for x in rb['ratios'])}, {rb['epochs']} epochs: "
                   + "; ".join(f"{v} {m:+.2f} points" for v, m in moved.items() if m is not None) + ".")
    out += ["", "Rows elsewhere in this file were measured with `best` on the test split unless they say otherwise; "
            "where they ran 6 or more epochs on 60,000 images the joint form could end with more epochs than sequential, "
            "and they carry a bias of the size measured here.", "",
            "Reproduce: " + "; ".join(dict.fromkeys(f"`{c}`" for p in pairs for r in (p[2], p[3], p[5])
                                                    if r is not None for c in _commands(r)))
            + ".", ""]
    return out


def _commands(r: dict) -> list[str]:
    """The commands behind a loaded folder's rows: its own, and those of the runs load_compare borrowed."""
    borrowed = [r["sequential_from"][1]] if r.get("sequential_from") else []
    return [c for c in [r["command"], *borrowed, *(c for _, _, c in r.get("joint_from", []))] if c]


def _finished(r: dict | None) -> dict | None:
    """A compare result once its run has ended (compare_mnist.py stores the command last), else None."""
    return r if r is not None and "command" in r else None


# runs on a GPU and the stored CPU runs of the same point (same command otherwise, same seeds)
GPU_PAIRS = (("compare_lenet5_200x_e6_cuda_s0", "compare_lenet5_200x_e6_keep_best"),
             ("compare_lenet5_200x_2k_obdland_val_cuda", "compare_lenet5_200x_2k_obdland_val"))


def gpu_section(pairs=GPU_PAIRS) -> list[str]:
    """The same compare command with --device cuda, beside the CPU runs of its seeds: what a GPU changes
    (the wall time) and what it must not (the accuracies, to the run-to-run noise of another device)."""
    loaded = [((g, load_compare(g)), (c, load_compare(c))) for g, c in pairs]
    loaded = [(g, c) for g, c in loaded if g[1] is not None and c[1] is not None]
    if not loaded:
        return []
    out = ["## On a GPU (--device cuda)", "",
           "The same comparison with every teacher and variant trained on a GPU (`--device cuda`; the artifacts are "
           "written and measured on the CPU as always), beside the CPU runs of the same seeds. The machine is recorded "
           "with each run. Error and wall time per run:", "",
           "| model | target | epochs | seed | variant | device | teacher error | error | file | wall s | results |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for gpu, cpu in loaded:
        seeds = {row["seed"] for row in gpu[1]["runs"]}
        for folder, r in (gpu, cpu):
            teachers = {u["seed"]: 1 - u["accuracy"] for u in r["uncompressed"]}
            for row in sorted((x for x in r["runs"] if x["seed"] in seeds), key=lambda x: (x["seed"], x["variant"])):
                out.append(f"| {MODELS[r['model']]} | {row['ratio_target']:g}x | {r['epochs']} | {row['seed']} | "
                           f"{row['variant']} | {r.get('device', 'cpu')} | {100 * teachers[row['seed']]:.2f}% | "
                           f"{100 * row['error']:.2f}% | {row['file_bytes']:,} B | {row['wall_s']:.0f} | `{folder}` |")
    for gpu, cpu in loaded:
        ratios = {name: _wall_ratio(r, {row["seed"] for row in gpu[1]["runs"]}) for name, r in (("GPU", gpu[1]), ("CPU", cpu[1]))}
        if all(v is not None for v in ratios.values()):
            out += ["", f"The joint run's wall time is {ratios['GPU']:.1f}x the sequential run's on the GPU and "
                        f"{ratios['CPU']:.1f}x on the CPU: the joint form's extra work (its size estimate at every step, and the "
                        "calibrations and landing probes that encode the weights file on the CPU, about 40 a run) gains "
                        "less from the GPU than the training itself (an inference from these wall times; the GPU run was "
                        "not profiled)."]
        out += _gpu_paired_lines(gpu, cpu)
        out += ["", f"GPU machine: {gpu[1].get('machine', 'not recorded')}.", "",
                "Reproduce: " + "; ".join(f"`{r['command']}`" for _, r in (gpu, cpu)) + "."]
    return out + _gpu_suite_lines() + [""]


def _gpu_suite_lines(folder: Path = ROOT / "benchmarks" / "results" / "gpu_check") -> list[str]:
    """The last GPU machine's test results (benchmarks/gpu_check.sh), where they are stored."""
    try:
        cuda = (folder / "cuda_tests.log").read_text().strip().splitlines()[-1]
        suite = (folder / "suite.log").read_text().strip().splitlines()[-1]
        env = [re.sub(r" \(UUID: [^)]*\)", "", line) for line in (folder / "env.log").read_text().strip().splitlines()]
    except (OSError, IndexError):
        return []
    return ["", f"Tests on the same kind of machine ({'; '.join(env)}), `bash benchmarks/gpu_check.sh`: "
                f"`tests/test_cuda.py` {cuda.strip('= ')}; the rest of the suite {suite.strip('= ')} "
                f"(logs in `benchmarks/results/gpu_check/`)."]


def _gpu_paired_lines(gpu: tuple, cpu: tuple) -> list[str]:
    """Joint minus sequential, paired by seed, on each device (where the GPU run has two or more seeds)."""
    lines = []
    for device, (folder, r) in (("GPU", gpu), ("CPU", cpu)):
        for p in r.get("paired", []):
            if p["n"] >= 2:
                lines.append(f"{device}, {p['variant']} minus {p['baseline']} at {p['ratio_target']:g}x: "
                             f"{p['error_diff_mean']:+.2f} ± {p['error_diff_se']:.2f} points of error over seeds "
                             f"{', '.join(map(str, p['seeds']))} (`{folder}`).")
    return ["", " ".join(lines)] if lines else []


def _wall_ratio(r: dict, seeds: set[int]) -> float | None:
    """Joint's total wall time over sequential's, on the given seeds."""
    wall = {}
    for row in r["runs"]:
        if row["seed"] in seeds:
            kind = "sequential" if row["variant"] == "sequential" else "joint"
            wall[kind] = wall.get(kind, 0.0) + row["wall_s"]
    return wall["joint"] / wall["sequential"] if wall.get("sequential") and "joint" in wall else None


def _keep_rule_rows(rule: str, name: str, r: dict) -> list[str]:
    rows = []
    for ratio in r["ratios"]:
        seq = next((s for s in r["summary"] if s["variant"] == "sequential" and s["ratio_target"] == ratio), None)
        for s in (s for s in r["summary"] if s["ratio_target"] == ratio and s["variant"] != "sequential"):
            stats = paired_stats(r["runs"], s["variant"], ratio)
            if seq is None or stats is None:
                continue
            mean, se, n = stats
            at = [_epochs_at_target(name, v, ratio, r) for v in (s["variant"], "sequential")]
            rows.append(f"| {MODELS[r['model']]} | {ratio:g}x | {r.get('train_images', 60000):,} | {r['epochs']} | {rule} | "
                        f"{s['variant']} | "
                        f"{100 * s['error_mean']:.2f}% | {100 * seq['error_mean']:.2f}% | {mean:+.2f} ± {se:.2f} (n={n}) | "
                        f"{_verdict(mean, se)} | {at[0]} / {at[1]} | `{name}` |")
    return rows


def _rule_change(best: dict, last: dict, variant: str) -> float | None:
    """Mean over the seeds both ran of the variant's error under `last` minus under `best` (points)."""
    a = {(r["seed"], r["ratio_target"]): r["error"] for r in best["runs"] if r["variant"] == variant}
    b = {(r["seed"], r["ratio_target"]): r["error"] for r in last["runs"] if r["variant"] == variant}
    common = sorted(set(a) & set(b))
    return 100 * statistics.mean(b[k] - a[k] for k in common) if common else None


def _epochs_at_target(folder: str, variant: str, ratio: float, r: dict) -> str:
    """The mean number of evaluated epochs per run the run could end with (from the runs' histories): at the
    target, and after sequential's size trim, which forgets the states kept before it; '-' without histories."""
    counts = []
    for row in r["runs"]:
        path = ROOT / "benchmarks" / "results" / folder / row["dir"] / "history.json"
        if row["variant"] == variant and row["ratio_target"] == ratio and path.is_file():
            h = json.loads(path.read_text())
            forgot = max((e["step"] for e in h.get("events", []) if e.get("event") == "size_trim"
                          and e.get("step") is not None), default=-1)
            counts.append(sum(bool(e.get("at_target")) and e["step"] > forgot for e in h.get("epochs", [])))
    return f"{statistics.mean(counts):.1f}" if counts else "-"


def longer_run_section() -> list[str]:
    """LeNet-300-100 with the recipe's full 20 epochs (benchmarks/lenet300_mnist.py), if it ran."""
    path = ROOT / "benchmarks" / "results" / "lenet300_mnist.json"
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    fp32 = r["fp32_bytes"]
    out = ["## LeNet-300-100 on MNIST, 20 epochs (joint vs sequential at 90% and 95% sparsity, 4-bit)", "",
           f"Reproduce: `.venv/bin/{r['command']}`. Same teacher (10 epochs) and same 20 compression epochs "
           "for every row; global magnitude pruning, LSQ 4-bit, KD (the built-in `lenet300_mnist` recipe). "
           "Ratio (weights) = fp32 safetensors / (values + indices + scales + fp32 biases), Deep Compression's accounting; "
           "ratio (file) = fp32 safetensors / weights.safetensors on disk (adds the ~1 KB safetensors header).", "",
           "| run | error | ratio (weights) | ratio (file) | bytes (weights) | mean conflict rate |",
           "| --- | --- | --- | --- | --- | --- |"]
    for name, row in r["rows"].items():
        if name == "uncompressed":
            out.append(f"| uncompressed | {100 * (1 - row['accuracy']):.2f}% | 1x | 1x | {fp32:,} | - |")
            continue
        conflict = "-" if row.get("conflict_rate") is None else f"{row['conflict_rate']:.2f}"
        out.append(f"| {name} | {100 * (1 - row['accuracy']):.2f}% | {fp32 / row['bytes']:.1f}x | "
                   f"{fp32 / row['file_bytes']:.1f}x | {row['bytes']:,} | {conflict} |")
    goal = [(n, row) for n, row in r["rows"].items() if n != "uncompressed" and fp32 / row["bytes"] >= 60 and 1 - row["accuracy"] <= 0.016]
    out += ["", "Verdict: " + (
        "the >= 60x at <= 1.60% goal is met (weights accounting) by " + ", ".join(n for n, _ in goal)
        + "; on whole-file bytes the same runs are below 60x." if goal else "the >= 60x at <= 1.60% goal is not met."), ""]
    return out


def size_target_section() -> list[str]:
    """benchmarks/size_targets.py: where a size target lands with and without steering."""
    files = sorted((ROOT / "benchmarks" / "results").glob("size_targets_*.json"))
    if not files:
        return []
    lines = ["## Size targets: with and without steering (LeNet-300-100)", "",
             "Each ratio is run twice from the same teacher with the compare recipe: `steer: false` (the estimate made "
             "before training decides alone) and with steering (re-fits at 80% of the pruning ramp and at 90% of the run). "
             "`drift`: the bytes the unsteered run's state would encode to at its final per-layer targets, from the first "
             "to the last tenth of the run after LSQ starts.", "",
             "| data | ratio | goal bytes | unsteered file | steered file | drift in the unsteered run | command |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in files:
        r = json.loads(f.read_text())
        for ratio in sorted({row["ratio"] for row in r["runs"]}):
            off = next(x for x in r["runs"] if x["ratio"] == ratio and not x["steer"])
            on = next(x for x in r["runs"] if x["ratio"] == ratio and x["steer"])
            d = off.get("drift") or []
            drift = f"{d[0]['bytes']:,} -> {d[-1]['bytes']:,} B ({100 * (d[-1]['bytes'] / d[0]['bytes'] - 1):+.1f}%)" if d else "-"
            lines.append(f"| {f.stem.removeprefix('size_targets_')} | {ratio:g}x | {off['goal_bytes']:,} | "
                         f"{off['file_bytes']:,} ({off['deviation_pct']:+.2f}%) | {on['file_bytes']:,} ({on['deviation_pct']:+.2f}%) | "
                         f"{drift} | `{r['command']}` |")
    return lines + [""]


def accumulation_section() -> list[str]:
    """benchmarks/accumulation_coordination.py: what projecting each micro-batch on its own did to PCGrad's
    update, against the step's micro-batches resolved together (one batch's update)."""
    r = _load("accumulation_coordination.json")
    if r is None:
        return []
    lines = ["## PCGrad under gradient accumulation: micro-batches resolved together", "",
             f"{r['model']} on the {r['data']}, the joint form at {r['target_ratio']:g}x, {r['epochs']} epochs, "
             f"{r['coordination']}; K micro-batches a step (terms scaled by their share of the batch). A step once "
             "took the sum of its micro-batches' own projections; it now takes the projection of their summed "
             "per-term gradients, which equals one batch's (`tests/test_accumulation_fisher.py`). Per step, the "
             "distance between the two (||before - now|| / ||now||, over every coordinated parameter) and their cosine; "
             "per seed the median over the run's steps, then the mean ± standard error over seeds. PCGrad's own "
             "change of the update (stats.changed) is beside it for scale. Each run also ran with the step taking "
             f"the micro-batches' own projections, summed (as before); test accuracy of both on the {r['test_images']} "
             "held-out digits, and the difference paired by seed (points, bold beyond 2 standard errors). Resolving "
             "together makes K a memory setting (every K takes one batch's update); it is not claimed to be more "
             "accurate, and where the old sum was, the last column says so.", "",
             "| micro-batches | seeds | measured steps a run (the size term alive) | distance, median per seed | "
             "distance, largest step | cosine, smallest | PCGrad's change of the update, median | accuracy, "
             "resolved together | accuracy, each on its own | together − each on its own | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, runs in r["by_micro_batches"].items():
        medians = [x["distance_median"] for x in runs]
        changed = [x["changed_median"] for x in runs]
        se = statistics.stdev(medians) / math.sqrt(len(medians)) if len(medians) > 1 else 0.0
        together = {seed: x["accuracy"] for seed, x in enumerate(runs)}
        own = {seed: x["accuracy"] for seed, x in enumerate(r["each_on_its_own"][k])}
        lines.append(f"| {k} | {len(runs)} | {runs[0]['measured_steps']} | {100 * statistics.mean(medians):.1f}% ± "
                     f"{100 * se:.1f}% | {100 * max(x['distance_max'] for x in runs):.1f}% | "
                     f"{min(x['cosine_min'] for x in runs):.4f} | {100 * statistics.mean(changed):.1f}% | "
                     f"{100 * statistics.mean(together.values()):.2f}% | {100 * statistics.mean(own.values()):.2f}% | "
                     f"{_mean_se(_differences(own, together))} | `{r['command'].strip()}` |")
    return lines + [""]


def precision_section() -> list[str]:
    """benchmarks/precision_cost.py: training.precision bf16 against fp32, wall time and accuracy paired by seed."""
    results = [r for r in (_load(f"precision_cost_{m}.json") for m in ("lenet5", "resnet")) if r is not None]
    if not results:
        return []
    lines = ["## Training in bfloat16 (`training.precision: bf16`)", "",
             "The joint form under a size target, trained with the forward in bfloat16 autocast and in float32, "
             "alike otherwise (one float32 teacher, the same seeds, alternating which runs first, last epoch kept, "
             "1 thread; the stored LeNet-5 and ResNet scripts ran one after the other on the otherwise quiet 2-core machine). Wall time of the whole `compress()` run (evaluation after each epoch included); accuracy "
             "of the finalized float32 model on the 10,000 test images; bf16 − fp32 paired by seed (points, bold "
             "beyond 2 standard errors). CPU: " + results[0]["cpu"] + " (AVX512-BF16).", "",
             "| model | target | epochs | teacher | fp32 / bf16 run time, per seed | fp32 accuracy | bf16 accuracy | "
             "bf16 − fp32 | weights file, bf16 − fp32 (bytes) | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        acc = {p: {x["seed"]: x["test_accuracy"] for x in r["runs"] if x["precision"] == p} for p in ("fp32", "bf16")}
        size = r["bytes"]
        lines.append(f"| {r['model']} | {r['target_ratio']:g}x | {r['epochs']} | {100 * r['teacher_test_accuracy']:.2f}% | "
                     f"{', '.join(f'{v:.2f}x' for v in r['fp32_over_bf16_seconds'])} | "
                     f"{100 * statistics.mean(acc['fp32'].values()):.2f}% | {100 * statistics.mean(acc['bf16'].values()):.2f}% | "
                     f"{_mean_se(_differences(acc['fp32'], acc['bf16']))} | {size['bf16_minus_fp32_mean']:+.0f} ± "
                     f"{size['se']:.0f} | `{r['command'].strip()}` |")
    return lines + [""]


def lsq_init_section() -> list[str]:
    """benchmarks/lsq_init_8bit.py: 8-bit LSQ from the paper's first step against ones capped at headroom * max|w|/Q,
    paired by seed."""
    r = _load("lsq_init_8bit.json")
    if r is None:
        return []
    rows, arms = r["rows"], r["arms_minus_paper"]

    def seeds(key: str, fmt: str) -> str:
        return ", ".join(format(x[key], fmt) for x in rows)

    def cell(p: dict, scale: float) -> str:
        text = f"{scale * p['mean']:+.3f} ± {scale * (p['se'] or 0):.3f} (n={p['n']})"
        return f"**{text}**" if p["se"] and abs(p["mean"]) > 2 * p["se"] else text

    lines = ["## 8-bit LSQ: the first step size (what did not work)", "",
             "LSQ's first step, 2·mean|w|/√Q, can reach past a layer's largest weight at 8 bits (Q = 127), leaving "
             "levels unused. Capping it at `headroom` · max|w|/Q rounds the teacher's weights closer before training "
             "(last column), but after training the capped runs are no better (capped at 1x they lose); the package "
             "keeps the paper's step. LeNet-5 on MNIST, the demo's "
             "fast-model recipe (half of every channel group removed, 8-bit LSQ from 0.3 of the run, distillation), "
             f"every arm of a seed from one teacher; {r['test_rows']:,} test images, {r['threads']} thread. "
             f"Command: `{r['command']}`.", "",
             "| first step | accuracy (per seed) | − paper (points, paired) | largest level used (per seed) | "
             "finalize's logit change on the teacher (per seed) |", "| --- | --- | --- | --- | --- |",
             f"| paper's | {seeds('paper_accuracy', '.4f')} | | {seeds('paper_levels_used', 'd')} | "
             f"{seeds('paper_rounding_change', '.4f')} |"]
    for arm, d in arms.items():
        lines.append(f"| at most {arm.removeprefix('range_x')} · max\\|w\\|/Q | {seeds(arm + '_accuracy', '.4f')} | "
                     f"{cell(d['accuracy'], 100)} | {seeds(arm + '_levels_used', 'd')} | "
                     f"{seeds(arm + '_rounding_change', '.4f')} |")
    return lines + [""]


def norm_recalibration_section() -> list[str]:
    """benchmarks/norm_recalibration.py: training.recalibrate_norms 16 against 0, paired by seed."""
    r = _load("norm_recalibration.json")
    if r is None:
        return []
    lines = ["## BatchNorm statistics re-estimated before each evaluation (`training.recalibrate_norms`)", "",
             f"A {r['model']} on the {r['data']} at 10x (4-bit LSQ, magnitude masks, distillation; teacher "
             f"{100 * r['teacher_accuracy']:.2f}%), each run with `recalibrate_norms: 0` (the running averages training "
             "left, what every stored compare result without `norms re-estimated` used) and 16; accuracy of the saved "
             f"and loaded artifact on the held-out digits, {r['threads']} thread. Command: `{r['command']}`.", "",
             "| mode | accuracy, 0 (per seed) | accuracy, 16 (per seed) | 16 − 0 (points, paired) |", "| --- | --- | --- | --- |"]
    for p in r["paired"]:
        acc = {k: [x["accuracy"] for x in r["runs"] if x["mode"] == p["mode"] and x["recalibrate_norms"] == k] for k in (0, 16)}
        diff = f"{100 * p['mean']:+.1f} ± {100 * (p['se'] or 0):.1f} (n={p['n']})"
        lines.append(f"| {p['mode']} | {', '.join(f'{a:.3f}' for a in acc[0])} | {', '.join(f'{a:.3f}' for a in acc[16])} | "
                     f"{'**' + diff + '**' if p['se'] and abs(p['mean']) > 2 * p['se'] else diff} |")
    return lines + ["", "The sequential runs' size target trims their masks at 90% of the run; the running averages then "
                    "describe the untrimmed model, and the artifact stored them. docs/reliability.md says how the pass works.", ""]


# (model, where, folder with the running averages, folder re-estimating them, variants): the same command with
# --recalibrate-norms 16, same teachers (train_baseline keeps the running averages), paired by seed
RECALIBRATION_RUNS = (
    # the stored runs' teachers differ from today's in the third or fourth digit (another machine state): re-run
    # with the running averages beside the re-estimating runs, so the two pair by seed
    ("mobilenet", "2,000 training images, at 20x, BatchNorm folded", "compare_mobilenet_20x_2k_folded_rerun",
     "compare_mobilenet_20x_2k_folded_recal", ("joint-paced-obdland-none", "sequential")),
    ("seqcnn", "2,000 training images, at 60x, BatchNorm in fp16", "compare_seqcnn_60x_2k_fp16norm_rerun",
     "compare_seqcnn_60x_2k_fp16norm_recal", ("joint-paced-obd-none", "sequential")),
    ("seqcnn", "2,000 training images, at 30x, BatchNorm in fp16", "compare_seqcnn_30x_2k_fp16norm_rerun",
     "compare_seqcnn_30x_2k_fp16norm_recal", ("joint-paced-obd-none", "sequential")),
    ("seqcnn", "at 60x, BatchNorm in fp16", "compare_seqcnn_60x_fp16norm_rerun", "compare_seqcnn_60x_fp16norm_recal",
     ("joint-paced-obd-none", "sequential")),
    ("resnet", "at 20x", "compare_resnet_20x_fp16_steps", "compare_resnet_20x_recal", ("joint-paced-obdland-none", "sequential")))


def recalibration_pairs_section() -> list[str]:
    """Compare points on BatchNorm models re-run with their statistics re-estimated before each evaluation."""
    lines = []
    for model, where, before_folder, after_folder, variants in RECALIBRATION_RUNS:
        before, after = _finished(load_compare(before_folder)), _finished(load_compare(after_folder))
        if before is None or after is None:
            continue
        same = same_teachers(before, after)
        if not lines:
            lines = ["## BatchNorm models with their statistics re-estimated (`--recalibrate-norms 16`)", "",
                     "Compare points on models with BatchNorm, each run twice with the same teachers: with the running "
                     "averages (`--recalibrate-norms 0`, as every other stored result) and with the statistics re-estimated "
                     "on 16 training batches before each evaluation (`--recalibrate-norms 16`, the library's default) for "
                     "every variant. First table: each variant's error with the running averages and re-estimated; second: "
                     "joint − sequential under each (points, paired by seed, ± one standard error).", ""]
        lines += [f"### {MODELS[model]}, {where}", "", f"Reproduce: {_reproduce(after, model)}; running averages: "
                  f"{_reproduce(before, model)}." + ("" if same else " Their teachers differ (not the same machine "
                                                     "state), so the first table's difference is not paired.")
                  + ("" if before_folder.endswith("_rerun") else " The running-averages run is the stored one, made "
                     "by earlier code: any other change since is in the first table's difference too."), "",
                  "| target | variant | error, running averages | error, re-estimated | re-estimated − running (points) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += paired_rows(before, after, variants, same)
        lines += ["", "| target | joint variant | joint − sequential, running averages | joint − sequential, re-estimated |",
                  "| --- | --- | --- | --- |"]
        for ratio in after["ratios"]:
            cells = []
            for r in (before, after):
                st = paired_stats(r["runs"], variants[0], ratio)
                cells.append("-" if st is None else f"{st[0]:+.2f} ± {st[1]:.2f}, {_verdict(st[0], st[1])} (n={st[2]})")
            lines.append(f"| {ratio:g}x | {variants[0]} | {cells[0]} | {cells[1]} |")
        lines.append("")
    return lines


def torchrun_cost_section() -> list[str]:
    """benchmarks/torchrun_coordination_cost.py: the step time of resolving PCGrad on the global batch under
    torchrun, against each rank resolving its own."""
    r = _load("torchrun_coordination_cost.json")
    if r is None:
        return []
    lines = ["## PCGrad on the global batch under torchrun: what it costs", "",
             f"{r['setup']}. `global`: the ranks' per-term gradients averaged and resolved once on a measured step "
             "(the session now); `per_rank`: each rank resolves its own batch and the ranks average the results "
             "(what a step did before). Median step of rank 0 per launch; the two alternate over the rounds; the "
             f"ratio paired by round, mean ± standard error. Load average {r['load_average'][0]} before, "
             f"{r['load_average'][1]} after.", "",
             "| PCGrad measured | rounds | per_rank step (ms) | global step (ms) | global / per_rank | command |",
             "| --- | --- | --- | --- | --- | --- |"]
    for every in (1, 10):
        ratios = r["global_over_per_rank"][f"every{every}"]
        se = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else 0.0
        own, whole = r["median_step_ms"][f"per_rank_every{every}"], r["median_step_ms"][f"global_every{every}"]
        lines.append(f"| every {'step' if every == 1 else f'{every} steps'} | {len(ratios)} | "
                     f"{statistics.mean(own):.1f} ({min(own):.1f}-{max(own):.1f}) | "
                     f"{statistics.mean(whole):.1f} ({min(whole):.1f}-{max(whole):.1f}) | "
                     f"{statistics.mean(ratios):.2f} ± {se:.2f}x | `{r['command']}` |")
    return lines + [""]


def channels_size_section() -> list[str]:
    """benchmarks/channels_and_size.py: channels and a size target in one joint run, in two runs, and
    the size target alone (same teacher, epochs, distillation and target bytes per seed)."""
    files = sorted((ROOT / "benchmarks" / "results").glob("channels_and_size_*.json"))
    if not files:
        return []
    lines = ["## Channels and a size target: one joint run, two runs, the size target alone", "",
             "`one_run`: `mode: joint` with `prune_structured` beside the size target (the budget measures the file "
             "with the masked channels removed); `two_runs`: `prune_structured` for half the epochs, finalized, then "
             "the joint form on the smaller model for the other half; `size_only`: the joint form without channel "
             "pruning. Same teacher, total epochs, distillation and target bytes per seed; latency: the finalized "
             "model in PyTorch fp32, interleaved with the dense teacher (`deploy/timing.py`). Differences paired by "
             "seed, mean ± standard error.", "",
             "| point | variant | test error | weights file (B) | PyTorch fp32 speed-up over the teacher |",
             "| --- | --- | --- | --- | --- |"]
    commands = []
    for f in files:
        r = json.loads(f.read_text())
        seeds, first = r["per_seed"], r["per_seed"][0]
        what = f"{f.stem.removeprefix('channels_and_size_')}, target {first['target_bytes']:,} B, {len(seeds)} seeds"
        for v, row in r["summary"].items():
            lines.append(f"| {what} | {v} | {row['error']:.2f}% | {row['file_bytes']:,.0f} | {row['speedup_vs_teacher']:.2f}x |")
        for pair, stats in r["paired"].items():
            e, (a, b) = stats["error"], pair.split("-")
            verdict = f"{a} better" if e["mean"] < -2 * e["standard_error"] else f"{b} better" if e["mean"] > 2 * e["standard_error"] else "tie"
            lines.append(f"| {what} | {pair} (paired) | {e['mean']:+.2f} ± {e['standard_error']:.2f} ({verdict}) | "
                         f"{stats['file_bytes']['mean']:+,.0f} | {stats['speedup_vs_teacher']['mean']:+.2f}x |")
        commands.append(f"- {f.stem}: `{r['command']}`")
        if all(x["variants"]["one_run"]["widths"] == x["variants"]["two_runs"]["widths"] for x in seeds):
            commands.append(f"  - one_run and two_runs end with the same layer widths at every seed "
                            f"({first['variants']['one_run']['widths']}): their speed difference is the timing's "
                            "spread between two models of one architecture, not a difference in the models")
    lines += ["", "Commands:", "", *commands]
    return lines + [""]


def hf_speedups(mode: str, r: dict) -> dict:
    """Speed-ups of a mode's int8 student over the teacher: re-timed by benchmarks/hf_latency.py
    (deploy.timing) when its results exist, else the run's own timing."""
    path = ROOT / "benchmarks" / "results" / "hf_latency.json"
    if path.is_file():
        got = json.loads(path.read_text())["speedup_vs_teacher_fp32_torch"].get(mode)
        if got:
            return got
    return (r.get("int8") or {}).get("latency", {})


def hf_latency_note() -> str:
    path = ROOT / "benchmarks" / "results" / "hf_latency.json"
    if not path.is_file():
        return "latency 1 thread, seq len 64, teacher in PyTorch fp32, interleaved."
    h = json.loads(path.read_text())
    return (f"speed-ups re-timed by `.venv/bin/{h['command']}`: {h['threads']} thread(s) for every back end, ONNX Runtime "
            "with spinning off, interleaved rounds, medians, each also timed alone (flagged: "
            f"{', '.join(h['latency_ms'].get('flagged', [])) or 'none'}); same shapes with random weights, seq len "
            f"{h['seq_len']}, teacher in PyTorch fp32.")


def sst2_target_section() -> list[str]:
    """MiniLM-L6 on SST-2 under a size target: the heads and FFN neurons kept planned from the
    artifact's bytes (benchmarks/hf_sst2_core.py --ratio R; hf/size_target.py)."""
    runs = sorted((ROOT / "benchmarks" / "results").glob("hf_sst2_core_ratio*.json"))
    if not runs:
        return []
    out = ["### A size target (`target: {ratio: R}` in the hf recipe)", "",
           "The recipe above with a size target instead of its fixed sparsities: the heads and FFN neurons kept are planned "
           "before training from the artifact encoder's bytes (hf/size_target.py, aiming 1% under the target), in the "
           "recipe's 1 : 1.5 proportion. Target and file: the packed artifact's weights file (weights.jcw) against the "
           "teacher's fp32 weights. Accuracy: the artifact loaded back, dev set. Step sizes in fp16, as the script "
           "pins them (`--scale-format`; the library's default under a size target stores them in one byte each, "
           "not run here).", "",
           "| command | target | planned | weights file | met | heads / FFN neurons | dev acc | % of teacher | int8 dev acc |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in runs:
        r = json.loads(path.read_text())
        a, tg, st, q = r["artifact"], r["artifact"]["target"], r["student"], r.get("int8") or {}
        out.append(f"| `{r['command']}` | {tg['ratio']:g}x ({tg['goal_bytes']:,} B) | {tg['planned_bytes']:,} B | "
                   f"{tg['weights_bytes']:,} B ({tg['ratio_reached']:.1f}x) | {'yes' if tg['met'] else '**no**'} | "
                   f"{sum(st['heads_per_layer'])} / {sum(st['intermediate_per_layer']):,} | {100 * a['dev_accuracy']:.2f}% | "
                   f"{100 * a['accuracy_ratio_vs_teacher']:.1f}% | "
                   + (f"{100 * q['dev_accuracy']:.2f}% |" if q else "- |"))
    return out + [""]


def sst2_section() -> list[str]:
    """MiniLM-L6 on SST-2 through the core loop, joint vs sequential (benchmarks/hf_sst2_core.py)."""
    runs = {mode: ROOT / "benchmarks" / "results" / f"hf_sst2_core{suffix}.json"
            for mode, suffix in (("joint", ""), ("sequential", "_sequential"), ("progressive", "_progressive"))}
    got = {mode: json.loads(p.read_text()) for mode, p in runs.items() if p.is_file()}
    if not got:
        return []
    any_run = next(iter(got.values()))
    t = any_run["teacher"]
    out = ["## MiniLM-L6 on SST-2 (transformer: heads, FFN neurons, LSQ, KD)", "",
           "Reproduce: " + "; ".join(f"`.venv/bin/{r['command']}`" for r in got.values()) + ". "
           f"Teacher: MiniLM-L6-H384 fine-tuned on SST-2 (`benchmarks/hf_sst2.py teacher`), dev {100 * t['dev_accuracy']:.2f}% on "
           f"{any_run['dev_rows']} rows, {t['folder_bytes']:,} bytes of fp32 weights. Student: "
           f"{any_run['student']['layers']} of the teacher's {t['layers']} layers (DistilBERT-style), 1/3 of the heads and 1/2 of the FFN neurons "
           "removed, 8-bit LSQ on the encoder Linears, KD, one epoch over all "
           f"{any_run['train_rows']:,} train rows, vocabulary trimmed to the training text. "
           "joint = everything at once; sequential = the same steps as prune (40%) -> fine-tune (10%) -> quantize (40%) -> "
           "fine-tune (10%), KD throughout; progressive = prune the 6-layer teacher (task loss) for one epoch, build the "
           "student from the pruned teacher's layers, distil, then LSQ + KD for one epoch, both stages over the same random "
           "half of the train rows (the same number of steps as the others). Artifact = weights.safetensors + manifest.json of the packed artifact, loaded back "
           "and evaluated; int8 = ONNX Runtime int8 with the trained LSQ scales; " + hf_latency_note(), "",
           "| run | heads / FFN neurons | dev acc | % of teacher | artifact bytes | smaller | int8 dev acc | int8 bytes | speed-up b1 | speed-up b32 |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
           f"| teacher fp32 | {t['heads']} / {t['ffn_neurons']:,} | {100 * t['dev_accuracy']:.2f}% | 100% | {t['folder_bytes']:,} | 1x | - | - | 1x | 1x |"]
    for mode, r in got.items():
        a, q = r["artifact"], r.get("int8") or {}
        lat = hf_speedups(mode, r)
        st = r["student"]
        out.append(f"| {mode} | {sum(st['heads_per_layer'])} / {sum(st['intermediate_per_layer']):,} | {100 * a['dev_accuracy']:.2f}% | {100 * a['accuracy_ratio_vs_teacher']:.1f}% | "
                   f"{a['bytes']['model']:,} | {a['size_ratio_vs_teacher']:.1f}x | "
                   f"{100 * q['dev_accuracy']:.2f}% | {q['int8_onnx_bytes']:,} | {lat.get('speedup_b1')}x | {lat.get('speedup_b32')}x |")
    if "progressive" in got:
        out += ["", "The progressive student is smaller than the others: its heads and neurons were chosen on the 6-layer "
                "teacher (the same fractions of 72 heads and 9,216 neurons), and the 4 layers it keeps hold fewer of the "
                "kept units than a 1/3 and 1/2 cut of the student's own would. Its vocabulary was also trimmed to the half "
                f"of the train rows it saw ({got['progressive']['student'].get('vocab_kept', 0):,} word pieces vs "
                f"{(got.get('joint') or got['progressive'])['student'].get('vocab_kept', 0):,})."]
    out += ["", "Targets (issue: >= 8x smaller, >= 3x faster at batch 1 and 32, >= 98% of the teacher's dev accuracy):", ""]
    for mode, r in got.items():
        a, q = r["artifact"], r.get("int8") or {}
        lat = hf_speedups(mode, r)
        checks = {"size": a["size_ratio_vs_teacher"] >= 8, "speed": min(lat.get("speedup_b1", 0), lat.get("speedup_b32", 0)) >= 3,
                  "accuracy (artifact)": a["accuracy_ratio_vs_teacher"] >= 0.98,
                  "accuracy (int8)": (q.get("accuracy_ratio_vs_teacher") or 0) >= 0.98}
        out.append(f"- {mode}: " + ", ".join(f"{k} {'met' if v else '**missed**'}" for k, v in checks.items()) + ".")
    jr = got.get("joint")
    for other in ("sequential", "progressive"):
        if jr is None or other not in got:
            continue
        sr = got[other]
        se = 100 * (jr["artifact"]["dev_accuracy"] * (1 - jr["artifact"]["dev_accuracy"]) / jr["dev_rows"]) ** 0.5
        stages = [("packed artifact", jr["artifact"]["dev_accuracy"], sr["artifact"]["dev_accuracy"]),
                  ("int8 ONNX", (jr.get("int8") or {}).get("dev_accuracy"), (sr.get("int8") or {}).get("dev_accuracy"))]
        if other == "sequential":  # the same student trained both ways: compare before the export steps too
            stages.insert(0, ("trained (masked, full vocabulary)", jr["student"]["dev_accuracy_masked"],
                              sr["student"]["dev_accuracy_masked"]))
        diffs = [100 * (j - q) for _, j, q in stages if j is not None and q is not None]
        verdict = ("tied within noise: every difference is below one standard error"
                   if all(abs(d) < se for d in diffs) else
                   "joint ahead at every stage" if all(d > 0 for d in diffs) else
                   f"{other} ahead at every stage" if all(d < 0 for d in diffs) else "mixed")
        out.append(f"- Joint vs {other}: {verdict} (one seed; one standard error of a dev accuracy here is about "
                   f"{se:.1f} points). " + "; ".join(f"{name}: {100 * j:.2f}% vs {100 * q:.2f}%"
                                                      for name, j, q in stages if j is not None and q is not None) + ".")
    return out + [""]


VARIANTS_TEXT = [
    "## What each variant does", "",
    "- **joint-none / joint-scale / joint-pcgrad** (since the size-budget joint mode): `quant_lsq` with `zero_level: true` "
    "(a learned per-channel dead zone makes zero a level of the quantizer; bits fixed at `quant_lsq.bits`) and "
    "`size_budget` (the weights file's bytes as an augmented-Lagrangian constraint, calibrated against the writer, "
    "warmed up over the masks' window, pattern fixed and projected onto the target at 80% of the run, then fine-tuning), "
    "with distillation throughout; the suffix is the gradient coordination between the loss terms (task, distill, size: "
    "PCGrad takes one gradient per term; docs/joint.md). **joint-acc-pcgrad** is joint-pcgrad with task and distill "
    "summed into one accuracy gradient first (`coordination.accuracy_as_one`): PCGrad between accuracy and size only, "
    "one backward fewer per measured step.",
    "- **sequential**: the allocator's per-layer sparsity and bits (measured candidate artifacts), magnitude pruning -> "
    "fine-tune -> LSQ -> fine-tune over the same total steps, the same distillation, size steering onto the target bytes.",
    "- **sequential-sens**: sequential on the budgets the allocator makes from a sensitivity scan of each seed's teacher "
    "instead of the ERK proxy (`target.allocator: sensitivity`); its own section below.",
    "- **sequential-norefit**: sequential whose masks stay as fitted when LSQ first rounds them "
    "(`target.refit_on_rounding: false`; the default re-fits them where many kept weights round to zero, at 2 bits); "
    "see \"LeNet-300-100 at 100x, 2 bits, longer training\".",
    "- **overlap**: the earlier joint mode (masks and LSQ at overlapping times on the allocator's budgets).",
    "- Options of the joint mode (`compare.JOINT_OPTIONS`, not in the default set; the suffix is again the coordination): "
    "**`joint-fisher-*`** prices a pruned weight by its Fisher (OBD) loss cost, warms the budget up on a cubic "
    "schedule and fine-tunes after the freeze with its own LR; **`joint-bits-*`** adds learned per-layer widths (2-8 "
    "bits) under the same byte budget; **`joint-stiff-*`** is joint-bits with the constraint's quadratic term at 30 "
    "instead of 1; **`joint-early-*`** is joint-stiff with the budget on target at 20% of the run and the freeze at 30%; "
    "**`joint-paced-*`** is joint-fisher (fixed widths) with the quadratic term at 30 and a decision window of about "
    "1,000 steps (on target after them, frozen half a window later, between 20% and 80% of the run), the rest of "
    "the run fine-tuning the fixed pattern; **`joint-paced-aw-*`** adds the multiplier's anti-windup; "
    "**`joint-paced-lin-*`** is joint-paced with the budget's goal falling log-linearly over the window instead of on "
    "the cubic (fast first); **`joint-paced-obd-*`** is joint-paced whose landing cuts by Fisher cost per byte "
    "(`landing_order: fisher`; the benchmarks' recipe); **`joint-paced-obdrank-*`** is that one with its Fisher saliency "
    "made size-neutral (`saliency_mode: rank`), **`joint-paced-obdland-*`** with the Fisher estimate in the landing only "
    "(`saliency_mode: landing`: nothing on the dead zones), **`joint-paced-obdtrack-*`** with the state cut back to 25% "
    "over the budget's goal at every check inside the decision window where it lags further (`lag_tolerance: 0.25`; "
    "the catch-up after the window is unchanged), **`joint-paced-obdland-nz-*`** the joint form on the nonzero grid "
    "(`quant_lsq.nonzero_grid`: a kept weight's levels are ±1 to ±2^(bits-1) steps, every code of its width a "
    "non-zero level), **`joint-paced-obdland-nz-erk-none`** that with every layer's bytes between half and twice "
    "its ERK share of the budget (`size_budget.layer_split: erk`).",
    "",
    "Every variant gets the same teacher, epochs, data and target bytes; differences are paired by seed. Each run "
    "ends with its best evaluated epoch among those at the target (`training.keep: best`), and the evaluation is the "
    "test split the tables report: the best of several test readings, and the joint form is at its target for more "
    "epochs than sequential in long runs (from about 0.65 of the run against 0.9). Where the epochs column says "
    "\"last kept\", every variant ended with its last epoch (`--keep last`), the same rule for both; where it says "
    "\"best on N held-out training images\", every teacher and variant chose its epoch on training images held out "
    "for it (`--val-images`; the test split only reported on, the training images column counts what remained); the "
    "section \"Which epoch a run keeps\" below measures what the rule changes.", "",
]


def _load(name: str) -> dict | None:
    path = ROOT / "benchmarks" / "results" / name
    return json.loads(path.read_text()) if path.is_file() else None


SHORT_RUNS = ("digits_compare_e4", "digits_compare_e12", "digits_compare_e40")  # `jointcompress compare` on the digits


def short_runs_section() -> list[str]:
    """The joint form against sequential in short runs on the embedded digits (a few hundred steps or fewer), where
    a new user's first compare lands: the paced decision window wants about 1,000 steps, and it loses under it."""
    rows = []
    for folder in SHORT_RUNS:
        r = _load(f"{folder}/compare.json")
        if r is None:
            continue
        steps = r["epochs"] * math.ceil(r["train_images"] / r["recipe"]["training"]["batch_size"])
        for ratio in r["ratios"]:
            st = paired_stats(r["runs"], JOINT_FORM_VARIANT, ratio)
            errors = {s["variant"]: s["error_mean"] for s in r["summary"] if s["ratio_target"] == ratio}
            if st is None or not {JOINT_FORM_VARIANT, "sequential"} <= set(errors):
                continue
            mean, se, n = st
            rows.append(f"| {r['epochs']} | {steps:,} | {ratio:g}x | {100 * errors[JOINT_FORM_VARIANT]:.2f}% | "
                        f"{100 * errors['sequential']:.2f}% | {mean:+.2f} ± {se:.2f} (n={n}) | {_verdict(mean, se)} | "
                        f"`{r['command']}` |")
    if not rows:
        return []
    return ["## Short runs on the embedded digits (where joint loses)", "",
            f"`jointcompress compare` with the demo's recipe on LeNet-300-100 and the embedded digits ({_load(SHORT_RUNS[0] + '/compare.json')['train_images']:,} training images, "
            f"{JOINT_FORM_VARIANT}, what `mode: joint` trains, against sequential; 3 seeds, paired, ± one standard "
            "error; every kept epoch chosen on the test split, as compare does by default). The joint form's decision "
            "window wants about 1,000 steps (docs/joint.md, and the run warns when it gets fewer); the table shows what a "
            "shorter run costs it.", "",
            "| epochs | steps | target | joint error | sequential error | difference | verdict | command |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]


def cnn_latency_section() -> list[str]:
    """LeNet-5 (50% of channels, cnn_deploy.py) in every back end, batch 1 and 64 (cnn_latency.py)."""
    r = _load("cnn_latency_lenet5_t1.json")
    if r is None or "batch64" not in r:
        return []
    out = ["### LeNet-5 with half its channels removed, every back end", "",
           f"Reproduce: `.venv/bin/{r['command']}`. Weights: {r['weights']} (the trained model's accuracy is in "
           "`cnn_deploy_lenet5.json`). Median ms, interleaved (alone in brackets); speed-up vs dense fp32 PyTorch.", "",
           "| back end | b1 ms | b1 speed-up | b64 ms | b64 speed-up |", "| --- | --- | --- | --- | --- |"]
    for k in r["batch64"]["latency_ms"]:
        out.append(f"| {k} | " + " | ".join(timing_cells(r, k)) + " |")
    return out + [""]


def timing_cells(timing: dict, contender: str) -> list[str]:
    """Interleaved ms (alone in brackets, flagged when they disagree) and speed-up, at batch 1 and 64."""
    cells = []
    for b in ("batch1", "batch64"):
        t = timing[b]
        flag = " (flagged)" if contender in t["flagged"] else ""
        cells += [f"{t['latency_ms'][contender]:.3f} ({t['alone_ms'][contender]:.3f}){flag}",
                  f"{t['speedup_vs_dense_fp32_torch'][contender]:.1f}x"]
    return cells


def against_tp_section(model: str, variant: str = "", title: str = "") -> list[str]:
    """jointcompress vs Torch-Pruning + int8 at equal accuracy (benchmarks/against_torch_pruning.py);
    `variant`: the result file's suffix (e.g. "_both_batches"), `title`: what it changes."""
    r = _load(f"against_torch_pruning_{model}{variant}.json")
    if r is None:
        return []
    acc, tm, tp = r["accuracy"], r["timing"], r["torch_pruning"]
    name = {"lenet5": "LeNet-5", "resnet": "Small ResNet (models.SmallResNet)"}.get(model, model)
    out = [f"### {name} on MNIST: jointcompress vs Torch-Pruning + int8, at equal accuracy{title}", "",
           f"Reproduce: `.venv/bin/{r['command']}`. {r['train_rows']:,} train rows; dense teacher: {r.get('teacher', '')}. "
           f"Latency target = dense fp32 PyTorch at batch 64 / {r['target']['speedup']:g} = "
           f"{r['target']['latency_ms_b64']:.3f} ms. Both contenders fine-tune with KD from the same teacher; "
           f"Torch-Pruning (MagnitudePruner, L2, uniform ratio) is pruned step by step and kept at the fastest stage "
           f"whose accuracy matches ours after at least our {tp['train_steps']:,} training steps (step "
           f"{tp['chosen_step']}; matched: {'yes' if tp['matched'] else '**no**'}). "
           + (f"Ours drops the residual block(s) {', '.join(r['ours']['dropped_blocks'])} whole (prune_blocks; a "
              "\"-\" width is a group inside it). " if (r.get("ours") or {}).get("dropped_blocks") else "") +
           (f"Ours runs {', '.join(f'{n} at stride {v[0]}' for n, v in r['ours']['strides'].items())} (raise_stride: "
            "every later map a quarter the size). " if (r.get("ours") or {}).get("strides") else "") +
           (f"Torch-Pruning starts from {r['torch_pruning_start']}. " if r.get("torch_pruning_start", "").startswith(
               "the teacher as ours") else "") +
           f"{r['threads']} thread(s) for every contender; ONNX Runtime contenders bound with IOBinding; "
           f"machine: {(r.get('machine') or {}).get('shared', 'not recorded')}. Median ms interleaved (alone in brackets).", "",
           f"| contender | widths ({'/'.join(r['widths']['dense'])}) | test acc | b1 ms | b1 speed-up | b64 ms | b64 speed-up |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    widths = {"dense": r["widths"]["dense"], "ours": r["widths"]["ours"], "tp": r["widths"]["torch_pruning"]}
    for k in tm["batch64"]["latency_ms"]:
        w = widths["dense" if k.startswith("dense") else "ours" if k.startswith("ours") else "tp"]
        shown = "/".join(str(w.get(g, "-")) for g in r["widths"]["dense"])  # "-": a group inside a dropped block
        out.append(f"| {k} | {shown} | {100 * acc[k]:.2f}% | " + " | ".join(timing_cells(tm, k)) + " |")
    out += ["", "Torch-Pruning's curve (each stage after its share of the budget; ONNX Runtime fp32, alone):", "",
            "| step | ratio | widths | selection acc | b1 ms | b64 ms |", "| --- | --- | --- | --- | --- | --- |"]
    for s in tp["stages"]:
        out.append(f"| {s['step']} | {s['ratio']:.2f} | {'/'.join(str(v) for v in s['widths'].values())} | "
                   f"{100 * s['selection_accuracy']:.2f}% | {s['ort_fp32_alone_ms']['batch1']:.4f} | "
                   f"{s['ort_fp32_alone_ms']['batch64']:.3f} |")
    chosen_on = (f"{r['selected_on']}" if r.get("selected_on") else
                 f"the first {r['config']['select_images']:,} test images, as measured before choices read held-out "
                 "training images")
    out += ["", f"Ours on the selection images ({chosen_on}): {100 * r['match']['ours_selection_accuracy']:.2f}%; "
                "Torch-Pruning's "
            "candidates after the full budget: " + ", ".join(f"step {c['step']} {100 * c['selection_accuracy_full_budget']:.2f}%"
                                                          for c in tp["candidates"]) + ".", ""]
    return out + tp_verdict(acc, tm) + [""]


def reshape_choice_section(name: str, named_run: str, option_runs: list[str], title: str) -> list[str]:
    """Ours alone, the allocator choosing the reshaping (`--drop-blocks auto --strides 1,2`): every
    option it allocated for, the one it kept, the run that named the same reshaping by hand, and
    the other options each allocated and trained alone (does the predicted loss rank them as training does?)."""
    r, named = _load(name), _load(named_run)
    if r is None:
        return []
    ours, tm, groups = r["ours"], r["timing"], list(r["widths"]["dense"])
    out = [f"### {title}", "",
           f"Reproduce: `.venv/bin/{r['command']}`. {r['train_rows']:,} train rows; dense teacher: {r.get('teacher', '')}. "
           f"Target {r['target']['latency_ms_b64']:.3f} ms (ONNX Runtime fp32, batch 64). Every option is allocated on the "
           f"teacher so reshaped (recovered by KD for {ours['drop_recovery_steps']:,} steps where it is reshaped) and "
           "confirmed on ONNX Runtime; the kept one is the lowest predicted held-out loss among those that met the target "
           f"(`deploy/against.py: choose_drop`). Machine: {(r.get('machine') or {}).get('shared', 'not recorded')}.", "",
           f"| blocks dropped | stem stride | widths ({'/'.join(groups)}; \"-\": dropped) | measured ms (alone, as the target measures) | met | "
           "predicted held-out loss | kept |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in ours["drop_options"]:
        kept = o["blocks"] == ours["dropped_blocks"] and o["stride"] == next(iter(ours["strides"].values()), [1])[0]
        loss = "-" if o["predicted_loss"] is None else f"{o['predicted_loss']:.4f}"
        out.append(f"| {', '.join(o['blocks']) or 'none'} | {o['stride']} | {'/'.join(str(o['widths'].get(g, '-')) for g in groups)} | "
                   f"{o['measured_ms']:.3f} | {'yes' if o['met'] else 'no'} | {loss} | {'**yes**' if kept else ''} |")
    out += ["", "| contender | test acc | b1 ms | b1 speed-up | b64 ms | b64 speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    for k in tm["batch64"]["latency_ms"]:
        out.append(f"| {k} | {100 * r['accuracy'][k]:.2f}% | " + " | ".join(timing_cells(tm, k)) + " |")
    if named is not None:
        out += ["", f"The run that named this reshaping (`{named_run}`, the same seed): widths "
                f"{'/'.join(str(named['widths']['ours'].get(g, '-')) for g in groups)}, test accuracy "
                f"{100 * named['accuracy']['ours_fp32_ort']:.2f}%, allocation measured "
                f"{named['ours']['allocation']['measured_ms']:.3f} ms."]
    trained = [(f, t) for f, t in [(named_run, named)] + [(f, _load(f)) for f in option_runs] if t is not None]
    if trained:
        out += ["", "Each option allocated and trained on its own (same seed, budget and target; its own allocation, "
                "so its widths can differ from the option's row above):", "",
                f"| result | blocks dropped | stem stride | widths ({'/'.join(groups)}) | allocation measured ms (met) | "
                "predicted held-out loss | selection acc | test acc |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for f, t in trained:
            o = t["ours"]["drop_options"][0]
            loss = "-" if o["predicted_loss"] is None else f"{o['predicted_loss']:.4f}"
            out.append(f"| `{f}` | {', '.join(o['blocks']) or 'none'} | {o['stride']} | "
                       f"{'/'.join(str(o['widths'].get(g, '-')) for g in groups)} | {o['measured_ms']:.3f} "
                       f"({'yes' if o['met'] else 'no'}) | {loss} | {100 * t['match']['ours_selection_accuracy']:.2f}% | "
                       f"{100 * t['accuracy']['ours_fp32_ort']:.2f}% |")
    return out + [""]


def tp_verdict(acc: dict, tm: dict) -> list[str]:
    """The issue's goal (>= 20x at batch 1 and 64, <= 0.5 points lost) and the comparison with
    Torch-Pruning at matched accuracy, same runtime, on interleaved and on alone medians."""
    names = list(tm["batch64"]["latency_ms"])
    out = []
    for label, key in (("interleaved", "speedup_vs_dense_fp32_torch"), ("alone", "speedup_alone_vs_dense_fp32_torch")):
        row = []
        for b in ("batch64", "batch1"):
            best = max((k for k in names if k.startswith("ours")), key=lambda k: tm[b][key][k])
            tp = max((k for k in names if k.startswith("tp")), key=lambda k: tm[b][key][k])
            lost = 100 * (acc["dense_fp32_torch"] - acc[best])
            s, t = tm[b][key][best], tm[b][key][tp]
            row.append(f"{b}: ours {s:.1f}x ({best}, {'met' if s >= 20 else '**missed**'} 20x, {lost:.2f} points lost, "
                       f"{'met' if lost <= 0.5 else '**missed**'} 0.5) vs Torch-Pruning {t:.1f}x ({tp}, "
                       f"{100 * acc[tp]:.2f}%): {'ours faster' if s > t else '**Torch-Pruning faster**'}"
                       + (f"{', and' if t >= s else ', but'} **Torch-Pruning {100 * (acc[tp] - acc[best]):.2f} points more accurate**"
                          if acc[tp] > acc[best] else ""))
        out.append(f"- {label} medians: " + "; ".join(row) + ".")
    return ["Goal: >= 20x faster than dense fp32 PyTorch at batch 1 and 64 with <= 0.5 points lost, and faster than "
            "Torch-Pruning at matched accuracy.", ""] + out


def demo_section() -> list[str]:
    """`jointcompress demo --out benchmarks/results/demo`: the table a new user sees first."""
    path = ROOT / "benchmarks" / "results" / "demo" / "results.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    rows, goal = r["rows"], r["target_bytes"]
    lines = ["## The demo (LeNet-5 on the embedded digits)", "",
             f"Reproduce: `.venv/bin/{r['command']}`; wall {r['wall_seconds']:.0f} s on this 2-core machine, install excluded. "
             f"Target: {goal:,.0f} B of weights file (100x). Accuracy on the 449 held-out test images; every kept epoch "
             f"chosen on {_demo_selection(r)}. Latency: median ms, 1 thread for every model, interleaved, "
             "ONNX Runtime with spinning off.", "",
             "| run | accuracy | weights file | vs target | ms b1 | ms b64 |", "| --- | --- | --- | --- | --- | --- |"]
    for name in sorted(rows, key=lambda n: ["uncompressed", "sequential", "joint"].index(n) if n in ("uncompressed", "sequential", "joint") else 3):
        row = rows[name]
        size = row.get("file_bytes") or row.get("bytes")
        vs = f"{100 * (size / goal - 1):+.1f}%" if name in ("sequential", "joint") else "-"
        lines.append(f"| {name} | {100 * row['accuracy']:.2f}% | {size:,} B | {vs} | {row['latency_ms_b1']:.3f} | {row['latency_ms_b64']:.3f} |")
    return lines + [""]


def _demo_selection(r: dict) -> str:
    """What chose the demo's kept epochs (its recipe's training.validation_images; the test images before)."""
    held = r.get("recipe", {}).get("training", {}).get("validation_images", 0)
    return f"{held} training images held out" if held else "the test images (the demo before --val-images)"


def demo_seeds_section(name: str = "demo_seeds.json") -> list[str]:
    """benchmarks/demo_seeds.py: the demo's size point over several compression seeds (`name`: one
    joint variant's file)."""
    r = _load(name)
    if r is None:
        return []
    variant = r.get("joint_variant", "joint-pcgrad")
    steps = f", step sizes {r['scale_format']}" if r.get("scale_format", "auto") != "auto" else ""
    lines = [f"## The demo's point over seeds (LeNet-5 on the embedded digits), joint = {variant}{steps}", "",
             f"Reproduce: `.venv/bin/{r['command']}`. `jointcompress demo`'s recipe and target; one teacher, compression "
             f"seeds 0..n-1; accuracy on the {r['data'].split('; ')[-1].rstrip(')')}; every kept epoch chosen on "
             f"{r.get('selected_on', 'the same test images')}.", "",
             "| target | seed | sequential | joint | weights file (seq / joint) |", "| --- | --- | --- | --- | --- |"]
    for p in r["points"]:
        for run in p["runs"]:
            lines.append(f"| {p['ratio']:g}x ({run['target_bytes']:,.0f} B) | {run['seed']} | "
                         f"{100 * run['sequential']['accuracy']:.2f}% | {100 * run['joint']['accuracy']:.2f}% | "
                         f"{run['sequential']['file_bytes']:,} / {run['joint']['file_bytes']:,} B |")
        d = p["joint_minus_sequential_accuracy"]
        # accuracy, where every other table subtracts errors: said in the cell (+ here is joint ahead)
        lines.append(f"| {p['ratio']:g}x | joint − sequential, accuracy | | {100 * d['mean']:+.2f} ± {100 * d['se']:.2f} "
                     f"points ({'beyond' if d['beyond_2se'] else 'within'} 2 SE; + is joint more accurate) | |")
    return lines + [""]


def demo_joint_against_joint(name: str = "demo_seeds.json", other: str = "demo_seeds_joint_pcgrad.json") -> list[str]:
    """The demo's joint row against another joint variant, paired by seed (the same teacher and
    sequential runs in both files, checked)."""
    a, b = _load(name), _load(other)
    if a is None or b is None:
        return []
    lines = []
    for pa, pb in zip(a["points"], b["points"]):
        if pa["ratio"] != pb["ratio"] or any(x["sequential"] != y["sequential"] for x, y in zip(pa["runs"], pb["runs"])):
            continue  # not the same teacher and seeds: not paired
        diffs = [100 * (x["joint"]["accuracy"] - y["joint"]["accuracy"]) for x, y in zip(pa["runs"], pb["runs"])]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        lines.append(f"- {pa['ratio']:g}x, {a.get('joint_variant', 'joint-pcgrad')} − {b.get('joint_variant', 'joint-pcgrad')}, "
                     f"accuracy paired over {len(diffs)} seeds: {statistics.mean(diffs):+.2f} ± {se:.2f} points "
                     f"(per seed {', '.join(f'{d:+.2f}' for d in diffs)}).")
    return lines + [""] if lines else []


def demo_step_format_section(fp16: str = "demo_seeds_fp16_steps.json", default: str = "demo_seeds.json") -> list[str]:
    """The demo's point with step sizes in fp16 against the default (`scale_format: auto`, log8 under
    the demo's size target), both methods paired by seed (the same teacher, checked)."""
    a, b = _load(fp16), _load(default)
    if a is None or b is None or a.get("joint_variant") != b.get("joint_variant") or "scale_format" not in b:
        return []
    lines = ["## The demo's point: step sizes in one byte (the default) against two", "",
             f"Reproduce: `.venv/bin/{b['command']}`; `.venv/bin/{a['command']}`. Both on today's code, joint = "
             f"{b['joint_variant']}; `scale_format: auto` (the default) stores each step size in one byte on a 2^(1/16) "
             "grid under a size target, `fp16` in two; accuracy on the 449 held-out images.", "",
             "| target | run | accuracy, fp16 steps | accuracy, default (log8) | default − fp16 (points, paired) |",
             "| --- | --- | --- | --- | --- |"]
    for pa, pb in zip(a["points"], b["points"]):
        if pa["ratio"] != pb["ratio"] or [x["teacher_accuracy"] for x in pa["runs"]] != [y["teacher_accuracy"] for y in pb["runs"]]:
            continue  # not the same teacher: not paired
        for mode in ("sequential", "joint"):
            diffs = [100 * (y[mode]["accuracy"] - x[mode]["accuracy"]) for x, y in zip(pa["runs"], pb["runs"])]
            mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
            acc = [statistics.mean(100 * r[mode]["accuracy"] for r in p["runs"]) for p in (pa, pb)]
            lines.append(f"| {pa['ratio']:g}x | {mode} | {acc[0]:.2f}% | {acc[1]:.2f}% | {mean:+.2f} ± {se:.2f} "
                         f"({'beyond' if abs(mean) > 2 * se else 'within'} 2 SE; per seed {', '.join(f'{d:+.2f}' for d in diffs)}) |")
    return lines + [""]


def equal_accuracy_section(curve_file: str = "against_curve_lenet5.json",
                           title: str = "LeNet-5: the equal-accuracy point over 3 seeds") -> list[str]:
    """A 3-seed point at equal accuracy against Torch-Pruning (benchmarks/against_curve.py),
    paired by seed: Torch-Pruning's latency over ours and the accuracy difference."""
    r = _load(curve_file)
    if r is None:
        return []
    paired = r["paired_over_seeds"]
    names = {"accuracy_ours_minus_tp_points": "accuracy, ours − Torch-Pruning (points)",
             "ours_accuracy_lost_points": "accuracy ours lost against its teacher (points)",
             "tp_over_ours_batch1_latency_ms": "Torch-Pruning latency / ours − 1, batch 1, interleaved",
             "tp_over_ours_batch1_alone_ms": "Torch-Pruning latency / ours − 1, batch 1, alone",
             "tp_over_ours_batch64_latency_ms": "Torch-Pruning latency / ours − 1, batch 64, interleaved",
             "tp_over_ours_batch64_alone_ms": "Torch-Pruning latency / ours − 1, batch 64, alone"}
    out = [f"### {title}", "",
           f"Reproduce: `.venv/bin/{r['command']}` over {', '.join(f'`{Path(x).name}`' for x in r['sources'][:3])} "
           f"(each stores its command). Rule: {r['rule']}.", "", "| quantity | mean ± SE | per seed | beyond 2 SE |",
           "| --- | --- | --- | --- |"]
    for key, label in names.items():
        if key in paired:
            v = paired[key]
            out.append(f"| {label} | {v['mean']:+.3f} ± {v['se']:.3f} | {', '.join(f'{x:+.3f}' for x in v['values'])} | "
                       f"{'yes' if v['beyond_2se'] else 'no'} |")
    return out + [""]


def folded_deployment_section() -> list[str]:
    """The 3 LeNet-5 runs of against_torch_pruning.py with the folded deployment (deploy/ort_deploy.py),
    re-timed on a quiet machine by against_retime.py, with the paired statistics of against_curve.py."""
    return retimed_seeds_section("against_retime_lenet5_fold_quiet.json", "against_curve_lenet5_fold.json",
                                 "LeNet-5 at 20x: the folded deployment, re-timed on a quiet machine")


def retimed_seeds_section(retime_file: str, curve_file: str, title: str) -> list[str]:
    """Seeds of against_torch_pruning.py re-timed together by against_retime.py, per seed and
    contender, with the paired statistics of against_curve.py."""
    r, curve = _load(retime_file), _load(curve_file)
    if r is None or curve is None:
        return []
    seeds = sorted({k.split("_")[0] for k in r["accuracy"] if k.startswith("s")})
    machine = r.get("machine", {})
    out = [f"### {title}", "",
           f"Reproduce: `.venv/bin/{r['command']}` over the runs of {', '.join(f'`{Path(x).name}`' for x in curve['sources'][:3])} "
           f"(each stores its command); paired statistics: `.venv/bin/{curve['command']}`. Machine: {machine.get('shared')}. "
           "Three readings per contender: *all* = every contender in one interleaved rotation; *after dense* = our call "
           "always right after a dense PyTorch call (which flushes the caches); *alone*.", "",
           f"Dense fp32 PyTorch accuracy {r['accuracy']['dense_fp32_torch']:.2%}.", "",
           "| seed | contender | accuracy | b64 ms all / after dense / alone | b64 speed-up after dense (alone) | "
           "b1 us all / after dense / alone | b1 speed-up after dense (alone) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for seed in seeds:
        for who in ("ours_fp32_ort", "tp_fp32_ort"):
            name, cells = f"{seed}_{who}", []
            for batch, scale in (("batch64", 1.0), ("batch1", 1000.0)):
                t, after = r["timing"][batch]["all"], r["timing"][batch]["after_dense"][name]
                times = (t["interleaved_ms"][name], after["interleaved_ms"][name], after["alone_ms"][name])
                cells.append(" / ".join(f"{x * scale:.3g}" for x in times))
                cells.append(f"{after['speedup_interleaved'][name]:.1f}x ({after['speedup_alone'][name]:.1f}x)")
            label = "ours" if who.startswith("ours") else "Torch-Pruning"
            out.append(f"| {seed[1:]} | {label} | {r['accuracy'][name]:.2%} | " + " | ".join(cells) + " |")
    paired = curve["paired_over_seeds_retimed"]
    out += ["", "| paired over seeds | mean ± SE | per seed | beyond 2 SE |", "| --- | --- | --- | --- |"]
    for key, v in paired.items():
        if isinstance(v, dict) and "mean" in v:
            out.append(f"| {key} | {v['mean']:+.3f} ± {v['se']:.3f} | {', '.join(f'{x:+.3f}' for x in v['values'])} | "
                       f"{'yes' if v['beyond_2se'] else 'no'} |")
    return out + [""]


def quiet_recheck_section() -> list[str]:
    """benchmarks/against_ort_graph.py on a quiet machine: the speed-ups without other jobs' load."""
    r = _load("against_ort_graph.json")
    if r is None:
        return []
    machine = r.get("machine", {})
    out = ["### LeNet-5 re-timed on a quiet machine (the plain export, before the folded deployment above)", "",
           f"Reproduce: `.venv/bin/{r['command']}` (random weights at the trained models' widths; latency does not "
           f"depend on the values). Machine: {machine.get('shared')}; load average before/after "
           f"{machine.get('load_average_before_after', [[None]])[0][0]:.2f}/{machine.get('load_average_before_after', [[None], [None]])[1][0]:.2f}. "
           "The runs above shared the 2 cores with other jobs: a long dense PyTorch call is preempted, a 0.7 ms ONNX "
           "Runtime call mostly is not, so their speed-ups against dense PyTorch are inflated at batch 64.", "",
           "| widths | b1 dense PyTorch us | b1 ORT us | b1 speed-up interleaved (alone) | b64 dense ms | b64 ORT ms | "
           "b64 speed-up interleaved (alone) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        b1i, b1a = row["batch1"]["interleaved_us"], row["batch1"]["alone_us"]
        b64i, b64a = row["batch64"]["interleaved_ms"], row["batch64"]["alone_ms"]
        out.append(f"| {'/'.join(str(v) for v in row['widths'].values())} | {b1i['dense_torch']:.0f} ({b1a['dense_torch']:.0f}) | "
                   f"{b1i['ort_all']:.1f} ({b1a['ort_all']:.1f}) | {b1i['dense_torch'] / b1i['ort_all']:.1f}x "
                   f"({b1a['dense_torch'] / b1a['ort_all']:.1f}x) | {b64i['dense_torch']:.2f} ({b64a['dense_torch']:.2f}) | "
                   f"{b64i['ort_all']:.3f} ({b64a['ort_all']:.3f}) | {b64i['dense_torch'] / b64i['ort_all']:.1f}x "
                   f"({b64a['dense_torch'] / b64a['ort_all']:.1f}x) |")
    met = {b: any(row[b][unit]["dense_torch"] / row[b][unit]["ort_all"] >= 20 for row in r["rows"])
           for b, unit in (("batch1", "interleaved_us"), ("batch64", "interleaved_ms"))}
    verdict = "; ".join(f"{b}: {'met' if ok else '**missed**'}" for b, ok in met.items())
    return out + ["", f"The 20x goal on a quiet machine with the plain export (interleaved medians): {verdict}.", ""]


def latency_section() -> list[str]:
    body = (folded_deployment_section() + cnn_latency_section() + quiet_recheck_section() + equal_accuracy_section() + against_tp_section("lenet5")
            + against_tp_section("lenet5", "_both_batches", " (target at batch 1 and 64)") + against_tp_section("resnet")
            + against_tp_section("resnet", "_60k_x5_v3", " (5x target out of reach: the give-back of latency_knee, docs/latency.md)")
            + retimed_seeds_section("against_retime_resnet_drop_x5_quiet.json", "against_curve_resnet_drop_x5.json",
                                    "Small ResNet with its first block dropped (`--drop-blocks layer1`, 5x target), "
                                    "3 seeds, re-timed on a quiet machine")
            + equal_accuracy_section("against_curve_resnet_drop_x5_e8.json",
                                     "Small ResNet with its first block dropped, 8 epochs, 3 seeds (each run's own "
                                     "timings, under load; seed 2 on another machine, docs/latency.md)")
            + retimed_seeds_section("against_retime_resnet_stride2_drop_e8_quiet.json",
                                    "against_curve_resnet_stride2_drop_e8.json",
                                    "Small ResNet at a 20x target, stem at stride 2 and first block dropped "
                                    "(`--strides 2 --drop-blocks layer1 --tp-start ours`), 3 seeds, re-timed on a quiet machine")
            + retimed_seeds_section("against_retime_resnet_stride2_drop_e8_quiet_repeat.json",
                                    "against_curve_resnet_stride2_drop_e8_repeat.json",
                                    "The same 3 seeds re-timed a second time, right after the first (how much the "
                                    "batch-1 readings move between two quiet timings)")
            + reshape_choice_section("against_auto_resnet_stride12_e8_seed0.json",
                                     "against_torch_pruning_resnet_stride2_drop_e8_seed0.json",
                                     ["against_option_resnet_stride2_keep_e8_seed0.json",
                                      "against_option_resnet_drop_stride1_e8_seed0.json"],
                                     "Small ResNet at a 20x target, the allocator choosing the reshaping "
                                     "(`--drop-blocks auto --strides 1,2`, ours only), seed 0")
            + against_tp_section("resnet", "_drop_x5_seed0", " (first block dropped, 5x target, seed 0)")
            + against_tp_section("resnet", "_drop_x3_seed0", " (first block dropped, 3x target, seed 0)")
            + sum((against_tp_section("resnet", f"_stride2_drop_e8_seed{k}", " (stem at stride 2, first block dropped, "
                                      f"Torch-Pruning from the same start, 20x target, 8 epochs, seed {k})")
                   for k in range(3)), []))
    if not body:
        return []
    return ["## Latency, timed the honest way", "",
            "Every latency below: the same thread count for every contender (recorded), ONNX Runtime sessions with that "
            "many intra-op threads, one inter-op thread and spinning off, warm-up, interleaved rounds with medians, and "
            "each contender also timed alone; a contender whose two medians differ by more than 20% is marked "
            "(flagged). On this shared 2-core machine, tiny models at batch 1 often run faster alone than interleaved "
            "(caches stay warm), so both are shown.", ""] + body


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()  # --help, not a run
    text = ["# Benchmarks: joint vs sequential on MNIST and SST-2", "",
            "Generated by `benchmarks/write_benchmarks_md.py` from the results the commands below wrote; nothing is typed in by hand.",
            "The runs are sized for 2 shared CPU cores (few epochs, few seeds), far below Deep Compression's training budget, "
            "so they show the trend of each method at equal budgets rather than a best-effort accuracy.", ""]
    text += VARIANTS_TEXT
    points = point_rows()
    text += headline_table(points, JOINT_FORM_VARIANT, HEADLINE_VARIANT, JOINT_FORM_INTRO,
                           at_two_bits=joint_form_variant(NONZERO_GRID_BITS))
    text += headline_table(points, intro=HEADLINE_INTRO)
    text += points_table(points)
    text += stronger_baseline_section()
    text += section_or_last(bit_choice_section, "## Bits as a choice: each method at 3 and at 4 bits")
    text += section_or_last(two_bit_section, "## Two bits, and choosing the width before training (what did not work)")
    text += nonzero_grid_section()
    text += layer_split_section()
    text += longer_two_bit_section()
    text += keep_rule_section()
    text += gpu_section()
    text += demo_section()
    text += short_runs_section()
    text += demo_seeds_section() + demo_seeds_section("demo_seeds_joint_pcgrad.json") + demo_joint_against_joint()
    text += demo_seeds_section("demo_seeds_fp16_steps.json") + demo_step_format_section()
    for model, folder, title in (("lenet300", "compare_lenet300_100x", " at 100x"),
                                 ("lenet300", "compare_lenet300_100x_e10", " at 100x, 10 compression epochs"),
                                 ("lenet300", "compare_lenet300_2k", ", 2,000 training images, at 100x"),
                                 ("lenet5", "compare_lenet5_100x_v2", " at 100x"),
                                 ("lenet5", "compare_lenet5_200x", " at 200x"),
                                 ("lenet5", "compare_lenet5_200x_e6_v2", " at 200x, 6 compression epochs"),
                                 ("lenet5", "compare_lenet5_200x_3bit", " at 200x, 3-bit weights"),
                                 ("lenet5", "compare_lenet5_400x_v2", " at 400x"),
                                 ("lenet5", "compare_lenet5_100x_2k_v2", ", 2,000 training images, at 100x"),
                                 ("lenet5", "compare_lenet5_200x_2k_v2", ", 2,000 training images, at 200x"),
                                 ("lenet5", "compare_lenet5_400x_2k_v2", ", 2,000 training images, at 400x")):
        if not (ROOT / "benchmarks" / "results" / folder / "compare.json").is_file():
            folder = SEQUENTIAL_FROM.get(folder, folder)  # the re-run has not finished: the earlier runs
        if (ROOT / "benchmarks" / "results" / folder / "compare.json").is_file():
            text += section(model, folder, title)
    for model in ("lenet300", "lenet5", "resnet"):  # each model's default compare (seqcnn's runs name their settings)
        text += section(model)
    text += fisher_budget_section()
    text += norm_format_section()
    text += step_format_summary() + step_format_section()
    if (ROOT / "benchmarks" / "results" / "compare_lenet300_long" / "compare.json").is_file():
        text += section("lenet300", "compare_lenet300_long", ", longer training at 60x")
    text += size_target_section()
    text += accumulation_section()
    text += precision_section()
    text += norm_recalibration_section()
    text += recalibration_pairs_section()
    text += lsq_init_section()
    text += torchrun_cost_section()
    text += channels_size_section()
    text += longer_run_section()
    text += sst2_section()
    text += sst2_target_section()
    text += latency_section()
    (ROOT / "BENCHMARKS.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()

"""Joint (coordination none / scale / pcgrad) vs sequential, at the same size targets.

Why a separate runner: a single run says little; the claim "joint beats sequential" is a
claim about a Pareto front (error vs compression ratio) and its spread over seeds. Every
variant gets the same teacher, the same epochs, steps and distillation, and the same size target.
The sequential (and overlap) variants train the allocator's per-layer sparsity and bits (resolved once
per ratio and seed) and steer their sparsity onto the target bytes late in the ramp
(targets.SizeSteering); the joint variants learn their own pattern at quant_lsq.bits under the size
budget (joint_form.py). Every point is the real artifact's size on disk, and a pair whose files
differ by more than UNEQUAL_FILES is said beside its verdict.

Run-dir layout (what `jointcompress report` reads):
    compare.json   {"kind": "compare", "model", "data", "ratios", "seeds", "variants",
                    "uncompressed": [{"seed", "accuracy", "bytes"}], "runs": [row, ...],
                    "unreachable": [{"ratio_target", "seed", "target_bytes", "reason"}],
                    "summary": [{"variant", "ratio", "n", "accuracy_mean", ...}],
                    "uncompressed_summary": {"n", "accuracy_mean", "accuracy_min", "accuracy_max"},
                    "paired": [{"variant", "baseline", "ratio_target", "n", "error_diff_mean", "error_diff_se",
                                "seeds", "verdict"}], "recipe", "inputs_sha256": {"train", "test", "weights", "architecture"}}
                   (written with its settings before the first teacher, and again as each point ends)
    compare.csv    one row per run, then one per point out of reach (its reason)
    pareto.png     error vs compression ratio, mean and min-max over seeds
    runs/<variant>-r<ratio>-s<seed>/{artifact/, history.json, summary.json, recipe.yaml}
    teachers/s<seed>.safetensors   each seed's trained teacher (not with --weights), for --resume
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import yaml

from .errors import JointCompressError
from .joint_form import joint_recipe, nonzero_by_default
from .recipe import Recipe, paced_window, parse_recipe, without_quant_start

VARIANTS = {  # name -> (mode, coordination strategy)
    "joint-none": ("joint", "none"),
    "joint-scale": ("joint", "scale"),
    "joint-pcgrad": ("joint", "pcgrad"),
    "joint-acc-pcgrad": ("joint", "pcgrad"),  # pcgrad on accuracy (task + distill) against size (ACCURACY_AS_ONE)
    "sequential": ("sequential", "none"),
    "sequential-sens": ("sequential", "none"),  # sequential on budgets from a sensitivity scan (SENSITIVITY_ALLOCATED)
    # sequential whose masks stay as fitted when LSQ first rounds them (target.refit_on_rounding: false, NO_REFIT)
    "sequential-norefit": ("sequential", "none"),
    "overlap": ("overlap", "none"),  # masks + LSQ at overlapping times, allocator budgets (not in the default set)
    "joint-fisher-none": ("joint", "none"),  # the size budget with FISHER_BUDGET (docs/joint.md)
    "joint-fisher-pcgrad": ("joint", "pcgrad"),
    "joint-bits-none": ("joint", "none"),  # the size budget with LEARNED_BITS (docs/joint.md)
    "joint-bits-pcgrad": ("joint", "pcgrad"),
    "joint-stiff-none": ("joint", "none"),  # learned widths with a stiffer size constraint (STIFF_BUDGET)
    "joint-stiff-pcgrad": ("joint", "pcgrad"),
    "joint-early-none": ("joint", "none"),  # STIFF_BUDGET that lands early and fine-tunes longer (EARLY_FREEZE)
    "joint-early-pcgrad": ("joint", "pcgrad"),
    "joint-paced-none": ("joint", "none"),  # fixed widths, stiff constraint, a decision window of ~1,000 steps (PACED_BUDGET)
    "joint-paced-pcgrad": ("joint", "pcgrad"),
    "joint-paced-aw-none": ("joint", "none"),  # PACED_BUDGET with the multiplier's anti-windup (PACED_ANTI_WINDUP)
    "joint-paced-lin-none": ("joint", "none"),  # PACED_BUDGET on a log-linear budget schedule (PACED_LINEAR)
    "joint-paced-obd-none": ("joint", "none"),  # PACED_BUDGET whose landing cuts by Fisher cost per byte (PACED_OBD)
    "joint-paced-obdrank-none": ("joint", "none"),  # PACED_OBD with the size-neutral saliency (PACED_OBD_RANK)
    "joint-paced-obdland-none": ("joint", "none"),  # PACED_OBD, the Fisher cost only in the landing (PACED_OBD_LANDING)
    "joint-paced-obdland-scale": ("joint", "scale"),  # PACED_OBD_LANDING is what compress() runs for mode: joint
    "joint-paced-obdland-pcgrad": ("joint", "pcgrad"),  # under a size target (joint_form.py): the CLI's default set
    "joint-paced-obdtrack-none": ("joint", "none"),  # PACED_OBD cut back onto its goal inside the window (PACED_OBD_TRACK)
    "joint-paced-obdland-nz-none": ("joint", "none"),  # PACED_OBD_LANDING on the nonzero grid (NONZERO_GRID): what
    "joint-paced-obdland-nz-scale": ("joint", "scale"),  # compress() runs at 2 bits (joint_form.nonzero_by_default),
    "joint-paced-obdland-nz-pcgrad": ("joint", "pcgrad"),  # so the CLI's default set there (default_variants)
    "joint-paced-obdland-nz-erk-none": ("joint", "none"),  # NONZERO_GRID, each layer's bytes near its ERK share (ERK_BAND)
}
# the Fisher (OBD) cost of pruned weights on the dead zones, a budget that warms up fast first and
# slowly at the end, and a fine-tuning phase with its own LR after the freeze (docs/joint.md)
FISHER_BUDGET = {"saliency": 30.0, "schedule": "cubic", "finetune_phase": True}
# learned per-layer widths (quant_lsq.learn_bits) on top of the Fisher budget: bits and kept weights
# traded under one byte budget, each width priced by the Fisher cost of its rounding noise
# (techniques/learned_width.py); not in the default set
LEARNED_BITS = {**FISHER_BUDGET, "learn_bits": True}
# learned widths with a stiffer constraint: the augmented Lagrangian's quadratic term at 30 instead of 1,
# a proportional pull that reverses as soon as the state is under the budget, where the multiplier
# (an integral of the error) still pushes down after the descent (docs/joint.md); not in the default set
STIFF_BUDGET = {**LEARNED_BITS, "penalty": 30.0}
# the stiff budget on a shorter decision window: the budget reaches the target at 20% of the run and the
# pattern and widths freeze at 30%, so 70% of the steps fine-tune a fixed pattern from the full LR (the
# sequential pipeline's sparsity ramp ends at 24% of the run and its mask freezes at 40%); with the default window
# (0.6 / 0.8) the extra epochs of a longer run went to moving the pattern, not to recovering from it
# (docs/joint.md); not in the default set
EARLY_FREEZE = {**STIFF_BUDGET, "end": 0.2, "freeze": 0.3}
# the Fisher budget with the stiff constraint at fixed widths, its decision window paced in steps, not in
# fractions of the run: the dead zones and the multiplier need about 1,000 steps to move the model
# onto the target whatever the run's length (a 375-step window at 4 epochs lost 0.3 points, a 128-step one
# with 2,000 images 2.5), and every step beyond that is better spent fine-tuning the fixed pattern
# (paced_window; docs/joint.md); not in the default set
PACED_BUDGET = {**FISHER_BUDGET, "penalty": 30.0, "decide_steps": 1000}
# the paced budget whose multiplier decays while the state is under the budget (size_budget.anti_windup)
PACED_ANTI_WINDUP = {**PACED_BUDGET, "anti_windup": True}
# the paced budget whose goal falls log-linearly over the window instead of on the cubic (fast first): at
# LeNet-5 400x the cubic goal asks for most of the descent within half the window, the multiplier winds up
# (21-32 at the freeze against 10-15) and conv1 ends at about one weight per filter (docs/joint.md)
PACED_LINEAR = {**PACED_BUDGET, "schedule": "log_linear"}
# the paced budget whose landing (catch-up cuts, the freeze's projection; not the trim after it) drops the kept
# weights of least Fisher cost per byte first, not those nearest their dead zone's edge (size_budget.landing_order): at
# LeNet-5 400x (seed 0) conv1 kept 305 weights through the whole window, its dead zones held at their minimum
# by the same Fisher cost, and the margin-ordered catch-up cuts took it to 20, one per filter (docs/joint.md);
# not in the default set
PACED_OBD = {**PACED_BUDGET, "landing_order": "fisher"}
# PACED_OBD whose Fisher saliency only moves pruning between channels at constant bytes
# (size_budget.saliency_mode: rank): the budget alone sets how much is pruned, so the multiplier need
# not outbid the summed Fisher cost (the ViT with 2,000 images landed late under PACED_OBD; docs/joint.md);
# not in the default set
PACED_OBD_RANK = {**PACED_OBD, "saliency_mode": "rank"}
# PACED_OBD whose Fisher estimate only orders the landing's cuts: no pull on the dead zones at all
# (size_budget.saliency_mode: landing); not in the default set
PACED_OBD_LANDING = {**PACED_OBD, "saliency_mode": "landing"}
# PACED_OBD whose state is cut back to 25% over the budget's goal wherever it lags further inside the
# window (size_budget.lag_tolerance), not only after it; not in the default set
PACED_OBD_TRACK = {**PACED_OBD, "lag_tolerance": 0.25}
# PACED_OBD_LANDING whose kept weights use every code of their width as a non-zero level (quant_lsq.nonzero_grid:
# +-1, +-2 at 2 bits, where the dead-zone quantizer otherwise keeps +-1 only, its zero code unused since the
# artifact stores zero by position); not in the default set
NONZERO_GRID = {**PACED_OBD_LANDING, "nonzero_grid": True}
# NONZERO_GRID whose layers each keep between half and twice their ERK share of the bytes (size_budget.layer_split:
# erk, layer_band 2), a multiplier per bound, besides the budget on the whole file: with 2,000 images the learned
# split starved LeNet-300-100's input layer; not in the default set
ERK_BAND = {**NONZERO_GRID, "layer_split": "erk"}
JOINT_OPTIONS = {"joint-fisher-none": FISHER_BUDGET, "joint-fisher-pcgrad": FISHER_BUDGET,  # not in the default set
                 "joint-bits-none": LEARNED_BITS, "joint-bits-pcgrad": LEARNED_BITS,
                 "joint-stiff-none": STIFF_BUDGET, "joint-stiff-pcgrad": STIFF_BUDGET,
                 "joint-early-none": EARLY_FREEZE, "joint-early-pcgrad": EARLY_FREEZE,
                 "joint-paced-none": PACED_BUDGET, "joint-paced-pcgrad": PACED_BUDGET,
                 "joint-paced-aw-none": PACED_ANTI_WINDUP, "joint-paced-lin-none": PACED_LINEAR,
                 "joint-paced-obd-none": PACED_OBD, "joint-paced-obdrank-none": PACED_OBD_RANK,
                 "joint-paced-obdland-none": PACED_OBD_LANDING, "joint-paced-obdland-scale": PACED_OBD_LANDING,
                 "joint-paced-obdland-pcgrad": PACED_OBD_LANDING, "joint-paced-obdtrack-none": PACED_OBD_TRACK,
                 "joint-paced-obdland-nz-none": NONZERO_GRID, "joint-paced-obdland-nz-scale": NONZERO_GRID,
                 "joint-paced-obdland-nz-pcgrad": NONZERO_GRID, "joint-paced-obdland-nz-erk-none": ERK_BAND}
# the variants whose coordination resolves accuracy (task + distillation, one gradient) against size only
# (coordination.accuracy_as_one): one backward fewer per measured step; not in the default set
ACCURACY_AS_ONE = {"joint-acc-pcgrad"}
# the variants whose allocator reads a sensitivity scan of each seed's teacher (sensitivity.scan on the images runs
# choose their epoch on) instead of the ERK proxy: which layers keep weights and bits is then measured, not guessed
SENSITIVITY_ALLOCATED = {"sequential-sens"}
NO_REFIT = {"sequential-norefit"}
# the joint form compress() runs for mode: joint under a size target (joint_form.py), with each coordination
# strategy, against sequential; benchmarks/compare_mnist.py keeps its own default (BENCHMARK_VARIANTS)
DEFAULT_VARIANTS = ("joint-paced-obdland-none", "joint-paced-obdland-scale", "joint-paced-obdland-pcgrad", "sequential")
BENCHMARK_VARIANTS = ("joint-none", "joint-scale", "joint-pcgrad", "sequential")
# the default set's joint variants on the nonzero grid, where the joint form takes it
ON_THE_NONZERO_GRID = {"joint-paced-obdland-none": "joint-paced-obdland-nz-none",
                       "joint-paced-obdland-scale": "joint-paced-obdland-nz-scale",
                       "joint-paced-obdland-pcgrad": "joint-paced-obdland-nz-pcgrad"}


def default_variants(recipe: Recipe) -> tuple[str, ...]:
    """DEFAULT_VARIANTS, on the nonzero grid where the joint form compress() runs takes it (2 bits, the field unset:
    joint_form.nonzero_by_default): the default set at 2 bits compared the symmetric grid, not what compress runs."""
    if nonzero_by_default(recipe.technique("quant_lsq")):
        return tuple(ON_THE_NONZERO_GRID.get(v, v) for v in DEFAULT_VARIANTS)
    return DEFAULT_VARIANTS


CSV_FIELDS = ["variant", "mode", "strategy", "ratio_target", "seed", "accuracy", "error", "bytes", "file_bytes",
              "target_bytes", "ratio", "sparsity", "bits", "conflict_rate", "changed_share", "changed_mean", "wall_s", "dir",
              "unreachable", "candidate_epochs"]


@dataclass
class CompareSpec:
    ratios: list[float]
    seeds: int = 1
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    teacher_epochs: int = 10
    epochs: int | None = None
    first_seed: int = 0  # seeds run as first_seed .. first_seed + seeds - 1, so a later batch extends an earlier one
    keep: str | None = None  # training.keep for every variant ("best" / "last"); None: the recipe's
    device: str = "cpu"  # where the teachers and every variant train (the same for all); artifacts are made on the CPU
    # training.validation_images for every variant and teacher (held out once, the same rows for all); None: the recipe's
    validation_images: int | None = None

    def seed_range(self) -> range:
        """The seeds this comparison runs (each seed trains its own teacher, as in a full run)."""
        return range(self.first_seed, self.first_seed + self.seeds)


def ratio_bounds() -> tuple[float, float]:
    """(exclusive lower, inclusive upper) bound of target.ratio, as the Recipe model declares them."""
    import typing

    from .recipe import Target

    lower, upper = 1.0, math.inf
    annotation = Target.model_fields["ratio"].annotation  # Annotated[float, Field(gt=..., le=...)] | None
    for arg in (annotation, *typing.get_args(annotation)):
        for info in getattr(arg, "__metadata__", ()):  # the Field(...) of an Annotated
            for constraint in getattr(info, "metadata", [info]):  # its Gt / Le
                if getattr(constraint, "gt", None) is not None:
                    lower = constraint.gt
                if getattr(constraint, "le", None) is not None:
                    upper = constraint.le
    return float(lower), float(upper)


def check_ratios(ratios: list[float], what: str = "--ratios") -> list[float]:
    """Before any training: every ratio is a number target.ratio accepts, and no two name the same run
    folder (runs/<variant>-r<ratio:g>-s<seed>): a duplicate would overwrite the other's artifact and
    count as a further seed."""
    from .errors import RecipeError

    lower, upper = ratio_bounds()
    if not ratios:
        raise RecipeError(f"{what}: give at least one compression ratio, e.g. 10,20,40")
    bad = [r for r in ratios if not (math.isfinite(r) and lower < r <= upper)]
    if bad:
        raise RecipeError(f"{what}: every compression ratio must be a finite number > {lower:g} and <= {upper:g} "
                          f"(target.ratio's bounds); got {', '.join(f'{r:g}' for r in bad)}")
    names: dict[str, list[float]] = {}
    for r in ratios:
        names.setdefault(f"{r:g}", []).append(r)
    dups = {k: v for k, v in names.items() if len(v) > 1}
    if dups:
        listed = "; ".join(f"{', '.join(repr(r) for r in v)} (all run as r{k})" for k, v in dups.items())
        raise RecipeError(f"{what}: duplicate compression ratios: {listed}; each ratio runs once per seed "
                          "(use --seeds for more runs of a point)")
    return list(ratios)


def joint_options(variant: str, total_steps: int | None = None) -> dict:
    """The size_budget (and quant_lsq) fields of a joint variant, its paced window resolved from step 0
    (for a budget that starts at 0, as in step_cost.py; variant_recipe lets joint_recipe resolve it from
    the budget's own start, as compress() does)."""
    options = dict(JOINT_OPTIONS.get(variant, {}))
    decide_steps = options.pop("decide_steps", None)
    if decide_steps is not None and total_steps:
        options.update(paced_window(decide_steps, total_steps))
    return options


def variant_recipe(budgets: Recipe, variant: str, seed: int, targeted: Recipe | None = None, model=None,
                   example=None, total_steps: int | None = None) -> Recipe:
    """One variant's recipe. sequential and overlap train the allocator's `budgets`; the joint
    variants learn their own from `targeted` (the recipe with the size target, unallocated).
    `total_steps`: the run's optimizer steps, which a paced variant's window is measured in."""
    mode, strategy = VARIANTS[variant]
    if mode == "joint" and targeted is not None:
        from .targets import resolve_target

        options = dict(JOINT_OPTIONS.get(variant, {}))
        if not total_steps:  # a paced variant without the run's length: the default window
            options.pop("decide_steps", None)
        budgets = resolve_target(model, joint_recipe(targeted, total_steps=total_steps, **options), example)
    data = budgets.model_dump()
    data["mode"] = mode
    if mode == "sequential":
        without_quant_start(data)
    if variant in NO_REFIT and data.get("target"):
        data["target"]["refit_on_rounding"] = False
    data["coordination"]["strategy"], data["training"]["seed"] = strategy, seed
    if variant in ACCURACY_AS_ONE:
        data["coordination"]["accuracy_as_one"] = True
    return parse_recipe(data, source=f"compare variant {variant}")


def run_compare(recipe: Recipe, split, model_name: str, spec: CompareSpec, out: Path, weights: Path | None = None,
                tensorboard: Path | None = None, progress_factory: Callable | None = None,
                log: Callable[[str], None] = print, resume: bool = False, command: str | None = None) -> dict:
    """Run every variant at every ratio and seed; write compare.json/.csv and pareto.png. `resume`: the points
    OUT/compare.json holds (run, or recorded out of reach) are kept and the others run, each seed's teacher read
    back from OUT/teachers (a compare is hours of runs; an interrupted one started over from nothing). `command`: the
    command line that ran it, recorded in compare.json (the file did not say how to run it again)."""
    from .artifact.size import dense_fp32_bytes
    from .data import hold_out
    from .io import atomic_write_json
    from .pipeline import builder_for, uncompressed_row
    from .targets import TargetError, resolve_target

    base = _compare_base(recipe, model_name, spec)
    split = hold_out(split, base.training.validation_images)  # before the teachers: they choose their epoch there too
    needs_budgets = any(VARIANTS[v][0] != "joint" and v not in SENSITIVITY_ALLOCATED for v in spec.variants)
    builder = builder_for(model_name, split)
    total_steps = base.training.epochs * math.ceil(len(split.y_train) / base.training.batch_size)
    result = _new_result(base, split, model_name, spec, weights)
    if command is not None:
        result["command"] = command
    result["inputs_sha256"] = _inputs_digests(split, builder, weights)
    if resume:
        _remove_write_leftovers(out)
        result = _earlier_result(out, result, spec, log)
    atomic_write_json(out / "compare.json", with_summary(result))  # its settings, before any teacher: --resume checks them
    example = split.x_train[:2]
    only_joint = all(VARIANTS[v][0] == "joint" for v in spec.variants)
    ratios = _plannable_ratios(result, out, log, builder(), base, spec, example, total_steps if only_joint else None)
    if not ratios:  # every point is out of reach: say so before any teacher trains
        return _finish(result, out)
    for seed in spec.seed_range():
        if all(_done(result, variant, ratio, seed) for ratio in ratios for variant in spec.variants):
            continue  # a resumed compare: this seed's points are all in compare.json
        teacher = _seed_teacher(model_name, split, spec, base, seed, weights, progress_factory, out)
        row = uncompressed_row(teacher, split)
        if not any(u["seed"] == seed for u in result["uncompressed"]):
            result["uncompressed"].append({"seed": seed, "accuracy": row["accuracy"], "bytes": row["bytes"]})
        dense = dense_fp32_bytes(teacher)
        scanned = _teacher_scan(teacher, split, base, spec, seed, out)
        for ratio in ratios:
            if all(_done(result, variant, ratio, seed) for variant in spec.variants):
                continue
            targeted = parse_recipe({**base.model_dump(), "target": {"ratio": ratio}})
            try:  # once: every sequential / overlap variant trains the same budgets (joint ones learn their own)
                budgets = resolve_target(teacher, targeted, example) if needs_budgets else targeted
            except TargetError as exc:  # record why this point is missing and go on with the others
                _unreachable(result, out, log, ratio, seed, dense, exc)
                continue
            scanned_budgets = _scanned_budgets(teacher, targeted, example, scanned)
            if isinstance(scanned_budgets, TargetError):  # that allocation alone is out of reach
                for variant in SENSITIVITY_ALLOCATED & set(spec.variants):
                    if not _done(result, variant, ratio, seed):
                        _unreachable(result, out, log, ratio, seed, dense, scanned_budgets, variant)
            for variant in spec.variants:
                if _done(result, variant, ratio, seed):
                    continue
                name = f"{variant}-r{ratio:g}-s{seed}"
                run_dir = out / "runs" / name
                if resume:  # the point the interruption stopped: what it left is not a run (its curves neither)
                    for left in (run_dir, Path(tensorboard) / name if tensorboard is not None else None):
                        if left is not None and left.is_dir():
                            shutil.rmtree(left)
                try:  # a joint variant finds out whether its point is in reach as its run sets up
                    allocated = scanned_budgets if variant in SENSITIVITY_ALLOCATED else budgets
                    r = variant_recipe(allocated, variant, seed, targeted, teacher, example, total_steps)
                    run_row, history = run_one(teacher, r, split, builder, run_dir, _tensorboard(tensorboard, name),
                                               progress_factory(name) if progress_factory else None,
                                               torch.device(spec.device))
                except TargetError as exc:
                    _unreachable(result, out, log, ratio, seed, dense, exc, variant)
                    continue
                _write_run(run_dir, r, row, run_row, history)
                entry = _row(run_row, variant, ratio, seed, dense, run_dir.relative_to(out))
                entry["layers"] = layer_widths(run_dir / "artifact")
                entry["candidate_epochs"] = candidate_epochs(history)
                entry["kept_metric"] = history.best_metric  # the reading that chose the kept epoch (runs/ is not kept)
                result["runs"].append(entry)
                log(f"{name}: accuracy {100 * entry['accuracy']:.2f}%  {entry['file_bytes']} B  {entry['ratio']:.1f}x")
                atomic_write_json(out / "compare.json", with_summary(result))
    return _finish(result, out)


def _new_result(base: Recipe, split, model_name: str, spec: CompareSpec, weights: Path | None) -> dict:
    """compare.json before any run: what was compared, on what, and the empty lists the runs fill."""
    return {"kind": "compare", "model": model_name, "data": split.name, "ratios": list(spec.ratios),
            "seeds": spec.seeds, "first_seed": spec.first_seed, "variants": list(spec.variants),
            "epochs": base.training.epochs, "keep": base.training.keep, "selected_on": split.selected_on,
            "device": spec.device,
            "teacher_epochs": None if weights else spec.teacher_epochs, "train_images": len(split.y_train),
            "classes": split.num_classes,  # chance is 1 / classes: a collapsed side is said (collapsed_sides)
            "recipe": base.model_dump(),
            "uncompressed": [], "runs": [], "unreachable": []}


def _plannable_ratios(result: dict, out: Path, log, untrained: nn.Module, base: Recipe, spec: CompareSpec,
                      example, joint_steps: int | None = None) -> list[float]:
    """The ratios the allocator can plan, checked on an untrained model before any teacher trains
    (targets.refusal_before_training): a user learns in seconds, not after each seed's teacher, that a point
    is out of reach; it is recorded for every seed, as it would have been after training. `joint_steps`: the
    variants are joint ones alone, which plan no budgets: the first one's run is set up instead, as a joint
    run refuses a target the bytes no decision moves exceed (it trained every seed's teacher first)."""
    from .artifact.size import dense_fp32_bytes
    from .targets import refusal_before_training

    kept, dense = [], dense_fp32_bytes(untrained)
    for ratio in spec.ratios:
        targeted = parse_recipe({**base.model_dump(), "target": {"ratio": ratio}})
        why = (refusal_before_training(untrained, targeted, example) if joint_steps is None
               else _joint_refusal(untrained, targeted, spec.variants[0], example, joint_steps))
        if why is None:
            kept.append(ratio)
            continue
        for seed in spec.seed_range():
            _unreachable(result, out, log, ratio, seed, dense, why)
    return kept


def _joint_refusal(untrained: nn.Module, targeted: Recipe, variant: str, example, total_steps: int):
    """Why a joint variant's run at `targeted`'s ratio would refuse its target, set up on a copy of the untrained
    model (its teacher a copy too), or None."""
    import copy
    import warnings

    from .session.prepare import prepare
    from .targets import TargetError

    model = copy.deepcopy(untrained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the runs say them
        try:
            recipe = variant_recipe(targeted, variant, 0, targeted, model, example, total_steps)
            prepare(model, recipe, total_steps=total_steps, example_inputs=example, teacher=copy.deepcopy(untrained),
                    distributed=False)
        except TargetError as err:
            return err
    return None


def _compare_base(recipe: Recipe, model_name: str, spec: CompareSpec) -> Recipe:
    """The recipe every variant starts from, the spec checked first (variants, ratios, what the
    variants need of the recipe): the model named, the spec's epochs / keep / held-out images set."""
    from .errors import RecipeError

    if not spec.variants:  # else every point would end with nothing to compare
        raise RecipeError(f"--variants: give at least one, e.g. {','.join(DEFAULT_VARIANTS)}")
    unknown = [v for v in spec.variants if v not in VARIANTS]
    if unknown:
        raise RecipeError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    twice = sorted({v for v in spec.variants if spec.variants.count(v) > 1})
    if twice:  # ran once, as if asked once, where a duplicate ratio is refused
        raise RecipeError(f"--variants: {', '.join(twice)} given twice; each variant runs once per seed (use --seeds "
                          "for more runs of a point)")
    if "sequential" not in spec.variants:
        import warnings

        warnings.warn("--variants holds no sequential: the paired differences (Δerror vs sequential) and their "
                      "verdicts stay empty; add sequential to weigh the variants against it", stacklevel=3)
    check_ratios(spec.ratios)
    if recipe.target is not None and recipe.target.allocator == "sensitivity" and "sequential-sens" not in spec.variants:
        import warnings

        warnings.warn("target.allocator: sensitivity is not read by compare, which sets each point's target from "
                      "--ratios (the variants sequential and overlap on the ERK proxy's budgets); the variant "
                      "sequential-sens allocates from a sensitivity scan of each teacher (add it to --variants)", stacklevel=3)
    base = recipe.model_copy(update={"model": model_name})
    overrides = {k: v for k, v in (("epochs", spec.epochs), ("keep", spec.keep)) if v}
    if spec.validation_images is not None:  # 0 is a choice too: select on the test split
        overrides["validation_images"] = spec.validation_images
    if overrides:
        base = parse_recipe({**base.model_dump(), "training": {**base.training.model_dump(), **overrides}})
    check_variants(base, spec)
    return base


TEACHERS = "teachers"  # OUT/teachers/s<seed>.safetensors: each seed's trained teacher, read back by --resume


def _seed_teacher(model_name: str, split, spec: CompareSpec, base: Recipe, seed: int, weights: Path | None,
                  progress_factory: Callable | None, out: Path | None = None) -> nn.Module:
    """The seed's teacher: loaded from `weights` (a weights file or an artifact folder), else the one this
    compare trained for the seed (OUT/teachers, a resumed compare), else trained now and kept there."""
    from .pipeline import builder_for, load_start, load_weights, train_teacher

    builder = builder_for(model_name, split, check=False)  # checked once, as the compare began
    if weights:
        return load_start(builder, weights)
    kept = out / TEACHERS / f"s{seed}.safetensors" if out is not None else None
    if kept is not None and kept.is_file():
        try:
            return load_weights(builder(), kept)
        except JointCompressError as err:  # its fix named a file to give, which the user never gave
            raise type(err)(f"{err} (this compare trained and wrote {kept} for seed {seed}: delete it, and --resume "
                            "trains that teacher again)") from None
    teacher = train_teacher(model_name, split, spec.teacher_epochs, lr=base.training.lr, seed=seed,
                            progress=progress_factory(f"teacher s{seed}") if progress_factory else None,
                            device=torch.device(spec.device))
    if kept is not None:
        from safetensors.torch import save as st_save

        from .io import atomic_write_bytes

        atomic_write_bytes(kept, st_save({k: v.contiguous() for k, v in teacher.state_dict().items()}))
    return teacher


def _teacher_scan(teacher: nn.Module, split, base: Recipe, spec: CompareSpec, seed: int, out: Path) -> dict | None:
    """The sensitivity scan of the seed's teacher that the SENSITIVITY_ALLOCATED variants' allocator reads (None
    when no such variant runs): each layer pruned and rounded alone, read on the images the runs choose their epoch
    on (held-out training images with --val-images, else the test split), as `jointcompress sensitivity` reads them.
    Kept as OUT/teachers/s<seed>.sensitivity.json beside the teacher (to see which layers it spared), and read back
    from there by --resume, as the teacher is."""
    if not any(v in SENSITIVITY_ALLOCATED for v in spec.variants):
        return None
    import json

    from .data import evaluator
    from .io import atomic_write_json
    from .sensitivity import shuffled_batches
    from .targets import allocation_scan

    kept = out / TEACHERS / f"s{seed}.sensitivity.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    scanned = allocation_scan(teacher, base, split.x_train[:2], evaluator(*split.selection()),
                              shuffled_batches(split.x_train, base.training.recalibrate_norms))
    scanned["measured_on"] = split.selected_on
    atomic_write_json(kept, scanned)
    return scanned


def _scanned_budgets(teacher: nn.Module, targeted: Recipe, example, scanned: dict | None):
    """The SENSITIVITY_ALLOCATED variants' budgets (their recipe says target.allocator: sensitivity), None when
    none runs, or the TargetError that allocation met."""
    from .targets import TargetError, resolve_target

    if scanned is None:
        return None
    sens = parse_recipe({**targeted.model_dump(), "target": {**targeted.target.model_dump(), "allocator": "sensitivity"}})
    try:
        return resolve_target(teacher, sens, example, sensitivity=scanned)
    except TargetError as exc:
        return exc


def _done(result: dict, variant: str, ratio: float, seed: int) -> bool:
    """Whether compare.json already holds the point: a run of `variant`, or a refusal of it (or of every variant)."""
    return (any(r["variant"] == variant and r["ratio_target"] == ratio and r["seed"] == seed for r in result["runs"])
            or any(u["ratio_target"] == ratio and u["seed"] == seed and u.get("variant") in (None, variant)
                   for u in result["unreachable"]))


RESUME_SAME = ("model", "data", "variants", "epochs", "keep", "selected_on", "device", "teacher_epochs",
               "train_images", "recipe", "inputs_sha256")  # what a resumed compare must share with the one it continues


def _inputs_digests(split, builder, weights: Path | None) -> dict:
    """sha256 of the training and test images and of the --weights teacher: a resume on other data of the same
    name and size, or from other weights (whose teacher_epochs read None alike), mixed two compares' points."""
    from .checkpoint import data_digest, state_digest
    from .pipeline import load_start

    return {"train": data_digest((split.x_train, split.y_train)), "test": data_digest((split.x_test, split.y_test)),
            "weights": state_digest(load_start(builder, weights)) if weights else None,
            "architecture": architecture_digest(builder())}


def architecture_digest(model: nn.Module) -> str:
    """sha256 of the model's parameter and buffer names and shapes: a builder edited between a compare and its
    --resume (widths 128/64 to 32/64, the same name) pooled seeds of two models into one verdict, unsaid."""
    import hashlib

    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()


def _read_earlier(path: Path) -> dict:
    """compare.json as an earlier compare wrote it (a dict whose runs are a list), else a RecipeError naming it: a
    truncated or edited file ended --resume in a JSONDecodeError or a TypeError deep in the summary."""
    from .errors import RecipeError

    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        earlier = None
    listed = ([earlier.get("runs"), earlier.get("unreachable", [])] if isinstance(earlier, dict) else [None])  # runs:
    # written by every compare (empty before its first point); without it the resume ran every point again
    if not all(isinstance(rows, list) and all(isinstance(row, dict) for row in rows) for rows in listed):
        raise RecipeError(f"--resume: {path} is damaged (not the JSON a compare writes); restore it, or start over with "
                          "--force (its points' folders under runs/ are cleared with it)")
    return earlier


def _remove_write_leftovers(out: Path) -> None:
    """The temporary files of writes a killed compare left (`.compare.json.*.tmp`, a teacher's
    `.s0.safetensors.*.tmp` the size of a model): --resume kept them for good, and a folder holding only them
    was refused as no compare's. The folder is this compare's now (its lock): none is a live writer's."""
    from .io import remove_write_leftovers

    remove_write_leftovers(out, ("compare.json", "compare.csv", "pareto.png"))
    if (out / TEACHERS).is_dir():
        remove_write_leftovers(out / TEACHERS, None)


def _earlier_result(out: Path, fresh: dict, spec: CompareSpec, log) -> dict:
    """compare.json of the compare `out` holds, to continue (--resume): its points kept, the rest of it this
    command's (more ratios and seeds add points). One that ran with other settings is refused, naming them (a
    field an older compare.json lacks is not compared): its points, and its teachers, would sit beside this
    one's as if alike."""
    from .errors import RecipeError
    from .io import LOCK_NAME
    from .recipe import with_added_fields
    from .training.checkpoints import differences

    path = out / "compare.json"
    if not path.is_file():
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            raise RecipeError(f"--resume: {out} holds no compare.json, so it is no compare's folder; choose another "
                              "--out, or --force to write into it")
        log(f"--resume: {out} is empty: the compare starts from the beginning")
        return fresh
    earlier = _read_earlier(path)
    _covers(earlier, spec)
    same = [k for k in RESUME_SAME if k in earlier]
    digests = set(earlier.get("inputs_sha256") or {})  # an older compare.json records fewer (no architecture)

    def settings(result: dict) -> dict:
        # a recipe field added since (recipe.ADDED_FIELDS) at the value the earlier compare ran with
        picked = {k: _without_target(with_added_fields(result[k])) if k == "recipe" else result.get(k) for k in same}
        if isinstance(picked.get("inputs_sha256"), dict):
            picked["inputs_sha256"] = {k: v for k, v in picked["inputs_sha256"].items() if k in digests}
        return picked

    changed = differences(settings(earlier), settings(fresh), was="then")
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise RecipeError(f"--resume: the compare in {out} ran with other settings ({'; '.join(changed[:3])}{more}); give "
                          "the same data, weights, recipe and options to continue it, or another --out")
    return {**fresh, **{k: earlier.get(k, []) for k in ("uncompressed", "runs", "unreachable")}}


def _without_target(recipe: dict | None) -> dict | None:
    """A compare's recipe less its target, which --ratios sets point by point (the first ratio given stands in it)."""
    return None if recipe is None else {k: v for k, v in recipe.items() if k != "target"}


def _covers(earlier: dict, spec: CompareSpec) -> None:
    """A resume's --ratios and seeds must hold the earlier ones (more add points): with fewer, compare.json
    described the new command while it held the old points."""
    from .errors import RecipeError

    ratios = [r for r in earlier.get("ratios", []) if r not in spec.ratios]
    seeds = range(earlier.get("first_seed", 0), earlier.get("first_seed", 0) + earlier.get("seeds", 0))
    missing = [s for s in seeds if s not in spec.seed_range()]
    if ratios or missing:
        raise RecipeError(f"--resume: the compare ran --ratios {','.join(f'{r:g}' for r in earlier['ratios'])} on seeds "
                          f"{seeds.start}..{seeds.stop - 1}; give at least those (more ratios or seeds add points)")


def _write_run(run_dir: Path, recipe: Recipe, uncompressed: dict, run_row: dict, history) -> None:
    """A run's own files beside its artifact: history, summary (with the uncompressed row), recipe."""
    from .io import atomic_write_json, atomic_write_text

    atomic_write_json(run_dir / "history.json", history.as_dict())
    atomic_write_json(run_dir / "summary.json", {"uncompressed": uncompressed, recipe.mode: run_row})
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def _finish(result: dict, out: Path) -> dict:
    """compare.json with its summary, compare.csv and pareto.png; a compare that ran nothing is an error."""
    from .io import atomic_write_json
    from .targets import TargetError

    result = with_summary(result)
    atomic_write_json(out / "compare.json", result)
    write_csv(result["runs"], out / "compare.csv", result["unreachable"])
    plot_pareto(result, out / "pareto.png")
    if not result["runs"]:
        raise TargetError(f"compare ran nothing: every point is out of reach ({result['unreachable'][0]['reason']}); "
                          f"the reasons are in {out / 'compare.json'}")
    return result


def _unreachable(result: dict, out: Path, log, ratio: float, seed: int, dense: int, exc: Exception,
                 variant: str | None = None) -> None:
    """Record why a point (or one variant at it) is missing, and go on with the others."""
    from .io import atomic_write_json

    entry = {"ratio_target": ratio, "seed": seed, "target_bytes": dense / ratio, "reason": str(exc)}
    if any(u["ratio_target"] == ratio and u["seed"] == seed and u.get("variant") == variant for u in result["unreachable"]):
        return  # a resumed compare recorded it before (the check before any teacher runs again)
    result["unreachable"].append({**entry, "variant": variant} if variant else entry)
    log(f"{variant + '-' if variant else ''}r{ratio:g}-s{seed}: unreachable, skipped ({exc}; in compare, "
        f"target.ratio is the {ratio:g} of --ratios)")
    atomic_write_json(out / "compare.json", with_summary(result))


def check_variants(base: Recipe, spec: CompareSpec) -> None:
    """Before any training: every variant's recipe is one compress() accepts, so a run does not stop
    at its first sequential point after the joint ones trained (a recipe already in the joint form,
    with size_budget), nor record every point as out of reach (prune_structured beside a size target,
    which only the joint form trains)."""
    from .errors import RecipeError

    joint = [v for v in spec.variants if VARIANTS[v][0] == "joint"]
    for ratio in spec.ratios:  # every ratio, not only the first: a point must not fail after others trained
        try:
            parse_recipe({**base.model_dump(), "target": {"ratio": ratio}})
        except RecipeError as exc:
            raise RecipeError(f"--ratios {ratio:g}: the recipe with target.ratio {ratio:g} is refused: {exc}") from None
    for variant in spec.variants:
        mode = VARIANTS[variant][0]
        if mode == "joint":
            continue
        problem = None
        if any(t.type == "prune_structured" for t in base.techniques):
            problem = "prune_structured beside a size target trains in the joint form only"
        for ratio in spec.ratios:
            try:
                parse_recipe({**base.model_dump(), "mode": mode, "target": {"ratio": ratio}})
            except RecipeError as exc:
                problem = problem or str(exc)
        if problem:
            raise RecipeError(f"compare variant {variant}: {problem}. Compare the joint variants alone "
                              f"(--variants {','.join(joint) or ','.join(DEFAULT_VARIANTS[:-1])}), or give the recipe "
                              "without them: a sequential baseline needs prune_unstructured + quant_lsq (no size_budget, "
                              "no quant_lsq.zero_level, no prune_structured)")


def run_one(teacher, recipe: Recipe, split, builder, run_dir: Path, callbacks: list, progress=None, device=None):
    """compress -> finalize -> save one variant into RUN_DIR/artifact (trained on `device`)."""
    from .pipeline import compress_and_save

    try:
        outcome = compress_and_save("artifact", teacher, recipe, split, builder, run_dir, progress=progress,
                                    callbacks=callbacks, device=device)
    finally:
        for cb in callbacks:
            cb.close()
    return outcome.row, outcome.result.history


def _tensorboard(root: Path | None, name: str) -> list:
    if root is None:
        return []
    from .tensorboard import TensorBoardLogger

    return [TensorBoardLogger(Path(root) / name)]


def _row(row: dict, variant: str, ratio: float, seed: int, dense: int, run_dir: Path) -> dict:
    mode, strategy = VARIANTS[variant]
    file_bytes = row["file_bytes"]
    return {"variant": variant, "mode": mode, "strategy": strategy, "ratio_target": ratio, "seed": seed,
            "accuracy": row["accuracy"], "error": 1.0 - row["accuracy"], "bytes": row.get("bytes"),
            "file_bytes": file_bytes, "target_bytes": dense / ratio, "ratio": dense / file_bytes,
            "sparsity": row.get("sparsity"), "bits": row.get("bits"), "conflict_rate": row.get("conflict_rate"),
            "changed_share": row.get("changed_share"), "changed_mean": row.get("changed_mean"),
            "wall_s": row.get("wall_s"), "selected_on": row.get("selected_on"), "dir": str(run_dir)}


def candidate_epochs(history) -> int:
    """How many evaluations a run's kept state was chosen among: the epochs at the target, after the sequential
    pipeline's late trim where it ran (the trim forgets the states kept before it). Chosen on the test split,
    a variant with more of them reads the test split more often; compare.json records it beside the accuracy."""
    trims = [e.get("step", -1) for e in history.events  # the steering's trim, which forgets (the size budget's does not)
             if e.get("event") == "size_trim" and "best_before" in e]
    last_trim = max(trims, default=-1)
    return sum(1 for e in history.epochs if e.get("at_target") and e["step"] >= last_trim)


def layer_widths(artifact: Path) -> dict[str, dict]:
    """Per layer of a saved artifact: the stored bit-width, kept weights and size (from its
    manifest), so a compare result says what each run learned, not only the set of widths."""
    import json

    path = artifact / "manifest.json"
    if not path.is_file():
        return {}
    layers = json.loads(path.read_text()).get("layers", {})
    return {name: {"bits": rec.get("bits"), "nonzero": rec.get("nonzero"), "numel": rec.get("numel"),
                   "encoding": rec.get("encoding")} for name, rec in layers.items()}


def summarize(runs: list[dict]) -> list[dict]:
    """Mean, min and max over seeds of accuracy, error and achieved ratio per (variant, ratio)."""
    keys = sorted({(r["variant"], r["ratio_target"]) for r in runs}, key=lambda k: (k[0], k[1]))
    out = []
    for variant, ratio in keys:
        rows = [r for r in runs if r["variant"] == variant and r["ratio_target"] == ratio]
        acc = [r["accuracy"] for r in rows]
        rat = [r["ratio"] for r in rows]
        out.append({"variant": variant, "ratio_target": ratio, "n": len(rows),
                    "accuracy_mean": statistics.fmean(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
                    "accuracy_std": statistics.pstdev(acc), "error_mean": 1 - statistics.fmean(acc),
                    "ratio_mean": statistics.fmean(rat), "ratio_min": min(rat), "ratio_max": max(rat),
                    "file_bytes_mean": statistics.fmean(r["file_bytes"] for r in rows),
                    "changed_share_mean": _mean_of(rows, "changed_share"), "changed_mean": _mean_of(rows, "changed_mean")})
        strategy = VARIANTS.get(variant, ("", "none"))[1]
        # a strategy that never changed the update trained exactly like `none`: say so
        out[-1]["changed_nothing"] = strategy != "none" and not out[-1]["changed_share_mean"]
    return out


def uncompressed_summary(result: dict) -> dict | None:
    """The teachers' (uncompressed models') accuracy over seeds: mean, min, max and n; and the mean bytes of
    their fp32 weights file (None where a result did not keep them)."""
    rows = [u for u in result.get("uncompressed", []) if u.get("accuracy") is not None]
    if not rows:
        return None
    acc = [u["accuracy"] for u in rows]
    sizes = [u["bytes"] for u in rows if u.get("bytes")]
    return {"n": len(acc), "accuracy_mean": statistics.fmean(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
            "error_mean": 1 - statistics.fmean(acc), "bytes_mean": statistics.fmean(sizes) if sizes else None}


def seed_differences(runs: list[dict], variant: str, ratio: float, baseline: str = "sequential") -> list[float]:
    """Joint minus sequential (or `baseline`) error (points) per seed that ran both (same teacher,
    same budgets)."""
    return list(_differences_by_seed(runs, variant, ratio, baseline).values())


def _pairs_by_seed(runs: list[dict], variant: str, ratio: float, baseline: str, key: str) -> dict[int, tuple]:
    """{seed: (the variant's `key`, the baseline's)} over the seeds both ran at `ratio`."""
    by_seed = {}
    for row in runs:
        if row["ratio_target"] == ratio and row["variant"] in (variant, baseline):
            by_seed.setdefault(row["seed"], {})[row["variant"]] = row.get(key)
    return {seed: (d[variant], d[baseline]) for seed, d in by_seed.items() if len(d) == 2}


def _differences_by_seed(runs: list[dict], variant: str, ratio: float, baseline: str) -> dict[int, float]:
    return {seed: 100 * (v - b) for seed, (v, b) in _pairs_by_seed(runs, variant, ratio, baseline, "error").items()}


def _file_ratios(runs: list[dict], variant: str, ratio: float, baseline: str) -> list[float]:
    """The variant's weights file over the baseline's, per paired seed: a loose target (one both undershoot) lets
    each land at its own size, and their errors then compare files of other sizes."""
    return [v / b for v, b in _pairs_by_seed(runs, variant, ratio, baseline, "file_bytes").values() if v and b]


def _file_ratio(runs: list[dict], variant: str, ratio: float, baseline: str) -> float | None:
    """_file_ratios' mean over the paired seeds."""
    ratios = _file_ratios(runs, variant, ratio, baseline)
    return statistics.fmean(ratios) if ratios else None


UNEQUAL_FILES = 0.05  # paired files further apart than this are said beside the verdict


def unequal_files_note(paired: dict) -> str:
    """'its files 0.72x sequential's: not the same size' where a paired point's files differ by more than
    UNEQUAL_FILES (a target both undershoot) on some seed, else ''; the table and the HTML report say it alike.
    Judged on each seed's pair where the result records them: the mean over seeds hid one seed's file 14% larger."""
    lo, hi = paired.get("file_bytes_ratio_range") or [paired.get("file_bytes_ratio")] * 2
    if lo is None or max(abs(lo - 1), abs(hi - 1)) <= UNEQUAL_FILES:
        return ""
    spread = f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}x to {hi:.2f}x"
    return f"its files {spread} {paired.get('baseline', 'sequential')}'s (by seed): not the same size"


def changed_nothing_note(summary: dict) -> str:
    """What a coordination strategy that changed no update of a point's runs trained: the same as `none`."""
    return "changed no update: trained as strategy none" if summary.get("changed_nothing") else ""


def paired_stats(runs: list[dict], variant: str, ratio: float,
                 baseline: str = "sequential") -> tuple[float, float, int] | None:
    """Mean and standard error of joint − sequential (or `baseline`) error (points) over the seeds both ran."""
    diffs = seed_differences(runs, variant, ratio, baseline)
    if len(diffs) < 2:
        return None
    return *_mean_se(diffs), len(diffs)


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def beyond_two_se(mean: float, se: float | None) -> bool:
    """A paired difference called real: beyond 2 standard errors. A standard error of 0 (the same difference on
    every seed, which accuracy's steps of one test image make common) has no spread to judge by: not called."""
    return se is not None and se > 0 and abs(mean) > 2 * se


def _mean_se(diffs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None from one difference)."""
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.mean(diffs), se


MIN_SEEDS_FOR_VERDICT = 3  # a standard error from two differences is too rough to call anything beyond it


def paired_differences(runs: list[dict], baseline: str = "sequential") -> list[dict]:
    """Per ratio and per variant beside `baseline`: its error minus the baseline's (points), paired by seed
    (same teacher, same budgets), mean ± one standard error over the n seeds both ran. The verdict needs
    n >= MIN_SEEDS_FOR_VERDICT ("too few seeds" below); otherwise "beyond 2 SE" or "within 2 SE"."""
    out = []
    for variant, ratio in sorted({(r["variant"], r["ratio_target"]) for r in runs if r["variant"] != baseline},
                                 key=lambda k: (k[1], k[0])):
        by_seed = _differences_by_seed(runs, variant, ratio, baseline)
        diffs = list(by_seed.values())
        if not diffs:
            continue
        mean, se = _mean_se(diffs)
        if len(diffs) < MIN_SEEDS_FOR_VERDICT:
            verdict = "too few seeds"
        else:
            verdict = ("beyond 2 SE" if beyond_two_se(mean, se) else
                       "no spread (the same difference on every seed): more seeds" if se == 0 else "within 2 SE")
        out.append({"variant": variant, "baseline": baseline, "ratio_target": ratio, "n": len(diffs),
                     "error_diff_mean": mean, "error_diff_se": se, "seeds": sorted(by_seed), "verdict": verdict,
                     "file_bytes_ratio": _file_ratio(runs, variant, ratio, baseline),
                     "file_bytes_ratio_range": _range(_file_ratios(runs, variant, ratio, baseline))})
    return out


def all_paired(runs: list[dict]) -> list[dict]:
    """Every variant's paired differences vs sequential, and where a sensitivity-allocated sequential ran
    (SENSITIVITY_ALLOCATED) vs that one too: the other baseline (sequential against it once)."""
    paired = paired_differences(runs)
    for baseline in sorted({r["variant"] for r in runs} & SENSITIVITY_ALLOCATED):
        paired += [p for p in paired_differences(runs, baseline) if VARIANTS.get(p["variant"], ("",))[0] != "sequential"]
    return paired


def with_summary(result: dict) -> dict:
    """`result` with its per-point summary, the teachers' summary and the paired differences (all_paired), each
    marked where a side of it collapsed (collapsed_sides)."""
    runs = result.get("runs", [])
    paired = [{**p, **({"collapsed": c} if (c := collapsed_sides(result, p)) else {})} for p in all_paired(runs)]
    return {**result, "summary": summarize(runs), "uncompressed_summary": uncompressed_summary(result),
            "paired": paired}


def collapsed_sides(result: dict, paired: dict) -> list[dict]:
    """The sides of a paired point (the variant, its baseline) whose mean accuracy over the paired seeds is nearer
    chance (1 / the data's classes) than their teachers': a baseline trained into collapse at an aggressive ratio
    (13-22% on 10 classes against teachers near 90%) was read as "joint better, beyond 2 SE" with no word that the
    gap measured a failed baseline, not a lead. Empty where nothing collapsed, or where the result does not record
    its classes (results written before it did)."""
    classes = result.get("classes")
    teachers = {u["seed"]: u["accuracy"] for u in result.get("uncompressed", []) if u.get("accuracy") is not None}
    seeds = [s for s in paired.get("seeds", []) if s in teachers]
    if not classes or not seeds:
        return []
    chance, teacher = 1.0 / classes, statistics.fmean(teachers[s] for s in seeds)
    out = []
    for side in (paired["variant"], paired["baseline"]):
        accuracies = [r["accuracy"] for r in result.get("runs", []) if r["variant"] == side
                      and r["ratio_target"] == paired["ratio_target"] and r["seed"] in seeds]
        accuracy = statistics.fmean(accuracies) if accuracies else None
        if accuracy is not None and accuracy - chance < teacher - accuracy:
            out.append({"variant": side, "accuracy": accuracy, "teacher_accuracy": teacher, "chance": chance})
    return out


def collapsed_note(paired: dict) -> str:
    """What the table and the HTML report say beside a verdict with a collapsed side (collapsed_sides), else ''."""
    sides = paired.get("collapsed") or []
    if not sides:
        return ""
    said = ", ".join(f"{c['variant']} {100 * c['accuracy']:.1f}%" for c in sides)
    first = sides[0]
    return (f"collapsed: {said}, nearer chance ({100 * first['chance']:.1f}%) than the teachers "
            f"({100 * first['teacher_accuracy']:.1f}%), so the difference measures a failed run, not a lead; a smaller "
            "ratio, more epochs or sequential-sens (budgets from a sensitivity scan) train a baseline that holds")


def _mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def write_csv(runs: list[dict], path: Path, unreachable: list[dict] = ()) -> None:
    """One row per run, then one per point (or variant at a point) out of reach, its reason in `unreachable`
    (variant "all" where no variant could run): a spreadsheet of the CSV alone showed a missing point as
    never asked for."""
    from .io import atomic_write_text
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in runs:
        w.writerow(r)
    for u in unreachable:
        w.writerow({"variant": u.get("variant") or "all", "ratio_target": u["ratio_target"], "seed": u["seed"],
                    "target_bytes": u["target_bytes"], "unreachable": u["reason"]})
    atomic_write_text(path, buf.getvalue())


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (ratio, error) points: no other point is both smaller and more accurate."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return sorted(front)


def plot_pareto(result: dict, path: Path, references: list[tuple[str, float, float]] | None = None, ax=None) -> None:
    """Error (%) vs compression ratio: mean per variant with min-max bars over seeds, and the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    summary = result.get("summary") or summarize(result["runs"])
    for variant in result["variants"]:
        rows = sorted((s for s in summary if s["variant"] == variant), key=lambda s: s["ratio_mean"])
        if not rows:
            continue
        x = [s["ratio_mean"] for s in rows]
        y = [100 * s["error_mean"] for s in rows]
        yerr = [[100 * (s["error_mean"] - (1 - s["accuracy_max"])) for s in rows],
                [100 * ((1 - s["accuracy_min"]) - s["error_mean"]) for s in rows]]
        xerr = [[s["ratio_mean"] - s["ratio_min"] for s in rows], [s["ratio_max"] - s["ratio_mean"] for s in rows]]
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, marker="o", capsize=3, label=variant)
    front = pareto_front([(r["ratio"], 100 * r["error"]) for r in result["runs"]])
    if front:
        # the least error reached at that ratio or more: up at each point's ratio, not after it (a "post" step drew
        # 11x's error out to 40x)
        ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color="grey", ls=":", label="Pareto front (all runs)")
    teacher = uncompressed_summary(result)
    if teacher:  # every seed's teacher: the mean with its min-max
        err = 100 * teacher["error_mean"]
        ax.errorbar([1.0], [err], yerr=[[err - 100 * (1 - teacher["accuracy_max"])], [100 * (1 - teacher["accuracy_min"]) - err]],
                    marker="*", markersize=12, capsize=3, color="black", ls="none",
                    label=f"uncompressed (mean of {teacher['n']} teacher(s), min-max)")
    for label, ratio, err in references or []:
        ax.scatter([ratio], [err], marker="x", s=80, color="red", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (fp32 safetensors / artifact weights file)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{result.get('model')} on {result.get('data')}: error vs size ({result.get('seeds')} seed(s))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if own:
        from .io import save_figure

        fig.tight_layout()
        save_figure(fig, path, dpi=100)
        plt.close(fig)

"""The joint form of a recipe: what `mode: joint` trains under a size target.

Why: masks ranked on raw |w| and LSQ steps trained beside them, each layer's sparsity and bits fixed
by the allocator before training, do not decide together; the design (docs/joint.md) is one decision
per weight under one budget: zero as a level of the quantizer (a learned per-channel dead zone tied
to the LSQ step) and the artifact's bytes as a constraint inside the loss (size_budget). A recipe
that asks for `mode: joint` and a size target, and does not spell the joint form out itself, gets it
here; `mode: overlap` keeps masks and LSQ at overlapping times under the allocator's budgets.

Which size_budget settings: `JOINT_FORM_VARIANT`'s, the paced decision window with the Fisher estimate
ordering the landing's cuts only (`compare`'s joint-paced-obdland-none). Across the models stored in
BENCHMARKS.md it ties or beats sequential at every 3- and 4-bit point measured, and at 2 bits, on the nonzero grid
it takes there (NONZERO_GRID_BITS), at every point but LeNet-300-100 100x with 2,000 images, where it loses; the
Fisher price on the dead zones (joint-paced-obd-none) wins more on some CNNs but lost 9 points on a small ViT with
2,000 images.
"""
from __future__ import annotations

import warnings

from .recipe import Recipe, paced_window, parse_recipe

# compare's variant whose size_budget settings the joint form takes (compare.PACED_OBD_LANDING: the paced
# window, the stiff constraint, the Fisher estimate ordering the landing's cuts only; docs/joint.md)
JOINT_FORM_VARIANT = "joint-paced-obdland-none"
# the width at which the joint form's kept weights take the nonzero grid (quant_lsq.nonzero_grid) unless the recipe
# sets it, and compare's variant that trains it there (nonzero_by_default)
NONZERO_GRID_BITS = 2
JOINT_FORM_VARIANT_NONZERO = "joint-paced-obdland-nz-none"
# the fraction of the run by which prune_structured's channels are decided in the joint form (_channels_first):
# the paced size budget's window starts by 0.2
CHANNELS_END = 0.2


def joint_form_variant(bits: int) -> str:
    """compare's variant that trains what the joint form trains at `bits` (BENCHMARKS.md's headline table)."""
    return JOINT_FORM_VARIANT_NONZERO if bits == NONZERO_GRID_BITS else JOINT_FORM_VARIANT


def nonzero_by_default(quant) -> bool:
    """Whether the joint form puts the kept weights on the nonzero grid: at 2 bits, where the recipe leaves
    quant_lsq.nonzero_grid unset (None; true or false stays as written). Why: zero is stored by position, so at
    2 bits the dead-zone grid spends 2 of its 4 codes on nothing and keeps every weight at plus or minus one step;
    on the nonzero grid (+-1, +-2 steps) the joint form read better or tied at every 2-bit point measured, and with
    2,000 images turned LeNet-5's 200x loss to sequential into a lead (BENCHMARKS.md, "Two bits on the nonzero
    grid"). At 3 bits (6 of 8 codes) it tied the symmetric grid at the three points measured, with 2,000 images,
    and at 4 bits (14 of 16) it changed nothing measurable: there the grid stays as the recipe has it."""
    return quant is not None and quant.nonzero_grid is None and quant.bits == NONZERO_GRID_BITS


def joint_form_budget() -> dict:
    """The size_budget fields of the joint form (compare's JOINT_FORM_VARIANT; imported here, not at the
    top: compare builds its joint variants with joint_recipe below)."""
    from .compare import JOINT_OPTIONS

    return dict(JOINT_OPTIONS[JOINT_FORM_VARIANT])


def joint_recipe(base: Recipe, learn_bits: bool = False, total_steps: int | None = None, nonzero_grid: bool = False,
                 **budget) -> Recipe:
    """The joint form of a prune + quantize recipe: zero is a level of the quantizer (a learned
    dead zone) under the target's bytes (size_budget), over the same window the masks would
    have ramped in; distillation and training stay as they are. Widths stay at quant_lsq.bits
    unless `learn_bits`: each layer's width is then learned in [min_bits, max_bits] against the
    same budget (techniques/learned_width.py); `nonzero_grid` sets quant_lsq.nonzero_grid (every code a
    non-zero level; a recipe's own setting stays otherwise). `budget`: further size_budget fields (e.g. saliency,
    finetune_phase). A paced window (`decide_steps`) starts by 0.2 of the run, and with `total_steps`
    it is resolved here, from the budget's start, as the plan resolves it (recipe.paced_window)."""
    data = base.model_dump()
    prune = base.technique("prune_unstructured")
    techniques = [t for t in data["techniques"] if t["type"] not in ("prune_unstructured", "size_budget")]
    first = _channels_first(techniques)
    for t in techniques:
        if t["type"] == "quant_lsq":
            t.update(zero_level=True, start=first, layer_bits=None, learn_bits=learn_bits)
            t["nonzero_grid"] = bool(t.get("nonzero_grid")) or nonzero_grid
    if not any(t["type"] == "quant_lsq" for t in techniques):  # its widths as asked too (learn_bits defaults to on)
        techniques.append({"type": "quant_lsq", "bits": 4, "zero_level": True, "start": first, "learn_bits": learn_bits,
                           "nonzero_grid": nonzero_grid})
    end = prune.end if prune is not None else 0.6
    start = max(prune.start if prune is not None else 0.0, first)
    if budget.get("decide_steps") is not None:
        start = min(start, 0.2)
        if total_steps:
            budget.update(paced_window(budget.pop("decide_steps"), total_steps, start))
    techniques.append({"type": "size_budget", "start": start, "end": end, "freeze": max(end, 0.8), **budget})
    data["techniques"], data["mode"] = techniques, "joint"
    if data.get("target"):
        data["target"] = {k: v for k, v in data["target"].items() if k not in ("allocated", "steer")}
    return parse_recipe(data, source="joint form of the recipe")


def _channels_first(techniques: list[dict]) -> float:
    """Where prune_structured is in the joint form, its channels are decided first, by CHANNELS_END of
    the run; the quantizer and the size budget start there, on the architecture that stays (the paced
    window starts by 0.2). Returns that start (0.0 without channel pruning).

    Why: decided together from step 0, the channels' scores trained under the quantizer's noise and the
    dead zones under a budget that the channels were still shrinking; LeNet-5 at 100x with half its
    channels ended 0.08 +- 0.02 points worse than channel pruning and the size target in two runs (an earlier
    benchmarks/channels_and_size.py, its result not stored); with the channels first it ties them (+0.03 +- 0.03),
    though with 2,000 images it is 0.19 +- 0.09 behind (BENCHMARKS.md)."""
    channels = next((t for t in techniques if t["type"] == "prune_structured"), None)
    if channels is None:
        return 0.0
    channels["end"] = min(channels["end"], CHANNELS_END)
    channels["start"] = min(channels["start"], channels["end"])
    return channels["end"]


def as_joint_form(recipe: Recipe) -> tuple[Recipe, dict | None]:
    """`recipe` in its joint form where it asks for one (Recipe.asks_for_joint_form), else unchanged; and
    the history event that says what changed (None where nothing did). The budget starts where
    the masks would have (at most at 0.2 of the run, where a paced window may start)."""
    if not recipe.asks_for_joint_form():
        return recipe, None
    prune = recipe.technique("prune_unstructured")
    _warn_widths_fixed(recipe.technique("quant_lsq"))
    joint = joint_recipe(recipe, nonzero_grid=nonzero_by_default(recipe.technique("quant_lsq")), **joint_form_budget())
    if recipe.technique("quant_lsq") is None:
        _say_quantizer_added(joint.technique("quant_lsq").bits)
    event = {"event": "joint_form", "step": 0, "bits": joint.technique("quant_lsq").bits,
             "nonzero_grid": joint.technique("quant_lsq").nonzero_grid,
             "replaced": ["prune_unstructured"] if prune is not None else [],
             "size_budget": {k: v for k, v in joint.technique("size_budget").model_dump().items() if k != "type"},
             **({"channels_first": {"prune_structured_end": joint.technique("prune_structured").end,
                                    "quant_lsq_start": joint.technique("quant_lsq").start}}
                if joint.technique("prune_structured") is not None else {}),
             "note": "mode: joint under a size target: zero is a level of the quantizer, learned under one size "
                     "budget (quant_lsq.zero_level + size_budget, docs/joint.md); mode: overlap keeps magnitude "
                     "masks and LSQ under the allocator's per-layer budgets"}
    return joint, event


def _say_quantizer_added(bits: int) -> None:
    """The joint form prunes through the quantizer's dead zone, so a recipe without quant_lsq gets one: said, as
    the sequential allocator says what it adds (targets._say_added), not left to the manifest's recipe."""
    warnings.warn(f"mode: joint under a size target prunes through the quantizer's dead zone, so quant_lsq was added "
                  f"to the recipe ({bits} bits, zero_level: true; the manifest's recipe holds it); write quant_lsq "
                  "into the recipe to choose its bits", stacklevel=3)


def _warn_widths_fixed(quant) -> None:
    """A recipe that asks for the dead zone with learned widths (quant_lsq.zero_level, learn_bits on) gets them
    fixed at quant_lsq.bits in the joint form, as compare's joint variants fix them; the user is told, not left
    to find every layer at `bits` in the artifact."""
    if quant is not None and quant.zero_level and quant.learn_bits and quant.min_bits < quant.max_bits:
        warnings.warn(f"mode: joint under a size target trains its joint form, which keeps every layer's width at "
                      f"quant_lsq.bits ({quant.bits}); to learn widths in [{quant.min_bits}, {quant.max_bits}] write "
                      "size_budget into the recipe (docs/joint.md), or set learn_bits: false to fix them quietly",
                      stacklevel=3)

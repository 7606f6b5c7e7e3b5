"""A size target for an HF recipe: how many attention heads and FFN neurons to keep, chosen before
training so that the packed artifact's weights file lands at or just under the target.

Why a planner of its own: the core allocator (targets.py) spreads unstructured sparsity and bits over
layers; an HF recipe removes whole heads and neurons (what makes the model faster on any hardware),
so the artifact's bytes are an affine function of how many of each are kept. The function is
measured, not modelled: the student (its vocabulary trimmed first where the recipe trims it) is
encoded by the artifact's own encoder as it is, with half of every layer's heads removed, and with
half of every FFN removed, its LSQ layers on the grids quant_lsq starts from and the rest rounded
at hf.ptq_bits, entropy coding included (it codes 8-bit layers well under their fixed width, so a
fixed-width plan would remove far more than the target needs). Training moves the values, and so
the coded bytes, a little: the plan aims MARGIN under the target.

The recipe's prune_heads / prune_ffn sparsities give the proportion between the two (0.33 and 0.5:
FFN neurons removed 1.5 times as fast as heads); one factor on both is searched for.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from jointcompress.errors import RecipeError
from jointcompress.targets import TargetError
from jointcompress.techniques.prune_units import kept_units

UNIT_KINDS = ("prune_heads", "prune_ffn")
MARGIN = 0.01  # the plan aims this far under the target (as size_budget.margin does)


@dataclass
class UnitBytes:
    """Weights-file bytes of the student = full - sum over kinds of (removed units * per_unit[kind])."""

    full: float
    per_unit: dict[str, float]
    layers: int
    units: dict[str, int]  # per layer

    def bytes_at(self, kept: dict[str, int]) -> float:
        return self.full - sum((self.layers * self.units[k] - kept[k]) * self.per_unit[k] for k in kept)


def _encoded_bytes(hf: nn.Module, recipe, ptq_bits: int | None) -> int:
    """The weights file's bytes of `hf` as the artifact would store it, its LSQ layers on the grids
    quant_lsq starts from (LSQ's step initialisation) and the rest rounded as the artifact rounds it.
    What training stores narrow is narrow here too: the steps in quant_lsq.scale_format, the LSQ
    layers' biases in bias_format and, under a size target, the normalization layers in fp16
    (norm_format auto): measured wide, a tiny BERT's file landed 5% under the plan."""
    from jointcompress.artifact.encode import encode_model
    from jointcompress.artifact.store import file_blob
    from jointcompress.hf.artifact import quantize_rest
    from jointcompress.hf.wrapper import SequenceClassifier
    from jointcompress.spec import CompressionSpec, LayerSpec
    from jointcompress.techniques.base import selected_layers

    quant = next((t for t in recipe.techniques if t.type == "quant_lsq"), None)
    spec = CompressionSpec(recipe=recipe.model_dump(mode="json"))
    if quant is not None:
        from jointcompress.artifact.precision import round_bias
        from jointcompress.techniques.norm_storage import round_norms

        for name, layer in selected_layers(SequenceClassifier(hf), quant).items():
            bits = (quant.layer_bits or {}).get(name, quant.bits)
            scale = _onto_grid(layer.weight, bits, quant.per_channel, quant.stored_scale_format)
            if isinstance(layer.bias, torch.Tensor):
                with torch.no_grad():
                    layer.bias.copy_(round_bias(layer.bias, quant.bias_format, scale))
            spec.layers[name.removeprefix("hf.")] = LayerSpec(bits=bits, scale=scale)
        if quant.norms_in_fp16:
            with torch.no_grad():
                round_norms(hf)
    if ptq_bits is not None:
        quantize_rest(hf, spec, ptq_bits)
    return len(file_blob(encode_model(hf, spec, entropy=True), "jcw"))  # the container's index too


@torch.no_grad()
def _onto_grid(w: torch.Tensor, bits: int, per_channel: bool, step_format: str = "fp16") -> torch.Tensor:
    """Round w (a copy's) onto the `bits` grid of LSQ's initial step sizes, stored in `step_format`;
    returns them per row. Their spread over the levels, not the fixed width, sets what entropy coding saves."""
    from jointcompress.artifact.precision import round_step
    from jointcompress.techniques.quant_lsq import lsq_init_step

    qmax = 2 ** (bits - 1) - 1
    scale = round_step(lsq_init_step(w, qmax, per_channel).reshape(-1).expand(w.shape[0]).clamp_min(1e-12), step_format)
    w.copy_(torch.round(w / scale[:, None]).clamp(-qmax, qmax) * scale[:, None])
    return scale.clone()


def measure(student: nn.Module, recipe, ptq_bits: int | None, kinds: list[str]) -> UnitBytes:
    """The affine bytes model of `student` (a vocabulary-trimmed copy where the run trims), from
    one encoding as it is and one per kind with half of every layer's units removed."""
    from jointcompress.hf.ffn import ffn_widths, prune_ffn
    from jointcompress.hf.heads import head_counts, prune_heads

    counts = {"prune_heads": (head_counts, prune_heads), "prune_ffn": (ffn_widths, prune_ffn)}
    full = _encoded_bytes(copy.deepcopy(student), recipe, ptq_bits)
    per_unit, units = {}, {}
    for kind in kinds:
        count, prune = counts[kind]
        widths = count(student)
        if len(set(widths)) != 1:
            raise RecipeError(f"target with {kind}: the student's layers have different widths {widths} (a model pruned "
                              "before, e.g. an earlier run's hf_model), and neither a target nor a sparsity of "
                              f"{kind} takes such a model; give the unpruned teacher (with its own {kind} target or "
                              "sparsity), or compress this one further with prune_layers, prune_unstructured and "
                              "quant_lsq")
        half = widths[0] // 2
        smaller = prune(copy.deepcopy(student), [list(range(widths[0] - half)) for _ in widths])
        per_unit[kind] = (full - _encoded_bytes(smaller, recipe, ptq_bits)) / (half * len(widths))
        units[kind] = widths[0]
    return UnitBytes(float(full), per_unit, len(head_counts(student)), units)


MAX_SPARSITY = 0.99  # recipe._PruneUnits.sparsity's bound


def plan(run) -> dict:
    """Replace run.recipe by one whose prune_heads / prune_ffn sparsities land the artifact's weights
    file at or under recipe.target (ratio: against the teacher's fp32 weights), and without the
    target (the core loop has nothing left to allocate). Returns what was planned, for the summary."""
    from jointcompress.artifact.size import dense_fp32_bytes

    target = run.recipe.target
    recipe = run.recipe.without_target()  # what trains: the target met by the sparsities
    units = [t for t in recipe.techniques if t.type in UNIT_KINDS]
    if not units:
        raise TargetError("target in an hf recipe sets how many attention heads and FFN neurons are kept: add "
                          "prune_ffn (and prune_heads) to techniques, or remove target")
    teacher_bytes = dense_fp32_bytes(run.teacher)
    goal = target.size_kb * 1024 if target.size_kb is not None else teacher_bytes / target.ratio
    aim = goal * (1 - MARGIN)
    model = _as_saved(run)
    ub = measure(model, recipe, run.hf_cfg.ptq_bits, [t.type for t in units])
    weights = {t.type: t.sparsity for t in units} if any(t.sparsity > 0 for t in units) else {t.type: 1.0 for t in units}

    def sparsities(c: float) -> dict[str, float]:
        return {k: min(MAX_SPARSITY, c * w) for k, w in weights.items()}

    def planned(c: float) -> float:
        s = sparsities(c)
        return ub.bytes_at({t.type: kept_units(ub.layers, ub.units[t.type], t, s[t.type])[1] for t in units})

    c_max = MAX_SPARSITY / min(w for w in weights.values() if w > 0)
    if planned(c_max) > goal:
        fewest = {t.type: kept_units(ub.layers, ub.units[t.type], t, sparsities(c_max)[t.type])[1] for t in units}
        raise TargetError(_unreachable(goal, planned(c_max), teacher_bytes, run, units, fewest, ub))
    if planned(c_max) > aim:  # reachable, but not with the margin: plan onto the target itself, and say so
        aim = goal
        warnings.warn(f"target {_size(goal)}: with the most units removed that the plan may remove, it is "
                      f"{1 - planned(c_max) / goal:.2%} under it, less than the {MARGIN:.0%} margin the coded bytes "
                      "may move by in training; the file may end over it. Ask for a little less to be safe",
                      stacklevel=2)
    lo, hi = 0.0, c_max  # planned() falls as c grows: the least pruning that fits
    if planned(lo) > aim:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if planned(mid) <= aim else (mid, hi)
    else:
        hi = 0.0
        _warn_nothing_removed(units, goal, planned(0.0))
    chosen = sparsities(hi)
    run.recipe = recipe.model_copy(update={"techniques": [
        t.model_copy(update={"sparsity": chosen[t.type]}) if t.type in chosen else t for t in recipe.techniques]})
    return {"goal_bytes": int(goal), "planned_bytes": int(planned(hi)), "teacher_fp32_bytes": teacher_bytes,
            "ratio": target.ratio, "size_kb": target.size_kb, "sparsity": chosen,
            "kept": {t.type: kept_units(ub.layers, ub.units[t.type], t, chosen[t.type])[1] for t in units},
            "total": {t.type: ub.layers * ub.units[t.type] for t in units}}


def _warn_nothing_removed(units: list, goal: float, unpruned: float) -> None:
    """The student meets the target with every head and neuron (quantization and a trimmed vocabulary did it):
    the plan removed none, though the recipe's sparsities asked for some, and the run was as slow as the teacher's
    architecture with no word (the log's "keeping 48 of 48 heads" alone)."""
    asked = [f"{t.type}.sparsity {t.sparsity:g}" for t in units if t.sparsity > 0]
    if asked:
        warnings.warn(f"target {_size(goal)}: the student without any head or FFN neuron removed is {_size(unpruned)}, "
                      f"under it already, so none is removed ({' and '.join(asked)} only set the proportion between "
                      "them under a target): no speed is gained. For speed, ask for a smaller file (a larger ratio), "
                      "or remove the target to prune at the recipe's sparsities", stacklevel=3)


def _as_saved(run) -> nn.Module:
    """A copy of the student with the vocabulary the artifact will have (trimmed to the training
    text's word pieces where the recipe says so)."""
    student = copy.deepcopy(run.student)
    if run.hf_cfg.trim_vocab:
        from jointcompress.hf.vocab import trim_vocab

        student, _, _ = trim_vocab(student, run.tok, run.train_data.texts)
    return _unpinned(student)


@torch.no_grad()
def _unpinned(model: nn.Module) -> nn.Module:
    """`model` with every parameter whose values are all one number (the zero biases and unit
    LayerNorm weights of a model made from its config, never trained) given a spread, as training
    gives one: the entropy coder stores a constant tensor in almost nothing, so the plan counted those
    bytes as free, and a tiny from-config BERT trained for one short epoch ended 2-4% over its target.
    How far training moves them is not known before it; this prices them as moved (the file may then
    land a little further under the target). A trained model has no such tensor, and its plan is as
    before."""
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.numel() > 1 and p.is_floating_point() and bool((p == p.reshape(-1)[0]).all()):
            spread = 1e-2 * max(float(p.reshape(-1)[0].abs()), 1.0)
            p.add_(torch.randn(p.shape, generator=generator, device="cpu").to(p) * spread)
    return model


def _size(n: float) -> str:
    """Bytes as the messages give them: exact under 100 KiB, where a tenth of a KiB hides the gap."""
    return f"{n:,.0f} B" if n < 100 * 1024 else f"{n / 1024:,.1f} KiB"


def _unreachable(goal: float, smallest: float, teacher_bytes: int, run, units: list, fewest: dict, ub: UnitBytes) -> str:
    """The refusal: the smallest file the plan can reach, how many units it removes there (and what
    stops it removing more: a sparsity of 0 keeps a kind out, min_keep a share in every layer), and the
    knobs that shrink the rest."""
    knobs = ["fewer hf.student_layers", "lower quant_lsq bits", "lower hf.ptq_bits (the embeddings)"]
    if not run.hf_cfg.trim_vocab:
        knobs.append("hf.trim_vocab: true (most of a small BERT is its word embeddings)")
    names = {"prune_heads": "attention heads", "prune_ffn": "FFN neurons"}
    removed = []
    for t in units:
        total = ub.layers * ub.units[t.type]
        unbound = kept_units(ub.layers, ub.units[t.type], t.model_copy(update={"min_keep": 0.0}), MAX_SPARSITY)[1]
        why = ""
        if t.sparsity == 0 and any(u.sparsity > 0 for u in units):
            why, knob = f"{t.type}.sparsity: 0 keeps them out of the plan", f"{t.type}.sparsity above 0"
        elif fewest[t.type] > unbound:
            why, knob = f"{t.type}.min_keep: {t.min_keep:g} in every layer", f"a lower {t.type}.min_keep"
        removed.append(f"{total - fewest[t.type]:,} of {total:,} {names[t.type]}" + (f" ({why})" if why else ""))
        if why:
            knobs.insert(0, knob)
    return (f"target {_size(goal)} ({teacher_bytes / goal:.1f}x the teacher's fp32 {_size(teacher_bytes)}) "
            f"cannot be met: with {' and '.join(removed)} removed the weights file is still {_size(smallest)} "
            f"({teacher_bytes / smallest:.1f}x). Ask for less, or try " + ", ".join(knobs))

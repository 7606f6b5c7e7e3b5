"""Make compression permanent: remove every reparametrization and shrink pruned layers.

Like torch.nn.utils.prune.remove(): the masked, fake-quantized weight becomes the plain
`weight` (its values sit exactly on the quantization grid and pruned entries are exact
zeros), the state dict gets the model's plain keys, and channels whose structured mask is 0
are physically removed from every coupled layer (through the traced dependency graph), so
the finalized model is really smaller and faster. Residual blocks that prune_blocks faded into
the identity are replaced by nn.Identity first. What cannot be read off the plain tensors
(bits, step sizes, the pruning plan) is returned as a CompressionSpec.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .block_drop import collapse_faded
from .errors import JointCompressError, UnsupportedModelError
from .graph import PRUNABLE_ROOTS, build_graph, frozen_stay_frozen
from .group_checks import output_gap, tolerance
from .model_call import call_model
from .model_copy import own_class
from .spec import PRIOR_STRUCTURE, CompressionSpec, LayerSpec, prior_structure
from .strides import raised_strides
from .techniques.masks import ApplyMask, harden_masks, has_soft_masks
from .techniques.norm_storage import detach_norm_storage
from .techniques.quant_lsq import LSQActivation, LSQWeight, attach_frozen_input_quant


def quant_specs(model: nn.Module) -> dict[str, LayerSpec]:
    specs = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, LSQWeight):
                    specs[name] = LayerSpec(bits=p.bits, scale=p.scale().clone(),
                                            nonzero_levels=bool(getattr(p, "nonzero_grid", False)))
        aq = getattr(m, "input_quant", None)
        if aq is not None:
            spec = specs.setdefault(name, LayerSpec())
            spec.act_bits, spec.act_scale = aq.bits, float(aq.step.detach())
            spec.act_signed = bool(aq.signed)
    return specs


def _dead_channels_share_a_step(model: nn.Module, spec: CompressionSpec) -> None:
    """An output channel with no kept weight computes its bias (or zero) whatever its step, unless the
    bias is stored as a multiple of it (encode.live_channels). The artifact stores only the live
    channels' steps and gives a dead one the first stored step (encode.stored_steps), so finalize
    gives it that step too: the spec saves and loads unchanged. The weights are untouched (zero
    times any step)."""
    from .artifact.encode import filled_steps, live_channels, stored_steps

    for name, ls in spec.layers.items():
        if ls.scale is None or ls.scale.numel() <= 1:
            continue
        layer = model.get_submodule(name)
        bias = getattr(layer, "bias", None)
        bias = bias.detach().cpu() if isinstance(bias, torch.Tensor) and bias.dim() == 1 else None
        live = live_channels(layer.weight.detach().cpu(), bias, ls.scale.detach().cpu())
        if live.numel() == ls.scale.numel() and not bool(live.all()):
            scale = ls.scale.detach()
            ls.scale = filled_steps(stored_steps(scale.cpu(), live)[0], live).to(scale.device, scale.dtype)


def _structured_plan(model: nn.Module) -> dict[str, tuple]:
    """root layer -> (group, channel indices to remove), read from the structured masks."""
    plan = {}
    for m in model.modules():
        for pname in ("weight", "bias"):
            if not parametrize.is_parametrized(m, pname):
                continue
            for p in getattr(m.parametrizations, pname):
                if isinstance(p, ApplyMask) and p.dim is not None:
                    g = p.source.group
                    drop = torch.nonzero(p.source.hard == 0).flatten().tolist()
                    plan[g.name] = (g, drop)
    return plan


def _remove_reparametrizations(model: nn.Module) -> list[str]:
    """Bake this package's masks and quantizers into plain tensors; returns the BatchNorm layers
    folded into their stored affine (quant_lsq.norm_format: fp16_folded). A parametrization of the
    user's own (weight_norm, orthogonal) on a layer no technique touched stays: removing it changed
    the model's state-dict keys, so the saved artifact no longer loaded into the model its builder makes."""
    folded = []
    for name, m in model.named_modules():
        ours = [pname for pname, plist in (getattr(m, "parametrizations", {}) or {}).items()
                if any(type(p).__module__.startswith("jointcompress.") for p in plist)]
        if ours:
            own_class(m)  # a user's copy of the model (a snapshot) keeps the class it shares, and its weight
        for pname in ours:
            parametrize.remove_parametrizations(m, pname, leave_parametrized=True)
        if detach_norm_storage(m):
            folded.append(name)
    freeze_input_quant(model)
    return folded


def freeze_input_quant(model: nn.Module) -> None:
    """Every trained input quantizer (quant_lsq activations: true) becomes its fixed rounding, so the
    finalized model computes what the trained one did."""
    for m in model.modules():
        trained = getattr(m, "input_quant", None)
        if isinstance(trained, LSQActivation):
            attach_frozen_input_quant(m, trained.bits, trained.step.detach(), bool(trained.signed))


def unit_mask_kinds(model: nn.Module) -> list[str]:
    """The prune_heads / prune_ffn / prune_layers masks whose hooks `model` carries."""
    return sorted({getattr(hook, "unit_mask") for m in model.modules()
                   for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                   if isinstance(getattr(hook, "unit_mask", None), str)})


def carries_unit_masks(model: nn.Module) -> bool:
    return bool(unit_mask_kinds(model))


@torch.no_grad()
def _refuse_unit_masks(model: nn.Module) -> None:
    """Transformer unit masks (prune_heads / prune_ffn / prune_layers) are hooks this finalize cannot
    remove: it left them on, the units masked but not removed, and save wrote the unmasked weights."""
    kinds = unit_mask_kinds(model)
    if kinds:
        raise JointCompressError(
            f"finalize: the model still carries {' / '.join(kinds)} masks (hooks), which remove whole heads, FFN "
            "neurons or layers: finalize it with session.finalize() or, after compress(), result.finalize() (they "
            "remove the units physically); jointcompress.finalize(model) alone cannot")


def finalize(model: nn.Module, example_inputs=None, recipe: dict | None = None, *,
             warn_empty: bool = True) -> CompressionSpec:
    """Finalize `model` in place and return its CompressionSpec.

    `example_inputs` is needed only when structured pruning removed channels (to trace the
    dependency graph of the plain model). `warn_empty=False`: the size budget's measuring copies,
    finalized many times a run: no warning for layers left without a nonzero weight, and channels
    removed without a trial on a copy first (it is a copy).

    Masks still ramping (a loop stopped early) are made binary at their current keep first, as the
    end of their ramp makes them: soft values scaled the channels finalize then removed, so the
    shrunk model differed from the masked one.
    """
    _refuse_unit_masks(model)
    was_training = model.training
    model.eval()
    soft = _soft_outputs(model, example_inputs) if warn_empty else None
    harden_masks(model)
    dropped = collapse_faded(model)  # first: the layers of a removed block leave no spec and no plan
    specs = quant_specs(model)
    plan = _structured_plan(model)
    pruned = _unstructured_pruned(model)
    pruning = bool(pruned) or _has_dead_zones(model)  # read before the parametrizations go
    if warn_empty:
        _warn_rounded_away(model, [name for name in specs if name not in pruned])
        # a mask that removed nothing (sparsity 0) left no zeros to store
        _warn_zeros_stored_dense([name for name in pruned if name not in specs
                                  and bool((model.get_submodule(name).weight == 0).any())])
    checked = warn_empty and example_inputs is not None  # the user's model: baking must not move its outputs
    trained = _outputs(model, example_inputs) if checked else None
    folded = _remove_reparametrizations(model)
    if checked:
        _check_baked(model, example_inputs, trained)
    if warn_empty:
        _warn_empty_layers(model, [*specs, *(name for name in pruned if name not in specs)], pruning=pruning)
        _warn_nonfinite(model)
    spec = _with_prior_structure(prior_structure(model), dropped)  # a model finalized or loaded before: its structure first
    spec.layers, spec.recipe = specs, recipe
    spec.folded_norms, spec.example_inputs = folded, example_inputs
    spec.strides = {**spec.strides, **raised_strides(model)}
    todo = {name: (g, drop) for name, (g, drop) in plan.items() if drop}
    if todo:
        if example_inputs is None:
            raise JointCompressError(
                "finalize: structured pruning removed channels; pass example_inputs (e.g. result.example_inputs) "
                "so the model can be traced to remove them from every coupled layer"
            )
        if warn_empty:  # the user's model: tried on a copy first, so that a refusal leaves it whole
            _shrink(copy.deepcopy(model), todo, example_inputs, copy.deepcopy(spec))
        _shrink(model, todo, example_inputs, spec, each=not warn_empty)  # the copy checked each group already
    _dead_channels_share_a_step(model, spec)
    if soft is not None:
        _warn_soft_masks_made_binary(soft, _outputs(model, example_inputs))
    if spec.pruning_history or spec.dropped_blocks or spec.strides:  # a further run on this model keeps them in its spec
        setattr(model, PRIOR_STRUCTURE, spec.structure())
    model.train(was_training)
    return spec


def _warn_empty_layers(model: nn.Module, compressed: list[str], pruning: bool = True) -> None:
    """A compressed layer without a nonzero weight passes only its bias on: the model still runs, but
    whatever reached that layer is lost. A size target just above what one weight per channel costs can
    land there; nothing else says so. Without pruning (`pruning`: a mask or dead zone on some layer), the
    rounding emptied it, or the weight was all zeros: the advice names those, not the sparsity."""
    empty = []
    for name in compressed:
        weight = getattr(model.get_submodule(name), "weight", None)
        if weight is not None and weight.numel() and not bool(weight.any()):
            empty.append(name)
    if empty:
        warnings.warn(f"finalize: {len(empty)} layer(s) have no nonzero weight left ({', '.join(empty[:6])}"
                      f"{', ...' if len(empty) > 6 else ''}): each passes only its bias on. "
                      + ("Raise the size target (or lower the sparsity), or exclude them from pruning" if pruning else
                         "Nothing pruned them: their weights were all zero, or every one rounds to zero at its step "
                         "(a few outliers set a per-tensor step: quant_lsq.per_channel: true, or more bits)"),
                      stacklevel=3)


# a layer whose rounding zeroes this share of its weights beyond its own zeros is said; at 2 bits LSQ's step
# itself zeroes about 57% of normally distributed weights (|w| under mean |w|), so the bar is well above that
ROUNDED_AWAY = 0.9


def _warn_rounded_away(model: nn.Module, names: list[str]) -> None:
    """A quantized layer (no mask, no dead zone) whose rounding zeroes most of its weights: a few large weights set a
    per-tensor step, and the rest fall under half a step. A weight of 1e4 among weights of 0.05 left 2,636 of
    50,176 nonzero at 4 bits, without a word (per channel, only that channel's step grows)."""
    from .techniques.quant_lsq import LSQWeight
    from .techniques.zero_level import ZeroLevelLSQWeight

    said = []
    for name in names:
        layer = model.get_submodule(name)
        quantizers = [p for p in getattr(getattr(layer, "parametrizations", None), "weight", [])
                      if isinstance(p, LSQWeight) and not isinstance(p, ZeroLevelLSQWeight)]
        if len(quantizers) != 1:
            continue
        with torch.no_grad():
            original, rounded = layer.parametrizations.weight.original, layer.weight
            lost = float((rounded == 0).float().mean() - (original == 0).float().mean())
        if lost > ROUNDED_AWAY:
            q = quantizers[0]
            said.append(f"{name} ({100 * lost:.0f}% of its weights, {q.bits} bits"
                        f"{', one step for the layer' if not q.per_channel else ''})")
    if said:
        warnings.warn(f"finalize: rounding zeroes most weights of {len(said)} layer(s): {'; '.join(said[:6])}. Their "
                      "step is set by a few large weights, and the others fall under half a step; quantize per channel "
                      "(quant_lsq.per_channel: true), give them more bits, or exclude them", stacklevel=3)


def _has_dead_zones(model: nn.Module) -> bool:
    """Whether any weight is quantized with zero as a level (the joint form's dead zones prune without a mask)."""
    from .techniques.zero_level import ZeroLevelLSQWeight

    return any(isinstance(p, ZeroLevelLSQWeight) for m in model.modules() if parametrize.is_parametrized(m, "weight")
               for p in m.parametrizations.weight)


def _unstructured_pruned(model: nn.Module) -> list[str]:
    """Layers whose weight carries an unstructured mask."""
    return [name for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, ApplyMask) and p.dim is None for p in m.parametrizations.weight)]


def _warn_zeros_stored_dense(dense: list[str]) -> None:
    """Unstructured masks on a layer that is not quantized: the artifact stores such a layer as a plain fp32
    tensor (sparse layouts are a quantized layer's), so a prune-only recipe's file did not shrink at any
    sparsity, and nothing said so."""
    if dense:
        warnings.warn(f"finalize: {len(dense)} pruned layer(s) are not quantized ({', '.join(dense[:4])}"
                      f"{', ...' if len(dense) > 4 else ''}): the artifact stores them dense in fp32, so their zeros do "
                      "not make the file smaller. Quantize them to store them sparse: add quant_lsq (bits: 8 stays "
                      "close to fp32), or, where the recipe has it, finalize after its start",
                      stacklevel=3)


def _warn_nonfinite(model: nn.Module) -> None:
    from .session.checks import nonfinite_tensors

    bad = nonfinite_tensors(model.named_parameters())
    if bad:
        warnings.warn(f"finalize: {len(bad)} parameter(s) hold NaN or inf ({', '.join(bad[:4])}"
                      f"{', ...' if len(bad) > 4 else ''}): training took a non-finite step in, and the model's outputs "
                      "are not numbers; artifact.save refuses it. Train again from a clean copy (check the data "
                      "for NaN, lower the learning rate)", stacklevel=3)


def _with_prior_structure(spec: CompressionSpec, dropped: list[str]) -> CompressionSpec:
    """The earlier structure `spec` with this run's dropped blocks added where they replay: before
    every history where there is none yet, else after the earlier runs' history (which may name
    their layers: replayed first, it would look for layers that are gone)."""
    if dropped and spec.pruning_history:
        spec.later_dropped_blocks = spec.later_dropped_blocks + [(len(spec.pruning_history), list(dropped))]
    else:
        spec.dropped_blocks = spec.dropped_blocks + list(dropped)
    return spec


def _shrink(model: nn.Module, todo: dict, example_inputs, spec: CompressionSpec, each: bool = True) -> None:
    """Remove `todo`'s channels from `model`; the outputs checked after each group's removal (`each`: a forward of
    the example rows a group, so a refusal names the group that failed), or once after all of them, where a copy's
    removal has checked each group already."""
    modules = dict(model.named_modules())
    _drop_step_rows(todo, spec)
    masked = _outputs(model, example_inputs)
    with frozen_stay_frozen(model):
        dg = build_graph(model, example_inputs)
        for g, drop in todo.values():
            root, drop = _root(g, drop, modules)
            fn = dg.get_pruner_of_module(root).prune_out_channels
            dg.get_pruning_group(root, fn, drop).prune()
            if each:
                _check_parity(model, example_inputs, masked, [g])
    if not each:
        _check_parity(model, example_inputs, masked, [g for g, _ in todo.values()])
    spec.pruning_history = spec.pruning_history + [list(h) for h in dg.pruning_history()]


def _drop_step_rows(todo: dict, spec: CompressionSpec) -> None:
    """The removed rows dropped from the per-channel step sizes too, for every layer at once: a layer whose
    outputs several groups share (a convolution whose channels a concatenation splits among the groups a residual
    add ties them to) had its steps trimmed a group at a time, each group's indices read against the steps an
    earlier group had shortened already (48 outputs, 24 kept, 32 steps left: finalize failed after training)."""
    dropped: dict[str, set[int]] = {}
    for g, drop in todo.values():
        removed = set(drop)
        for m in g.out_members():
            dropped.setdefault(m.module, set()).update(i for i, r in zip(m.idxs, m.root_idxs) if r in removed)
    for module, rows in dropped.items():
        ls = spec.layers.get(module)
        if ls is not None and ls.scale is not None and ls.scale.numel() > 1 and rows:
            ls.scale = ls.scale[[i for i in range(ls.scale.numel()) if i not in rows]]


def _root(g, drop: list[int], modules: dict[str, nn.Module]) -> tuple[nn.Module, list[int]]:
    """The layer the group's channels are removed through, and `drop` as its output channels: the group's
    root, or where that is gone (a layer of a block prune_blocks removed, in a group named before groups
    were named by the layers that stay: block_drop.groups_that_stay) a producing member that stays and
    carries every channel to drop."""
    if g.name in modules:
        return modules[g.name], drop
    for m in g.out_members():
        to_idx = dict(zip(m.root_idxs, m.idxs))
        layer = modules.get(m.module)
        if layer is not None and isinstance(layer, PRUNABLE_ROOTS) and all(c in to_idx for c in drop):
            return layer, [to_idx[c] for c in drop]
    raise JointCompressError(f"finalize: the channel group {g.name!r} has no layer left to remove its channels "
                             f"through (its layers: {', '.join(g.layers())})")


@torch.no_grad()  # compared, never differentiated: no graph kept for them
def _outputs(model: nn.Module, example_inputs):
    return call_model(model, example_inputs)


def _soft_outputs(model: nn.Module, example_inputs):
    """The outputs of a model whose learned masks are still soft (a loop stopped mid-ramp), before finalize
    makes them binary; None where every mask is binary already (or there is nothing to run)."""
    if example_inputs is None or not has_soft_masks(model):
        return None
    with torch.no_grad():
        return _outputs(model, example_inputs)


def _warn_soft_masks_made_binary(soft, finalized) -> None:
    """Learned masks finalized mid-ramp scale each channel by a sigmoid between 0 and 1; finalize keeps or
    removes it, as the ramp's end would, and the outputs move (tests/test_session.py), which its parity check,
    taken after, could not see. Said with the size of the move."""
    gap = output_gap(soft, finalized)
    if gap > tolerance(soft):
        warnings.warn(f"finalize: learned channel masks were still soft (their ramp had not ended) and are made binary, "
                      f"as the ramp's end makes them; the outputs moved by {gap:.3g} (relative to their largest). Evaluate "
                      "the finalized model (the artifact holds it), or finalize once the masks' ramp has ended "
                      "(prune_structured.end)", stacklevel=3)


def _check_baked(model: nn.Module, example_inputs, trained) -> None:
    """Baking the masks and quantizers into plain tensors gives the outputs the run trained and
    evaluated, or the model is refused: a tensor a compressed layer shares with another place
    (a probe: one bias in two Linear layers) gets the compressed value there too, and the model
    saved would not be the model measured."""
    gap = output_gap(trained, _outputs(model, example_inputs))
    if gap > tolerance(trained):
        raise UnsupportedModelError(
            f"finalize: baking the masks and quantizers into plain weights changed the model's outputs by {gap:.3g} "
            "(relative to their largest); most likely a compressed layer's weight or bias is also used in another "
            "place (one Parameter in two layers), which now holds the compressed value too. Give that layer its own "
            "copy of the tensor, or exclude it from the techniques, and run again; the model is left baked"
        )


def _check_parity(model: nn.Module, example_inputs, masked, groups: list) -> None:
    """The shrunk model must give the masked model's outputs; a group that does not is a model we cannot prune.
    `groups`: those removed since `masked` was taken (one, where _shrink checks each: the refusal named every group
    being removed, and a user excluded all of them)."""
    try:
        gap = output_gap(masked, _outputs(model, example_inputs))
        detail = f"outputs differ by {gap:.3g} (relative)"
    except Exception as exc:  # the shrunk model no longer runs
        gap, detail = float("inf"), f"{type(exc).__name__}: {exc}"
    if gap > tolerance(masked):
        names = [g.name for g in groups]
        raise UnsupportedModelError(
            f"finalize: removing the pruned channels of group{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))} "
            f"changed the model ({detail}); the model keeps every channel (its pruned ones zero, its masks and quantizers "
            f"baked in). Exclude {'them' if len(names) > 1 else 'the group'} from prune_structured (exclude: {names}) and "
            "report the architecture"
        )

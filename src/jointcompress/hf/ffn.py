"""FFN intermediate-neuron masks during training, and physical neuron removal.

The mask multiplies the input of each layer's FFN output projection (after the
activation), so neuron j off is exactly "column j of the output projection unused";
removal then slices rows of the first FFN Linear and columns of the second.
"""

from __future__ import annotations

import torch
from torch import nn

from jointcompress.errors import RecipeError
from jointcompress.hf.masks import UnitMask, checked_keep, gate_importance, normalise_importance
from jointcompress.hf.modeling_pruned import ARCH, family, get_sub, keep_neurons, layers
from jointcompress.hf.pruned import mark_pruned


def ffn_widths(model: nn.Module) -> list[int]:
    """Current FFN intermediate width of each layer."""
    fam = family(model.config)
    return [get_sub(layer, ARCH[fam]["ffn_in"]).out_features for layer in layers(model)]


def new_ffn_mask(model: nn.Module, keep: int, *, per_layer: bool = False, min_per_layer: int = 1,
                 init: torch.Tensor | float = 3.0) -> UnitMask:
    """A UnitMask sized for the model's (uniform) FFN widths."""
    widths = ffn_widths(model)
    if len(set(widths)) != 1:
        raise RecipeError(f"FFN masks need the same width in every layer, got {widths}; mask before pruning")
    return UnitMask(len(widths), widths[0], keep, per_layer=per_layer, min_per_layer=min_per_layer,
                    init=init, name="ffn")


def attach_ffn_mask(model: nn.Module, mask: UnitMask) -> list:
    """Multiply each layer's FFN activations by mask()[layer]; returns hook handles."""
    fam = family(model.config)
    mods = layers(model)
    if mask.scores.shape != (len(mods), ffn_widths(model)[0]):
        raise RecipeError(
            f"FFN mask is {tuple(mask.scores.shape)} but the model has widths {ffn_widths(model)}; "
            "build it with new_ffn_mask(model, keep)"
        )
    handles = []
    for i, layer in enumerate(mods):
        def hook(module, args, i=i):
            return (args[0] * mask()[i].to(args[0].dtype),) + tuple(args[1:])

        hook.unit_mask = "prune_ffn"  # core finalize refuses a model that still carries one
        hook.unit_kept = getattr(mask, "kept", None)  # what a measuring copy keeps (hf.finalize.finalize_copy_with_units)
        handles.append(get_sub(layer, ARCH[fam]["ffn_out"]).register_forward_pre_hook(hook))
    return handles


def ffn_importance(model: nn.Module, batch_iter, n_batches: int = 16) -> torch.Tensor:
    """|d loss / d neuron-gate| summed over batches, shape [layers, width]."""
    widths = ffn_widths(model)
    return gate_importance(model, attach_ffn_mask, len(widths), widths[0], batch_iter, n_batches)


def importance_scores(model: nn.Module, batch_iter, n_batches: int = 16) -> torch.Tensor:
    """ffn_importance normalised into initial mask scores."""
    return normalise_importance(ffn_importance(model, batch_iter, n_batches))


def prune_ffn(model: nn.Module, keep: list[list[int]]) -> nn.Module:
    """Physically keep only neurons keep[layer] of each FFN; records intermediate_per_layer."""
    fam = family(model.config)
    for layer, neurons in zip(layers(model), checked_keep(keep, ffn_widths(model), "FFN neurons")):
        if neurons is not None:
            keep_neurons(layer, fam, neurons)
    mark_pruned(model, intermediate_per_layer=ffn_widths(model))
    return model

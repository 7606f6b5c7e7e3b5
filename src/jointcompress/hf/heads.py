"""Attention-head masks during training, and physical head removal afterwards.

transformers 5.x has no head_mask argument and no prune_heads. We mask heads with a
forward pre-hook on each layer's attention output projection: its input is the
concatenation of per-head outputs, so scaling slice h by mask[h] is exactly "head h off".
This works for BERT-family and DistilBERT alike, leaves the HF forward untouched, and
composes with a weight parametrization (LSQ fake-quant) on the same Linear.
"""

from __future__ import annotations

import torch
from torch import nn

from jointcompress.errors import RecipeError
from jointcompress.hf.masks import UnitMask, checked_keep, gate_importance, normalise_importance
from jointcompress.hf.modeling_pruned import ARCH, family, get_sub, head_dim, keep_heads, layers, require_units
from jointcompress.hf.pruned import mark_pruned


def head_counts(model: nn.Module) -> list[int]:
    """Current number of heads in each layer (from the q projection shape)."""
    _require(model.config, "heads")
    fam, hd = family(model.config), head_dim(model.config)
    return [get_sub(layer, ARCH[fam]["q"]).out_features // hd for layer in layers(model)]


def _require(config, unit: str) -> None:
    try:
        require_units(config, unit)
    except ValueError as err:
        raise RecipeError(f"prune_heads: {err}; use prune_ffn or prune_unstructured") from None


def attach_head_mask(model: nn.Module, mask: UnitMask) -> list:
    """Multiply each layer's per-head attention output by mask()[layer]; returns hook handles.

    Call `handle.remove()` on each (or `detach_hooks`) before physical removal.
    """
    fam, hd = family(model.config), head_dim(model.config)
    mods = layers(model)
    counts = head_counts(model)
    if mask.scores.shape[0] != len(mods) or any(c != mask.scores.shape[1] for c in counts):
        raise RecipeError(
            f"head mask is {tuple(mask.scores.shape)} but the model has {len(mods)} layers with heads {counts}; "
            "build the mask with new_head_mask(model, keep) on the model being trained"
        )
    handles = []
    for i, layer in enumerate(mods):
        def hook(module, args, i=i):
            x = args[0]
            m = mask()[i].to(x.dtype).repeat_interleave(hd)
            return (x * m,) + tuple(args[1:])

        hook.unit_mask = "prune_heads"  # core finalize refuses a model that still carries one
        hook.unit_kept = getattr(mask, "kept", None)  # what a measuring copy keeps (hf.finalize.finalize_copy_with_units)
        handles.append(get_sub(layer, ARCH[fam]["o"]).register_forward_pre_hook(hook))
    return handles


def new_head_mask(model: nn.Module, keep: int, *, per_layer: bool = False, min_per_layer: int = 1,
                  init: torch.Tensor | float = 3.0) -> UnitMask:
    """A UnitMask sized for the model's (unpruned, uniform) heads."""
    counts = head_counts(model)
    if len(set(counts)) != 1:
        raise RecipeError(f"head masks need the same head count in every layer, got {counts}; mask before pruning")
    return UnitMask(len(counts), counts[0], keep, per_layer=per_layer, min_per_layer=min_per_layer,
                    init=init, name="heads")


def head_importance(model: nn.Module, batch_iter, n_batches: int = 16) -> torch.Tensor:
    """|d loss / d head-gate| summed over batches (Michel et al., 2019), shape [layers, heads].

    A cheap, principled initialisation for learned head scores (and a one-shot pruning
    criterion on its own). The batches must carry labels so the model returns a loss.
    """
    counts = head_counts(model)
    return gate_importance(model, attach_head_mask, len(counts), counts[0], batch_iter, n_batches)


def importance_scores(model: nn.Module, batch_iter, n_batches: int = 16) -> torch.Tensor:
    """head_importance normalised into initial mask scores."""
    return normalise_importance(head_importance(model, batch_iter, n_batches))


def prune_heads(model: nn.Module, keep: list[list[int]]) -> nn.Module:
    """Physically keep only heads keep[layer] in each layer (shapes change); returns model.

    Records per-layer counts in config.heads_per_layer and switches the model to the
    registered pruned class so save_pretrained/from_pretrained round-trip.
    """
    fam, hd = family(model.config), head_dim(model.config)
    for layer, heads in zip(layers(model), checked_keep(keep, head_counts(model), "heads")):
        if heads is not None:
            keep_heads(layer, fam, heads, hd)
    mark_pruned(model, heads_per_layer=head_counts(model))
    return model

"""Gradient accumulation in the built-in loop: one batch of `training.batch_size` samples forwarded
in `training.micro_batches` parts, each part's loss terms scaled by its share of the samples, the
gradients summed, one optimizer step. The session treats the parts as one batch: the coordinator
resolves their summed per-term gradients once (coordination.py, `settle`) and the Fisher estimate
folds their summed gradient with all their samples, so only memory changes, not the update (up to
layers whose forward depends on the batch, such as BatchNorm's batch statistics).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import RecipeError


def _samples(batch: Any) -> int | None:
    """The batch's sample count: the first dimension of its first tensor."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)


def _part(batch: Any, index: torch.Tensor) -> Any:
    """The samples `index` of every tensor in the batch (a tuple, a list, a dict or another mapping such as
    transformers' BatchEncoding, which becomes a dict); anything else is kept as it is."""
    take = lambda v: v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # noqa: E731
    if isinstance(batch, Mapping):
        rows = {k: take(v) for k, v in batch.items()}
        return type(batch)(rows) if isinstance(batch, dict) else rows
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(v) for v in batch)
    return take(batch)


def micro_batches(batch: Any, parts: int) -> list[tuple[Any, float]]:
    """(part, its share of the batch's samples) for each of up to `parts` parts whose sizes differ by at
    most one; a batch of fewer samples than parts gives one part per sample."""
    n = _samples(batch)
    if parts <= 1 or n is None or n <= 1:
        return [(batch, 1.0)]
    return [(_part(batch, index), len(index) / n) for index in torch.arange(n).tensor_split(min(parts, n))]


def check_parts(model: torch.nn.Module, training, world_size: int = 1) -> None:
    """Refuse micro-batches of one sample where the model has BatchNorm, which cannot train on one
    (torch's error came from inside the first forward, naming neither the setting nor the fix)."""
    per_part = training.batch_size // world_size // training.micro_batches
    if training.micro_batches == 1 or per_part >= 2:
        return
    norm = next((name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)), None)
    if norm is not None:
        raise RecipeError(
            f"training.micro_batches: {training.micro_batches} parts of a batch of {training.batch_size // world_size} "
            f"samples{' per rank' if world_size > 1 else ''} leave at most one sample a part, and BatchNorm ({norm}) "
            "cannot train on one; use at most half as many micro_batches as samples, or a larger training.batch_size")

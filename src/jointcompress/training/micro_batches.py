"""Gradient accumulation in the built-in loop: one batch of `training.batch_size` samples forwarded
in `training.micro_batches` parts, each part's loss terms scaled by its share of the batch (of the labels
the loss averages over, else of the samples), the
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


class Share(float):
    """A part's share of its batch: the value is the task term's (of the labels the loss counts), `of(term)` each
    term's: the distillation's is of the positions it averages over (distilled_positions), which for a causal LM
    are one more per row than its shifted labels; every other term takes the task's (the shares sum to 1)."""

    def __new__(cls, task: float, distill: float | None = None):
        share = super().__new__(cls, task)
        share.distill = float(task) if distill is None else distill
        return share

    def of(self, term: str) -> float:
        return self.distill if term == "distill" else float(self)


def micro_batches(batch: Any, parts: int, model: torch.nn.Module | None = None) -> list[tuple[Any, Share]]:
    """(part, its share of the batch) for each of up to `parts` parts whose sizes differ by at most one; a
    batch of fewer samples than parts gives one part per sample. The share is of the labels the loss counts
    (integer labels other than -100; for a causal LM computing its own loss on a dict batch, those after each
    row's first position, as it shifts them) where the batch has such labels, else of its samples: a loss that
    averages over real tokens gave a part of short rows the weight of a part of long ones, and two parts took
    another update than one batch. A token-level distillation gets its own share (Share.of)."""
    n = _samples(batch)
    if parts <= 1 or n is None or n <= 1:
        return [(batch, Share(1.0))]
    indices = torch.arange(n).tensor_split(min(parts, n))
    task = _shares(counted_labels(batch, isinstance(batch, Mapping) and loss_shifts_labels(model)), indices, n)
    distill = _shares(distilled_positions(batch, model), indices, n)
    return [(_part(batch, index), Share(t, d)) for index, t, d in zip(indices, task, distill)]


def _shares(counts: torch.Tensor | None, indices: tuple[torch.Tensor, ...], n: int) -> list[float]:
    """Each part's share of `counts` (per sample), or of the samples where there are none to count."""
    total = float(counts.sum()) if counts is not None else 0.0
    if total > 0:
        return [float(counts[index].sum()) / total for index in indices]
    return [len(index) / n for index in indices]


def loss_shifts_labels(model: torch.nn.Module | None) -> bool:
    """Whether the model's own loss shifts its labels (a transformers causal LM: position i predicts label i + 1,
    so each row's first label is never counted); an encoder-decoder's labels are aligned with its outputs.
    transformers leaves loss_type unset on some causal LMs (GPT-2's LM head): their class names say it."""
    from ..session.outputs import is_encoder_decoder

    if model is None or is_encoder_decoder(model):
        return False
    return getattr(model, "loss_type", None) == "ForCausalLM" or type(model).__name__.endswith(
        ("ForCausalLM", "LMHeadModel"))


def distilled_positions(batch: Any, model: torch.nn.Module | None = None) -> torch.Tensor | None:
    """Per sample, how many positions a token-level distillation averages over (distill_kd's token mask: a dict
    batch's attention_mask, an encoder-decoder's decoder positions, a tuple batch's labelled ones); None where
    the labels are one per sample, whose distillation averages over samples."""
    from ..session.outputs import decoder_token_mask, is_encoder_decoder, split_batch

    b = split_batch(batch, warn=False)  # not through catch_warnings: its filter change resets every once-per-place memory
    labels = b.targets
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() < 2:
        return None
    mask = decoder_token_mask(b) if model is not None and is_encoder_decoder(model) else b.token_mask
    return None if mask is None else mask.reshape(mask.shape[0], -1).sum(1)


def counted_labels(batch: Any, shifted: bool) -> torch.Tensor | None:
    """Per sample, how many of its labels a cross-entropy with ignore_index -100 averages over; None where the
    batch has no integer labels (a regression, a loss of the user's)."""
    from ..session.outputs import split_batch

    labels = split_batch(batch).targets
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() == 0:
        return None
    if shifted and labels.dim() >= 2:
        labels = labels[:, 1:]
    return labels.ne(-100).reshape(labels.shape[0], -1).sum(1)


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

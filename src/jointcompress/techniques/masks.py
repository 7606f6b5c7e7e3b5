"""Learnable masks, applied as `torch.nn.utils.parametrize` parametrizations.

A boolean mask cannot learn, so masks here come from real-valued scores: while a technique's
window is open the mask is a sigmoid of (score - threshold) / temperature, whose threshold
sits exactly between the k-th and (k+1)-th score so that its 0.5 level keeps exactly k
entries; as the temperature anneals the sigmoid sharpens, and when the window closes the
mask becomes the exact top-k (binary) with a straight-through gradient to the scores.

Parametrization keeps things inspectable and reversible, like torch.nn.utils.prune:
`layer.parametrizations.weight.original` holds the dense weight, `layer.weight` is the
masked (and, if quantized, fake-quantized) one, and `finalize` removes the reparametrization.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ScoredMask(nn.Module):
    """Scores -> mask: soft (sigmoid at a temperature) while ramping, exactly binary after."""

    def __init__(self, scores: torch.Tensor, learned: bool):
        super().__init__()
        self.learned = learned
        if learned:
            self.scores = nn.Parameter(scores.clone())
        else:
            self.register_buffer("scores", scores.clone())
        self.register_buffer("hard", torch.ones_like(scores))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("temperature", torch.zeros(()))  # 0 means: binary
        # sharpness of the straight-through gradient once binary; set with the mask, not per forward
        self.register_buffer("ste_temperature", torch.ones(()))

    def soft(self, temperature: float | None = None) -> torch.Tensor:
        t = float(self.temperature) if temperature is None else temperature
        return torch.sigmoid((self.scores - self.threshold) / max(t, 1e-12))

    def mask(self) -> torch.Tensor:
        if self.learned and float(self.temperature) > 0:
            return self.soft()
        if self.learned and self.training:
            # straight-through: forward is exactly binary, the gradient reaches the scores
            s = self.soft(temperature=float(self.ste_temperature))
            return self.hard + s - s.detach()
        return self.hard

    def set_keep(self, keep: torch.Tensor, temperature: float) -> None:
        """Fix the binary mask (exact count) and place the soft threshold between kept and dropped."""
        with torch.no_grad():
            self.hard.copy_(keep.to(self.hard.dtype))
            s = self.scores.detach()
            lo = s[~keep].max() if (~keep).any() else s.min() - 1
            hi = s[keep].min() if keep.any() else s.max() + 1
            self.threshold.fill_(float((lo + hi) / 2))
            self.temperature.fill_(temperature)
            self.ste_temperature.fill_(1e-2 * max(float(s.std()) if s.numel() > 1 else 0.0, 1e-6))

    def sparsity(self) -> float:
        return 1.0 - float(self.hard.mean())


class ApplyMask(nn.Module):
    """Parametrization: weight * mask, the mask broadcast along `dim` when it is per channel.

    `source` is held without registering it as a submodule, so one ScoredMask can drive
    several tensors (a conv's weight, its bias and the following BatchNorm) of one group.
    """

    def __init__(self, source: ScoredMask, dim: int | None = None, idxs=None, root_idxs=None):
        super().__init__()
        object.__setattr__(self, "source", source)
        self.dim = dim
        self.register_buffer("idxs", torch.as_tensor(idxs if idxs is not None else [], dtype=torch.long))
        self.register_buffer("root_idxs", torch.as_tensor(root_idxs if root_idxs is not None else [], dtype=torch.long))
        self.last_mask: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.source.mask()
        if self.dim is not None:
            full = torch.ones(w.shape[self.dim], dtype=m.dtype, device=m.device)
            full = full.index_put((self.idxs,), m[self.root_idxs])
            shape = [1] * w.dim()
            shape[self.dim] = -1
            m = full.view(shape)
        self.last_mask = m
        return w * m


def _apply_masks(model: nn.Module):
    for m in model.modules():
        for plist in (getattr(m, "parametrizations", None) or {}).values():
            yield from (p for p in plist if isinstance(p, ApplyMask))


def has_channel_masks(model: nn.Module) -> bool:
    """Whether prune_structured masks channels of `model` (finalize will remove them, and the bytes
    that hang on them: their BatchNorm, biases, step sizes)."""
    return any(p.dim is not None for p in _apply_masks(model))


def harden_masks(model: nn.Module) -> None:
    """Every scored mask of `model` exactly binary (its current keep), as at the end of its ramp: a
    copy measured mid-ramp (the size budget's file) is finalized as the masks decide now; soft values
    would make finalize's removed channels differ from the masked model."""
    for p in _apply_masks(model):
        p.source.temperature.fill_(0.0)


def topk_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean tensor with exactly `keep` True entries at the largest scores (ties broken by index)."""
    flat = scores.detach().flatten()
    keep = max(0, min(keep, flat.numel()))
    out = torch.zeros_like(flat, dtype=torch.bool)
    if keep:
        out[torch.topk(flat, keep, sorted=False).indices] = True
    return out.view_as(scores)


def allocate(scores: list[torch.Tensor], sparsity: float, scope: str, min_keep: float) -> list[torch.Tensor]:
    """Exact top-k keep masks for a list of score tensors.

    `layer` scope: every tensor reaches `sparsity` itself (rounded to whole entries).
    `global` scope: one budget over all tensors, each keeping at least `min_keep` of its
    entries; the total number kept is exact.
    """
    if scope == "layer":
        return [topk_keep(s, round(s.numel() * (1 - sparsity))) for s in scores]
    sizes = [s.numel() for s in scores]
    total_keep = round(sum(sizes) * (1 - sparsity))
    floors = [min(n, max(1, round(n * min_keep))) if min_keep > 0 else 0 for n in sizes]
    total_keep = max(total_keep, sum(floors))
    forced = [topk_keep(s, f) for s, f in zip(scores, floors)]
    rest = torch.cat([s.detach().flatten().masked_fill(f.flatten(), float("-inf")) for s, f in zip(scores, forced)])
    chosen = topk_keep(rest, total_keep - sum(floors))
    out, offset = [], 0
    for s, f, n in zip(scores, forced, sizes):
        out.append(f | chosen[offset : offset + n].view_as(s))
        offset += n
    return out

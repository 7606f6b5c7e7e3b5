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

from ..model_copy import CopiedWithoutGraph


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


class ApplyMask(CopiedWithoutGraph, nn.Module):
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


def has_soft_masks(model: nn.Module) -> bool:
    """Whether a learned mask of `model` is still soft (its ramp open): outputs then scale the channels it drops."""
    return any(p.source.learned and float(p.source.temperature) > 0 for p in _apply_masks(model))


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


def layer_floor(n: int, min_keep: float) -> int:
    """The fewest of its `n` entries a tensor keeps in `layer` scope: `min_keep` of them, rounded as
    the global scope's floor is, and always at least one (a layer or channel group is never emptied:
    an empty one passes only its bias on, and an empty channel group cannot be removed by finalize)."""
    return min(n, max(1, round(n * min_keep)))


def layer_keep_count(n: int, sparsity: float, min_keep: float) -> int:
    """How many of its `n` entries a tensor keeps in `layer` scope at `sparsity`: round(n * (1 - sparsity)),
    raised to layer_floor where the rounding falls under it (the tensor then ends less sparse than asked)."""
    return max(round(n * (1 - sparsity)), layer_floor(n, min_keep))


def floored_layers(sizes: dict[str, int], sparsity: dict[str, float], min_keep: float) -> dict[str, tuple[int, int]]:
    """The tensors (name -> entries, name -> its sparsity) whose `layer`-scope keep the floor raises:
    name -> (kept by the rounding alone, kept with the floor)."""
    out = {}
    for name, n in sizes.items():
        asked, kept = round(n * (1 - sparsity[name])), layer_keep_count(n, sparsity[name], min_keep)
        if kept > asked:
            out[name] = (asked, kept)
    return out


def floor_warning(kind: str, unit: str, where: str, knob: str, min_keep: float, sizes: dict[str, int],
                  floored: dict[str, tuple[int, int]]) -> str:
    """The warning a pruning technique gives once, when it is attached, if layer_floor raises the keep of
    some of its tensors (`unit`: what they keep, plural; `where`: what they are, plural)."""
    shown = ", ".join(f"'{name}' keeps {kept} of its {sizes[name]} {unit} (the sparsity alone: {asked})"
                      for name, (asked, kept) in list(floored.items())[:6])
    more = f", ... ({len(floored)} in all)" if len(floored) > 6 else ""
    floor = f"max(1, {kind}.min_keep = {min_keep:g} of its {unit})" if min_keep > 0 else f"one of its {unit}"
    lower = f"lower {kind}.min_keep to prune them further (one always stays), or " if min_keep > 0 else ""
    return (f"{kind}: {knob} with scope: layer would leave {len(floored)} of the {where} fewer {unit} than "
            f"{floor}; each keeps that floor instead and ends less sparse than asked: {shown}{more}. Nothing to "
            f"do if that is fine; else {lower}leave them out with {kind}.exclude: [...]")


def allocate(scores: list[torch.Tensor], sparsity: float, scope: str, min_keep: float) -> list[torch.Tensor]:
    """Exact top-k keep masks for a list of score tensors.

    `layer` scope: every tensor reaches `sparsity` itself (rounded to whole entries), but keeps at least
    layer_floor of its entries (`min_keep` of them, and always one): where the rounding falls under that
    floor the tensor keeps the floor and ends less sparse than asked; elsewhere the count is the rounding's.
    `global` scope: one budget over all tensors, each keeping at least `min_keep` of its
    entries; the total number kept is exact.
    """
    if scope == "layer":
        return [topk_keep(s, layer_keep_count(s.numel(), sparsity, min_keep)) for s in scores]
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

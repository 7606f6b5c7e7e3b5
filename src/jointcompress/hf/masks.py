"""Learned unit scores turned into a soft mask, then an exactly-k binary mask.

Why one class for heads and FFN neurons: both are "keep k of L x N units" problems. The
soft phase (sigmoid(scores / T), with T annealed down) lets the task and distillation
losses move every score smoothly; the hard phase is an exact top-k 0/1 mask, so what is
trained at the end is exactly the network that physical removal will produce. A
straight-through estimator keeps gradients flowing to the scores in the hard phase.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from jointcompress.errors import RecipeError
from jointcompress.model_call import call_model, model_device


class UnitMask(nn.Module):
    """Scores for `units` units in each of `layers` layers, keeping `keep` units in total.

    keep: how many units survive, over all layers (global top-k) or per layer
    (per_layer=True, then keep is per layer). min_per_layer units always survive in each
    layer, because a layer with zero heads or zero FFN neurons cannot be represented by
    the HF modules (remove the whole layer with layers.drop_layers instead).
    """

    def __init__(self, layers: int, units: int, keep: int, *, per_layer: bool = False,
                 min_per_layer: int = 1, init: torch.Tensor | float = 3.0, name: str = "mask"):
        super().__init__()
        limit = units if per_layer else layers * units
        if not (1 <= keep <= limit):
            raise RecipeError(f"{name}: keep={keep} must be in [1, {limit}]; lower or raise the kept count")
        if not per_layer and keep < min_per_layer * layers:
            raise RecipeError(
                f"{name}: keep={keep} is fewer than min_per_layer ({min_per_layer}) x layers ({layers}); "
                "raise keep, or drop whole layers with drop_layers instead"
            )
        scores = init.clone().float() if torch.is_tensor(init) else torch.full((layers, units), float(init))
        if scores.shape != (layers, units):
            raise RecipeError(f"{name}: init scores have shape {tuple(scores.shape)}, expected ({layers}, {units})")
        self.scores = nn.Parameter(scores)
        self.keep, self.per_layer, self.min_per_layer, self.name = keep, per_layer, min_per_layer, name
        self.temperature = 1.0
        self.hard = False
        self.straight_through = True
        self.centered = True

    @torch.no_grad()
    def threshold(self) -> torch.Tensor:
        """Midpoint between the k-th and (k+1)-th largest score (per layer if per_layer)."""
        s = self.scores.detach()
        if self.per_layer:
            top = s.topk(min(self.keep + 1, s.shape[1]), dim=1).values
            lo = top[:, -1:] if self.keep < s.shape[1] else top[:, -1:] - 1.0
            return (top[:, self.keep - 1:self.keep] + lo) / 2
        flat = s.flatten()
        top = flat.topk(min(self.keep + 1, flat.numel())).values
        lo = top[-1] if self.keep < flat.numel() else top[-1] - 1.0
        return (top[self.keep - 1] + lo) / 2

    def soft(self) -> torch.Tensor:
        """sigmoid((scores - threshold) / T) in (0, 1).

        Centred on the top-k threshold (centered=True), the soft mask tends to exactly the
        top-k mask as T -> 0, so the switch to the hard phase is continuous. With
        centered=False it is sigmoid(scores / T) and sparsity_penalty sets the budget.
        """
        shift = self.threshold() if self.centered else 0.0
        return torch.sigmoid((self.scores - shift) / self.temperature)

    @torch.no_grad()
    def topk(self) -> torch.Tensor:
        """Exactly-k 0/1 mask over the scores, honouring min_per_layer (no gradient)."""
        s = self.scores.detach()
        mask = torch.zeros_like(s)
        if self.per_layer:
            mask.scatter_(1, s.topk(self.keep, dim=1).indices, 1.0)
            return mask
        # Guarantee min_per_layer in each layer, then fill the remaining budget globally.
        mask.scatter_(1, s.topk(self.min_per_layer, dim=1).indices, 1.0)
        rest = self.keep - int(mask.sum())
        if rest > 0:
            free = s.masked_fill(mask.bool(), -math.inf).flatten()
            mask.view(-1)[free.topk(rest).indices] = 1.0
        return mask

    def forward(self) -> torch.Tensor:
        """The mask to multiply into the network now: soft, or hard (straight-through)."""
        if not self.hard:
            return self.soft()
        hard = self.topk()
        if self.straight_through and self.scores.requires_grad:
            soft = self.soft()
            return hard + (soft - soft.detach())  # exactly 0/1 forward, sigmoid gradient
        return hard

    def kept(self) -> list[list[int]]:
        """Per layer, the unit indices the exact top-k keeps (what physical removal keeps)."""
        return [row.nonzero().flatten().tolist() for row in self.topk()]

    def sparsity_penalty(self) -> torch.Tensor:
        """(mean soft mask - kept fraction)^2: pulls the soft mask toward the budget."""
        frac = self.keep / (self.scores.shape[1] if self.per_layer else self.scores.numel())
        return (self.soft().mean() - frac) ** 2


def temperature_schedule(step: int, total: int, start: float = 1.0, end: float = 0.05,
                         hard_from: float = 0.7) -> tuple[float, bool]:
    """Geometric temperature decay from start to end over the soft phase, then hard.

    Returns (temperature, hard). The last (1 - hard_from) of training uses the exact
    top-k mask so the final weights adapt to the network that will actually ship.
    """
    soft_steps = max(1, int(hard_from * total))
    if step >= soft_steps:
        return end, True
    frac = step / soft_steps
    return start * (end / start) ** frac, False


def normalise_importance(imp: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    """Turn raw importances into initial scores: z-scored then scaled, so the soft mask
    starts near 1 for important units and lower for unimportant ones."""
    z = (imp - imp.mean()) / (imp.std() + 1e-8)
    return scale + z


def gate_importance(model: nn.Module, attach, n_layers: int, width: int, batch_iter, n_batches: int = 16) -> torch.Tensor:
    """|d loss / d gate| of every unit, summed over batches, shape [n_layers, width].

    `attach(model, gate)` puts an all-ones gate on the units (heads or FFN neurons) and
    returns hook handles; the gradient of the loss with respect to that gate is the
    first-order estimate of what removing each unit costs (Michel et al., 2019).
    """
    gate = UnitMask(n_layers, width, 1, per_layer=True)
    gate.scores.requires_grad_(False)
    ones = torch.ones(n_layers, width, requires_grad=True, device=model_device(model))
    gate.forward = lambda: ones  # type: ignore[method-assign]
    handles = attach(model, gate)
    imp = torch.zeros_like(ones)
    was = model.training
    model.eval()
    try:
        for j, batch in enumerate(batch_iter):
            if j >= n_batches:
                break
            (g,) = torch.autograd.grad(call_model(model, batch).loss, ones)  # the batch goes to the model's device
            imp += g.abs()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return imp


def checked_keep(keep: list[list[int]], counts: list[int], unit: str) -> list[torch.Tensor | None]:
    """Validate a per-layer list of units to keep (heads, FFN neurons) against the model's
    per-layer counts: one sorted index tensor per layer, or None where the layer keeps all.

    Why: physical pruning indexes weight rows with these lists; a bad index must be a clear
    RecipeError naming the layer, not an IndexError from inside a Linear."""
    if len(keep) != len(counts):
        raise RecipeError(f"keep lists {unit} for {len(keep)} layers but the model has {len(counts)}")
    chosen: list[torch.Tensor | None] = []
    for i, (units, count) in enumerate(zip(keep, counts)):
        if not units:
            raise RecipeError(f"layer {i}: cannot keep 0 {unit}; keep at least one or drop the layer")
        if max(units) >= count or min(units) < 0:
            raise RecipeError(f"layer {i}: {unit} indices {units} out of range 0..{count - 1}")
        chosen.append(None if len(units) == count else torch.tensor(sorted(set(units))))
    return chosen

"""The second-order cost of pruning a weight, for the dead zones of a size-budgeted run.

Why: the task reaches a dead zone through the sigmoid surrogate of its gate, which is the
*first-order* change of the loss when the weight at the edge is removed, g * w. Near a
trained optimum g averages to about zero, so every removal looks free to the task and the
size term decides alone: each dead zone widens at the rate its optimizer allows, and a layer
with many small weights (LeNet-300-100's fc1, 784 inputs per unit) is stripped far below what
it needs. Optimal Brain Damage adds the curvature term: removing w costs about
1/2 * F * w^2, F the diagonal of the Fisher information. F is estimated from the weights'
gradients: the mean of squared minibatch gradients is F / B (plus the squared mean), so
F ~= B * EMA(g^2). The cost of the weights a dead zone prunes, through the same sigmoid
surrogate the size estimate uses, is added to the dead zones' gradient before the optimizer
step: the size term's price per kept weight is now weighed against what that weight is worth
to the loss, layer by layer (FITCompress and OBC rank their moves the same way).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .zero_level import GATE_TEMPERATURE, ZeroLevelLSQWeight

EMA_DECAY = 0.98  # the Fisher estimate averages the last ~50 steps' squared gradients


class FisherSaliency:
    """Running Fisher diagonal of each budgeted weight and the dead zones' curvature gradient."""

    def __init__(self, weight: float):
        self.weight = weight
        self.fisher: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}  # this step's gradient w.r.t. each quantized weight

    def watch(self, layers: dict[str, tuple[nn.Module, ZeroLevelLSQWeight]]) -> None:
        """Catch this step's gradient of the loss w.r.t. each quantized weight (after the forward).

        The hook sits on the quantizer's output, which only the task and distillation reach;
        the weights' own .grad also holds the size term's pull, which would count as importance.
        """
        self.pending = {}
        for name, (_, q) in layers.items():
            out = q.last_out
            if out is None or not out.requires_grad:
                continue
            out.register_hook(lambda g, name=name: self._collect(name, g))

    def _collect(self, name: str, grad: torch.Tensor | None) -> None:
        # a measured step runs one backward per term: their parts add up to the step's gradient.
        # The size term reaches the quantizer node only through its kept-weight count, so its
        # backward brings no gradient for the weights (None): nothing to add.
        if grad is None:
            return
        old = self.pending.get(name)
        self.pending[name] = grad.detach().clone() if old is None else old + grad.detach()

    @torch.no_grad()
    def accumulate(self, batch_size: int) -> None:
        """Fold this step's gradients into the Fisher estimate (B * EMA of g^2)."""
        for name, g in self.pending.items():
            sq = g.pow(2) * float(batch_size)
            old = self.fisher.get(name)
            self.fisher[name] = sq if old is None else old.mul_(EMA_DECAY).add_(sq, alpha=1 - EMA_DECAY)
        self.pending = {}

    @torch.no_grad()
    def cost(self, name: str, q: ZeroLevelLSQWeight, w: torch.Tensor) -> torch.Tensor | None:
        """1/2 * F * (q s)^2 per weight: what removing its quantized value costs the loss."""
        fisher = self.fisher.get(name)
        if fisher is None:
            return None
        s = q.effective_step().detach()
        level = torch.clamp(torch.round((w.detach() / s).abs()), min=1, max=q.qmax)
        return 0.5 * self.weight * fisher * (level * s).pow(2)

    def add_gradient(self, layers: dict[str, tuple[nn.Module, ZeroLevelLSQWeight]]) -> None:
        """d/d(dead zone) of sum 1/2 * F * (q s)^2 * P(pruned), added to the dead zones' .grad."""
        for name, (m, q) in layers.items():
            fisher = self.fisher.get(name)
            if fisher is None or bool(q.pattern_fixed) or not q.dead_zone_raw.requires_grad:
                continue
            with torch.no_grad():
                w = m.parametrizations.weight.original.detach()
                s = q.effective_step().detach()
                v = (w / s).abs()
                kept_value = torch.clamp(torch.round(v), min=1, max=q.qmax) * s  # the value pruning removes
                cost = 0.5 * self.weight * fisher * kept_value.pow(2)
            with torch.enable_grad():
                pruned = 1 - torch.sigmoid((v - q.dead_zone()) / GATE_TEMPERATURE)
                grad, = torch.autograd.grad((cost * pruned).sum(), q.dead_zone_raw)
            q.dead_zone_raw.grad = grad if q.dead_zone_raw.grad is None else q.dead_zone_raw.grad + grad

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"fisher.{k}": v.clone() for k, v in self.fisher.items()}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = {k.removeprefix("fisher."): v.clone() for k, v in state.items() if k.startswith("fisher.")}

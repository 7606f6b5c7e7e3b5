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

The Fisher estimate is the quantizer's own (zero_level.ZeroLevelLSQWeight.fisher, buffers of
the model): the learned width prices its rounding noise with the same one, so a run with both
catches and folds each step's gradient once, and checkpoints carry it with the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import zero_level_compiled as compiled
from .zero_level import ZeroLevelLSQWeight

Layers = dict[str, tuple[nn.Module, ZeroLevelLSQWeight]]


def _estimate(q: ZeroLevelLSQWeight) -> torch.Tensor | None:
    """The quantizer's Fisher diagonal, or None before it holds one (or any buffer for it)."""
    return q.fisher.estimate() if "width_fisher" in q._buffers else None


class FisherSaliency:
    """The dead zones' curvature gradient, from the Fisher diagonal each budgeted quantizer holds."""

    def __init__(self, weight: float):
        self.weight = weight
        self.layers: Layers = {}

    def attach(self, layers: Layers) -> None:
        """Have every quantizer keep its Fisher estimate (also where the width is fixed)."""
        self.layers = dict(layers)
        for _, q in self.layers.values():
            q.track_fisher()
            q.fisher_for_saliency = True

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        """name -> the Fisher diagonal of each layer that has one yet (B * EMA of g^2)."""
        return {name: f for name, (_, q) in self.layers.items() if (f := q.fisher.estimate()) is not None}

    @torch.no_grad()
    def accumulate(self, batch_size: int) -> None:
        """Fold this step's gradients into the Fisher estimate (B * EMA of g^2; a layer whose
        learned width folded it already this step is left as it is)."""
        for _, q in self.layers.values():
            q.fisher.fold(batch_size)

    @torch.no_grad()
    def cost(self, q: ZeroLevelLSQWeight, w: torch.Tensor) -> torch.Tensor | None:
        """1/2 * F * (q s)^2 per weight: what removing its quantized value costs the loss (None
        before the quantizer has a Fisher estimate)."""
        fisher = _estimate(q)
        if fisher is None:
            return None
        s = q.effective_step().detach()
        return compiled.obd_cost((w.detach() / s).abs(), s, compiled.constant((float(q.qmax),), s), fisher,
                                 compiled.constant((0.5 * self.weight,), s))

    def add_gradient(self, layers: Layers) -> None:
        """d/d(dead zone) of sum 1/2 * F * (q s)^2 * P(pruned), added to the dead zones' .grad.

        In closed form (zero_level_compiled.saliency_dead_zone_grad), one compiled pass over the
        weights where the quantizer runs compiled, else the same formula eagerly: building and
        running an autograd graph for it cost as much as the training step's own backward on
        small layers (benchmarks/step_cost.py)."""
        for m, q in layers.values():
            if bool(q.pattern_fixed) or not q.dead_zone_raw.requires_grad:
                continue
            fisher = _estimate(q)
            if fisher is None:
                continue
            grad = self._dead_zone_grad(q, m.parametrizations.weight.original, fisher)
            q.dead_zone_raw.grad = grad if q.dead_zone_raw.grad is None else q.dead_zone_raw.grad + grad

    @torch.no_grad()
    def _dead_zone_grad(self, q: ZeroLevelLSQWeight, w: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
        # the step and dead zone of this step's forward when it ran on w as it is (the same values)
        current = q.last_step is not None and q.last_dead_zone is not None and q._current(w)
        s = q.last_step if current else q.effective_step().detach()
        t = q.last_dead_zone if current else q.dead_zone().detach()
        args = (w.detach(), s, t, compiled.constant((float(q.qmax),), s), fisher, q.dead_zone_raw.detach(),
                compiled.constant((0.5 * self.weight,), s))
        grad = compiled.run(3, *args) if getattr(q, "compiled", False) else None
        return grad if grad is not None else compiled.saliency_dead_zone_grad(*args)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing of its own: the estimate is in the quantizers' buffers (the model's state)."""
        return {}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """A state saved when the saliency kept its own estimate ("fisher.<layer>" entries) loads
        into the quantizers' buffers; entries of layers this budget does not hold are dropped."""
        for key, value in state.items():
            name = key.removeprefix("fisher.")
            if key.startswith("fisher.") and name in self.layers:
                q = self.layers[name][1]
                q.track_fisher()
                q.width_fisher.copy_(value)
                q.width_fisher_seen.fill_(True)

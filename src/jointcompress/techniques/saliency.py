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

import math

import torch
import torch.nn as nn

from . import zero_level_compiled as compiled
from .zero_level import ZeroLevelLSQWeight
from .zero_level_kernel import per_channel_sum

Layers = dict[str, tuple[nn.Module, ZeroLevelLSQWeight]]


def _estimate(q: ZeroLevelLSQWeight) -> torch.Tensor | None:
    """The quantizer's Fisher diagonal, or None before it holds one (or any buffer for it)."""
    return q.fisher.estimate() if "width_fisher" in q._buffers else None


class FisherSaliency:
    """The dead zones' curvature gradient, from the Fisher diagonal each budgeted quantizer holds."""

    def __init__(self, weight: float, mode: str = "price"):
        self.weight = weight
        self.mode = mode  # recipe.SizeBudgetConfig.saliency_mode
        self.layers: Layers = {}
        self.last_neutralized = 0.0  # rank: the share of the gradient's norm the last step removed

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
    def accumulate(self, batch_size: int, loss_scale: float | None = None) -> None:
        """Fold this step's gradients into the Fisher estimate (B * EMA of g^2; a layer whose
        learned width folded it already this step is left as it is). `batch_size`: the last
        micro-batch's samples; with gradient accumulation g is the micro-batches' summed gradient
        and B all their samples (learned_width.FisherDiagonal)."""
        for _, q in self.layers.values():
            q.fisher.fold(batch_size, loss_scale=loss_scale)

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

    def add_gradient(self, layers: Layers, bytes_per_weight: dict[str, float] | None = None) -> None:
        """d/d(dead zone) of sum 1/2 * F * (q s)^2 * P(pruned), added to the dead zones' .grad.

        In closed form (zero_level_compiled.saliency_dead_zone_grad), one compiled pass over the
        weights where the quantizer runs compiled, else the same formula eagerly: building and
        running an autograd graph for it cost as much as the training step's own backward on
        small layers (benchmarks/step_cost.py). With `bytes_per_weight` (saliency_mode: rank) the
        gradient is first made size-neutral (`_size_neutral`)."""
        grads = {}
        for name, (m, q) in layers.items():
            if bool(q.pattern_fixed) or not q.dead_zone_raw.requires_grad:
                continue
            fisher = _estimate(q)
            if fisher is not None:
                grads[name] = self._dead_zone_grad(q, m.parametrizations.weight.original, fisher)
        if bytes_per_weight is not None and grads:
            grads = self._size_neutral(layers, grads, bytes_per_weight)
        for name, grad in grads.items():
            q = layers[name][1]
            q.dead_zone_raw.grad = grad if q.dead_zone_raw.grad is None else q.dead_zone_raw.grad + grad

    def _size_neutral(self, layers: Layers, grads: dict[str, torch.Tensor],
                      bytes_per_weight: dict[str, float]) -> dict[str, torch.Tensor]:
        """The saliency's gradient without its component along the bytes' gradient on the same dead
        zones (saliency_mode: rank).

        Why: every weight a dead zone prunes has a positive Fisher cost, so the saliency always pulls
        the dead zones toward keeping more; the size term's multiplier must climb until it outbids
        the summed cost, and with few steps (scarce data) it climbed too late: the ViT's Fisher runs
        with 2,000 images ended their decision window 67-73% over the aim and the catch-up cut the
        rest in the last steps before the freeze. Projected, what is left is each weight's cost
        minus one price per byte for all layers: dead zones whose edge weights cost less than that
        price are pushed to prune, the others to keep, at constant bytes to first order; the budget
        alone sets how much is pruned. (Under Adam it is neutral for the gradient, not the update:
        on that ViT it recovered a third of the loss, saliency_mode: landing all of it; docs/joint.md.)"""
        directions = {name: self._bytes_gradient(*layers[name], bytes_per_weight[name]) for name in grads}
        dot = sum(float((grads[n] * directions[n]).sum()) for n in grads)
        norm2 = sum(float(directions[n].pow(2).sum()) for n in grads)
        if dot >= 0 or norm2 <= 0:  # no component against the size term: nothing to remove
            self.last_neutralized = 0.0
            return grads
        alpha = dot / norm2
        out = {n: grads[n] - alpha * directions[n] for n in grads}
        before = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        self.last_neutralized = abs(alpha) * math.sqrt(norm2) / before if before > 0 else 0.0
        return out

    @torch.no_grad()
    def _bytes_gradient(self, m: nn.Module, q: ZeroLevelLSQWeight, bytes_per_weight: float) -> torch.Tensor:
        """d(layer bytes)/d(dead_zone_raw) per channel through the gate's sigmoid surrogate (the one
        the size term's kept-weight count takes): -bytes per weight * sum sigma' / T * softplus'."""
        w = m.parametrizations.weight.original.detach()
        s, t = self._step_and_edge(q, w)
        sig = torch.sigmoid(((w / s).abs() - t) * (1.0 / compiled.GATE_TEMPERATURE))
        count_slope = per_channel_sum(sig * (1 - sig), s) * (-1.0 / compiled.GATE_TEMPERATURE)
        return count_slope * torch.sigmoid(q.dead_zone_raw.detach()) * bytes_per_weight

    @torch.no_grad()
    def _dead_zone_grad(self, q: ZeroLevelLSQWeight, w: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
        s, t = self._step_and_edge(q, w)
        args = (w.detach(), s, t, compiled.constant((float(q.qmax),), s), fisher, q.dead_zone_raw.detach(),
                compiled.constant((0.5 * self.weight,), s))
        grad = compiled.run(3, *args) if getattr(q, "compiled", False) else None
        return grad if grad is not None else compiled.saliency_dead_zone_grad(*args)

    @staticmethod
    def _step_and_edge(q: ZeroLevelLSQWeight, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step and dead zone of this step's forward when it ran on w as it is (the same values)."""
        current = q.last_step is not None and q.last_dead_zone is not None and q._current(w)
        s = q.last_step if current else q.effective_step().detach()
        t = q.last_dead_zone if current else q.dead_zone().detach()
        return s, t

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

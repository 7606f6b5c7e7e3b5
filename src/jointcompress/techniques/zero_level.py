"""Zero as a level of the quantizer: one decision per weight for pruning *and* rounding.

Sequential pipelines decide what to prune on raw magnitudes and then round what is left;
the two decisions never see each other. Here the LSQ quantizer owns both (CoDeQ's dead
zone, Soft Weight-Sharing's zero component): per output channel, a weight is zero when
|w / s| < t, where s is the channel's learned LSQ step and t >= 0.5 a learned dead zone in
units of that step; outside the dead zone it is rounded onto the grid and never to zero
(|q| >= 1). So sparsity and step move together, and a channel's grid is learned for the
weights it keeps. The layer's bit-width is learned too (a relaxed choice in [min_bits,
max_bits], rounded in the forward pass with a straight-through gradient), with the step
rescaled so the grid's range stays put when the width changes.

Gradients: weights pass straight through (pruned ones too, so a weight can grow back out of
the dead zone, as in Dynamic Network Surgery); the step gets LSQ's gradient; the dead zone
gets the task's gradient through a sigmoid surrogate of the gate (how much the loss would
change if the gate opened or closed). The size term (size_budget.py) pulls the other way on
the same parameters, which is the conflict the coordinator sees.

After `fix_pattern()` (the size budget's freeze), the zero pattern and bit-width are fixed:
kept weights stay non-zero, pruned ones stay zero, and only values and steps fine-tune.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifact.precision import round_step
from .quant_lsq import LSQWeight, grad_scale, lsq_init_step

GATE_TEMPERATURE = 0.5  # width of the dead zone's sigmoid surrogate, in steps
DEAD_ZONE_INIT = 0.55  # initial dead zone (0.5 = plain rounding's own zero bin)


def qmax_of(bits: torch.Tensor | float) -> torch.Tensor | float:
    return 2 ** (bits - 1) - 1


class DeadZoneQuant(torch.autograd.Function):
    """out = s * q, q = 0 inside the dead zone |w/s| < t (or where `keep` is False once fixed),
    else sign(w) * clamp(max(round(|w/s|), 1), Q). Backward: see the module docstring."""

    @staticmethod
    def forward(ctx, w, s, t, qmax: int, keep):
        v = w / s
        mag = torch.clamp(torch.round(v.abs()), min=1, max=qmax)
        gate = keep if keep is not None else v.abs() >= t
        q = torch.where(gate, torch.sign(v) * mag, torch.zeros_like(v))
        ctx.save_for_backward(v, q, s, t)
        ctx.qmax, ctx.fixed = qmax, keep is not None
        return q * s

    @staticmethod
    def backward(ctx, grad):
        v, q, s, t = ctx.saved_tensors
        inside = v.abs() <= ctx.qmax
        grad_w = grad * inside
        ds = torch.where(inside, q - v, torch.sign(v) * ctx.qmax)
        dims = tuple(range(1, grad.dim()))
        grad_s = (grad * ds).sum(dim=dims, keepdim=True) if s.numel() > 1 else (grad * ds).sum().view_as(s)
        grad_t = None
        if not ctx.fixed:
            z = (v.abs() - t) / GATE_TEMPERATURE
            sig = torch.sigmoid(z)
            # d out / d t of the surrogate out = s * sign(v) * max(|q|, 1) * sigmoid(z)
            level = torch.sign(v) * torch.clamp(torch.round(v.abs()), min=1, max=ctx.qmax)
            dt = -level * s * sig * (1 - sig) / GATE_TEMPERATURE
            grad_t = (grad * dt).sum(dim=dims, keepdim=True) if t.numel() > 1 else (grad * dt).sum().view_as(t)
        return grad_w, grad_s, grad_t, None, None


class ZeroLevelLSQWeight(LSQWeight):
    """LSQ parametrization with a learned per-channel dead zone and a learned bit-width."""

    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool = True,
                 learn_bits: bool = True, min_bits: int = 2, max_bits: int = 8):
        super().__init__(weight, bits, per_channel)
        self.ref_bits, self.min_bits, self.max_bits = bits, min_bits, max_bits
        shape = self.log_step.shape
        # t = 0.5 + softplus(dead_zone_raw): it starts slowly (softplus' slope is small near 0.5), so
        # early in a run the budget is met mostly by narrower widths and the dead zones open once
        # the multiplier has grown; a linear t opened the largest layer's dead zone first and lost
        # 1-70 points on MNIST (see docs/joint.md)
        self.dead_zone_raw = nn.Parameter(torch.full(shape, math.log(math.expm1(DEAD_ZONE_INIT - 0.5))))
        frac = (bits - min_bits) / max(1, max_bits - min_bits)
        frac = min(max(frac, 0.02), 0.98)
        self.bits_raw = nn.Parameter(torch.tensor(math.log(frac / (1 - frac))), requires_grad=learn_bits)
        self.learn_bits = learn_bits
        self.register_buffer("keep", torch.ones_like(weight, dtype=torch.bool))
        self.register_buffer("pattern_fixed", torch.zeros((), dtype=torch.bool))
        self.last_w: torch.Tensor | None = None

    # -- the learned quantities ------------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.bits_ste().detach().round())

    @bits.setter
    def bits(self, value: int) -> None:  # LSQWeight.__init__ assigns it; the learned width is bits_raw
        self._init_bits = value

    @property
    def qmax(self) -> int:
        return int(qmax_of(self.bits))

    @qmax.setter
    def qmax(self, value) -> None:
        pass

    def bits_continuous(self) -> torch.Tensor:
        return self.min_bits + (self.max_bits - self.min_bits) * torch.sigmoid(self.bits_raw)

    def bits_ste(self) -> torch.Tensor:
        """The integer bit-width in the forward pass, the relaxed one in the backward pass."""
        b = self.bits_continuous()
        return b.detach().round() + (b - b.detach())  # exactly an integer in value

    def step_multiplier(self) -> torch.Tensor:
        """Keeps the grid's range fixed when the width changes: s = s_ref * Q(ref) / Q(bits)."""
        b = self.bits_continuous()
        soft = qmax_of(float(self.ref_bits)) / qmax_of(b)
        hard = qmax_of(float(self.ref_bits)) / qmax_of(b.detach().round())
        return hard + (soft - soft.detach())  # exactly `hard` in value

    def dead_zone(self) -> torch.Tensor:
        return 0.5 + F.softplus(self.dead_zone_raw)

    def stored(self, s: torch.Tensor) -> torch.Tensor:
        """The step exactly as the artifact stores it (step_format), with a straight-through gradient.

        Written as value + (s - s.detach()), which adds an exact 0.0: `s + (rounded - s).detach()`
        can miss the stored value by an ulp, and q * step then falls off the artifact's grid.
        """
        return round_step(s.detach(), self.step_format) + (s - s.detach())

    def effective_step(self) -> torch.Tensor:
        return self.stored(self.log_step.exp() * self.step_multiplier())

    @property
    def step(self) -> torch.Tensor:
        return self.effective_step()

    def scale(self) -> torch.Tensor:
        return self.effective_step().detach().flatten()

    # -- forward ---------------------------------------------------------------------------
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.log_step.copy_(lsq_init_step(w, int(qmax_of(self.ref_bits)), self.per_channel).log())
                self.initialized.fill_(True)
        qmax = self.qmax
        n = w[0].numel() if self.per_channel else w.numel()
        # LSQ's gradient scale on the step; the value is exactly the stored step (effective_step)
        s_grad = grad_scale(self.log_step, 1.0 / math.sqrt(n * qmax)).exp() * self.step_multiplier()
        s = self.effective_step().detach() + (s_grad - s_grad.detach())
        keep = self.keep if bool(self.pattern_fixed) else None
        out = DeadZoneQuant.apply(w, s, self.dead_zone(), qmax, keep)
        self.last_in, self.last_out, self.last_w = w, out, w
        return out

    def soft_nonzero(self, w: torch.Tensor) -> torch.Tensor:
        """Kept weights: the hard count as the value, a sigmoid surrogate as the gradient."""
        if bool(self.pattern_fixed):
            return self.keep.sum().to(w.dtype)
        v = (w / self.effective_step()).abs()
        soft = torch.sigmoid((v - self.dead_zone()) / GATE_TEMPERATURE).sum()
        hard = (v >= self.dead_zone()).sum().to(soft.dtype)
        return soft + (hard - soft).detach()

    @torch.no_grad()
    def hard_keep(self, w: torch.Tensor) -> torch.Tensor:
        if bool(self.pattern_fixed):
            return self.keep.clone()
        return self.edge_distance(w) >= 0

    def edge_distance(self, w: torch.Tensor) -> torch.Tensor:
        """|w| minus the dead zone's edge, in steps (< 0: inside the dead zone)."""
        return (w / self.effective_step()).abs() - self.dead_zone()

    @torch.no_grad()
    def fix_pattern(self, w: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Freeze the zero pattern (and the width): from now on only values and steps train."""
        self.keep.copy_(self.hard_keep(w) if keep is None else keep)
        self.pattern_fixed.fill_(True)
        self.dead_zone_raw.requires_grad_(False)
        self.bits_raw.requires_grad_(False)

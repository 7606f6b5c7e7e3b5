"""Zero as a level of the quantizer: one decision per weight for pruning *and* rounding.

Sequential pipelines decide what to prune on raw magnitudes and then round what is left;
the two decisions never see each other. Here the LSQ quantizer owns both (CoDeQ's dead
zone, Soft Weight-Sharing's zero component): per output channel, a weight is zero when
|w / s| < t, where s is the channel's learned LSQ step and t >= 0.5 a learned dead zone in
units of that step; outside the dead zone it is rounded onto the grid and never to zero
(|q| >= 1). So sparsity and step move together, and a channel's grid is learned for the
weights it keeps. The layer's bit-width is learned too: a relaxed choice in [min_bits,
max_bits] that the size term and a rounding-noise price pull on, held at an integer with
hysteresis; the quantizer sees the held width as a constant, with the step rescaled so the
grid's range stays put (learned_width.py says why and how).

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
from . import learned_width as lw
from .quant_lsq import LSQWeight, lsq_init_step, remember
from .zero_level_kernel import GATE_TEMPERATURE, ZeroLevelQuant, ZeroLevelSetup, qmax_of

DEAD_ZONE_INIT = 0.55  # initial dead zone (0.5 = plain rounding's own zero bin)


class ZeroLevelLSQWeight(LSQWeight):
    """LSQ parametrization with a learned per-channel dead zone and a learned bit-width."""

    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool = True,
                 learn_bits: bool = True, min_bits: int = 2, max_bits: int = 8, nonzero_grid: bool = False):
        self.nonzero_grid = nonzero_grid  # first: the qmax property reads it
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
        self.register_buffer("held_bits", torch.tensor(int(bits)))  # the integer width in use (hysteresis)
        self.width_changes: list[tuple[int, int]] = []  # (from, to) of every move of the held width
        self.register_buffer("keep", torch.ones_like(weight, dtype=torch.bool))
        self.register_buffer("pattern_fixed", torch.zeros((), dtype=torch.bool))
        # the Fisher diagonal (learned_width.FisherDiagonal): the width's noise price and the size
        # budget's saliency read this one estimate; the saliency turns it on for fixed widths too
        self.fisher_for_saliency = False
        if learn_bits:
            self.track_fisher()
        self._register_load_state_dict_pre_hook(_keep_missing_fisher, with_module=True)
        self.last_w: torch.Tensor | None = None
        self.last_count: torch.Tensor | None = None  # kept weights of the last forward (kept_count)
        self.last_gate: torch.Tensor | None = None  # its 0/1 gate, kept while the width is learned (width_step)
        self.last_step: torch.Tensor | None = None  # its stored step (effective_step's value; width_step)
        self.last_dead_zone: torch.Tensor | None = None  # its dead zone (dead_zone()'s value; the saliency)

    # -- the learned quantities ------------------------------------------------------------
    @property
    def bits(self) -> int:
        held = getattr(self, "held_bits", None)  # LSQWeight.__init__ reads it before it exists
        return int(held) if held is not None else self._init_bits

    @bits.setter
    def bits(self, value: int) -> None:  # LSQWeight.__init__ assigns it; the learned width is bits_raw
        self._init_bits = value

    @property
    def qmax(self) -> int:
        return int(qmax_of(self.bits, self.nonzero_grid))

    @qmax.setter
    def qmax(self, value) -> None:
        pass

    def bits_continuous(self) -> torch.Tensor:
        return self.min_bits + (self.max_bits - self.min_bits) * torch.sigmoid(self.bits_raw)

    def bits_ste(self) -> torch.Tensor:
        """The held integer width in value, the relaxed one's gradient (what the size term reads)."""
        b = self.bits_continuous()
        return self.held_bits.to(b.dtype) + (b - b.detach())  # exactly an integer in value

    def step_multiplier(self) -> torch.Tensor:
        """Keeps the grid's range fixed when the width changes: s = s_ref * Q(ref) / Q(held bits).
        A constant for autograd: the width is priced by the size term and by its rounding noise
        (width_step), not through the step (learned_width.py says why)."""
        # the kernel's own expression (a tensor divisor: PyTorch's scalar / tensor is reciprocal * scalar,
        # one ulp from float division, and the stored fp16 step would then miss the kernel's now and then);
        # computed once per held width (keyed by its value: a deep copy's buffer restarts its version)
        key = (int(self.held_bits), float(self.ref_bits), self.log_step.dtype, self.log_step.device)
        cached = self.__dict__.get("_multiplier")
        if cached is None or cached[0] != key:
            nz = self.nonzero_grid
            cached = (key, qmax_of(float(self.ref_bits), nz) / qmax_of(self.held_bits.to(self.log_step.dtype), nz))
            self.__dict__["_multiplier"] = cached
        return cached[1]

    def _kernel_bits_raw(self) -> torch.Tensor:
        """A raw width the fused kernel rounds to the held width, with no gradient."""
        cached = getattr(self, "_raw_arg", None)
        held = int(self.held_bits)
        if cached is None or cached[0] != held or cached[1].device != self.log_step.device:
            raw = lw.raw_of_width(held, self.min_bits, self.max_bits)
            cached = (held, torch.tensor(raw, dtype=self.bits_raw.dtype, device=self.log_step.device))
            self._raw_arg = cached
        return cached[1]

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
                first = lsq_init_step(w, int(qmax_of(self.ref_bits, self.nonzero_grid)), self.per_channel)
                self.log_step.copy_(first.log())
                self.initialized.fill_(True)
        fixed = bool(self.pattern_fixed)
        learns_width = not fixed and self._learns_width(fixed)
        setup = self._setup(w, learns_width)
        keep = self._keep_float() if fixed else None
        # one node: step, width, dead zone, gate, LSQ and the kept-weight count (zero_level_kernel.py);
        # its backward hands the output's gradient to the Fisher estimate
        fisher = self.fisher if not fixed and (learns_width or self.fisher_for_saliency) else None
        stash: dict = {"fisher": fisher}
        out, count, gate = ZeroLevelQuant.apply(w, self.log_step, self._kernel_bits_raw(), self.dead_zone_raw, setup, keep,
                                                stash)
        if fisher is not None:  # the weight's .grad tells a micro-batch of the step from a new step
            grads = w if w.is_leaf and w.requires_grad else self.log_step if self.log_step.requires_grad else None
            fisher.watch(out, grads)
        remember(self, last_in=w, last_out=out, last_w=w, last_count=count, last_gate=gate if learns_width else None,
                 last_step=stash.get("step"), last_dead_zone=stash.get("dead_zone"), _count_key=self._state_key(w))
        return out

    def _setup(self, w: torch.Tensor, learns_width: bool) -> ZeroLevelSetup:
        """The kernel's constants (the same object while nothing they hold changes)."""
        per_step = w.numel() // w.shape[0] if self.per_channel else w.numel()
        compiled = getattr(self, "compiled", False)  # set by QuantLSQ (quant_lsq.compile)
        key = (self.ref_bits, self.min_bits, self.max_bits, per_step, self.step_format, compiled, learns_width,
               self.nonzero_grid)
        cached = self.__dict__.get("_setup_cache")
        if cached is None or cached[0] != key:
            cached = (key, ZeroLevelSetup(float(qmax_of(float(self.ref_bits), self.nonzero_grid)), self.min_bits,
                                          self.max_bits, per_step, self.step_format, compiled,
                                          learns_width,  # width_step reads the gate: the kernel hands it out
                                          self.nonzero_grid))
            self.__dict__["_setup_cache"] = cached
        return cached[1]

    def _state_key(self, w: torch.Tensor) -> tuple:
        """What the kept-weight count depends on: the weight and every learned quantity (their
        version counters move with every in-place update, optimizer steps and loads included)."""
        return (id(w), w._version, self.log_step._version, self.dead_zone_raw._version, self.held_bits._version,
                self.keep._version, self.pattern_fixed._version, self.step_format, torch.is_grad_enabled())

    def _keep_float(self) -> torch.Tensor:
        """The fixed pattern as 0/1 floats, converted once per change of `keep`.

        Keyed by the buffer's identity as well as its version: a deep copy (model_copy.plain_copy,
        which the size budget finalizes to measure the file) carries this cache along with a new
        `keep` whose version counter restarts, so a version alone could match the live model's
        cached one and the copy would apply an old pattern."""
        cached = getattr(self, "_keep_f", None)
        key = (id(self.keep), self.keep._version)
        if cached is None or cached[0] != key or cached[1].dtype != self.log_step.dtype \
                or cached[1].device != self.keep.device:
            cached = (key, self.keep.to(self.log_step.dtype))
            self._keep_f = cached
        return cached[1]

    def forget_forward(self) -> None:
        """After the optimizer step the last forward's count no longer describes the weights. A
        fused optimizer (the session's, on CPU) updates parameters in place without moving their
        version counters, so `_state_key` alone would still call that forward current: a count read
        before the next forward (the size budget's calibration) was then one step stale, and a run
        resumed from a checkpoint, which has no such forward, computed it afresh and drifted."""
        self._count_key = None

    def _current(self, w: torch.Tensor) -> bool:
        """Whether the last forward pass ran on `w` and the learned quantities as they are now."""
        key = getattr(self, "_count_key", None)
        return key is not None and key[:-1] == self._state_key(w)[:-1]

    def kept_count(self, w: torch.Tensor) -> torch.Tensor:
        """soft_nonzero(w), taken from the last forward pass when it ran on `w` as it is now (the
        count of the gate it applied, with the same surrogate gradient): the size term then costs
        no extra pass over the weights. Under autograd only a forward that recorded its graph counts."""
        if self.last_count is not None and self._current(w) and (self._count_key[-1] or not torch.is_grad_enabled()):
            return self.last_count
        return self.soft_nonzero(w)

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

    # -- the learned width (learned_width.py) ---------------------------------------------
    def track_fisher(self) -> None:
        """Hold the Fisher estimate in buffers (`width_fisher`, `width_fisher_seen`: the model's
        state, so checkpoints and resumed runs carry it); the learned width and the size budget's
        saliency (saliency.py) read this one estimate."""
        if "width_fisher" not in self._buffers:
            self.register_buffer("width_fisher", torch.zeros(self.keep.shape, dtype=self.log_step.dtype,
                                                             device=self.keep.device))
            self.register_buffer("width_fisher_seen", torch.zeros((), dtype=torch.bool, device=self.keep.device))
            # its price of the grid's rounding noise (width_step; negative: not computed yet)
            self.register_buffer("width_noise", torch.tensor(-1.0, device=self.keep.device))

    @property
    def fisher(self) -> lw.FisherDiagonal:
        """The Fisher estimate over this quantizer's buffers (made on first use, and again after
        a copy or a load replaced the buffers)."""
        cached = self.__dict__.get("_fisher")
        if cached is None or cached.value is not self.width_fisher or cached.seen is not self.width_fisher_seen:
            cached = lw.FisherDiagonal(self.width_fisher, self.width_fisher_seen)
            self.__dict__["_fisher"] = cached
        return cached

    def learns_width(self) -> bool:
        return self._learns_width(bool(self.pattern_fixed))

    def _learns_width(self, fixed: bool) -> bool:
        return self.learn_bits and self.max_bits > self.min_bits and not fixed and self.bits_raw.requires_grad

    @torch.no_grad()
    def width_step(self, w: torch.Tensor, batch_size: int, price: float = 1.0, step: int | None = None,
                   loss_scale: float | None = None) -> bool:
        """Before the optimizer step: move the held width if the relaxed one has left its
        hysteresis band, then add the rounding noise's price to the relaxed width's gradient
        (the size term's pull is there already, through bits_ste). `step`: the training step,
        which paces the Fisher estimate's folds where only this price reads it (lw.FISHER_EVERY);
        `loss_scale`: the mixed-precision scale the caught gradient carries (FisherDiagonal.fold).
        Returns whether the held width moved (its step was then re-fit)."""
        if not self.learns_width():
            return False
        folded = self.fisher.fold(batch_size, step, 1 if self.fisher_for_saliency else lw.FISHER_EVERY, loss_scale)
        # bits_continuous(), its sigmoid kept for the gradient below: scalar work in Python floats
        # (as 0-d tensors, a dozen operations of a few µs each per layer and step)
        sb = float(torch.sigmoid(self.bits_raw))
        span = self.max_bits - self.min_bits
        relaxed = self.min_bits + span * sb
        held = int(self.held_bits)
        new = lw.next_width(relaxed, held, self.min_bits, self.max_bits)
        if new != held:
            self._change_width(w, new)
        noise = self._rounding_noise(w, refresh=folded or new != held)
        if noise is not None:
            slope = lw.noise_cost_slope(0.5 * price * noise, int(self.held_bits), relaxed, self.min_bits, self.max_bits,
                                        self.nonzero_grid)
            grad = slope * span * sb * (1 - sb)
            self.bits_raw.grad = torch.full_like(self.bits_raw, grad) if self.bits_raw.grad is None else self.bits_raw.grad + grad
        return new != held

    def _rounding_noise(self, w: torch.Tensor, refresh: bool) -> float | None:
        """sum over the kept weights of F * s^2 / 12: the grid's rounding noise, priced by the
        Fisher diagonal F (None before there is an estimate). Computed again when the estimate or
        the width moved, else the value in `width_noise` (a buffer, so a resumed run prices as the
        uninterrupted one did): between folds only the kept set and the step drift, slowly."""
        fisher = self.fisher.estimate()
        if fisher is None:
            return None
        if refresh or float(self.width_noise) < 0:
            # the gate of this step's forward (0/1 floats; a held width that just moved re-derives it)
            current = self._current(w)
            kept = self.last_gate if self.last_gate is not None and current else self.hard_keep(w)
            s = self.last_step if self.last_step is not None and current else self.effective_step().detach()
            self.width_noise.fill_(float((fisher * kept).mul_(s.pow(2) / 12.0).sum()))
        return float(self.width_noise)

    @torch.no_grad()
    def _change_width(self, w: torch.Tensor, new: int) -> None:
        """Move the held width to `new`: re-fit the step to the kept weights at the new width and
        keep the dead zone's edge where it was, so the change moves precision, not sparsity."""
        kept = self.hard_keep(w)
        s_old = self.effective_step().detach()
        edge = self.dead_zone().detach() * s_old
        nz = self.nonzero_grid
        range_keeping = s_old * qmax_of(int(self.held_bits), nz) / qmax_of(new, nz)
        self.width_changes.append((int(self.held_bits), new))
        self.held_bits.fill_(new)
        s_new = lw.refit_step(w, kept, edge, range_keeping, int(qmax_of(new, nz)), self.fisher.estimate())
        self.log_step.copy_((s_new / self.step_multiplier()).log())
        self.dead_zone_raw.copy_(lw.dead_zone_raw_for(edge, self.effective_step().detach()))


def _keep_missing_fisher(module, state_dict, prefix, *args) -> None:
    """A state saved before this quantizer held a Fisher estimate (fixed widths with the size
    budget's saliency, which kept its own copy in the budget's state) loads with the estimate
    as it is now: the budget's state (loaded before or after the model) fills it. One saved
    before the width's noise price was kept loads without it: the next step computes it."""
    for name in ("width_fisher", "width_fisher_seen", "width_noise"):
        if name in module._buffers and prefix + name not in state_dict:
            state_dict[prefix + name] = module._buffers[name].detach().clone()

"""A layer's learned bit-width: a relaxed choice priced in the same units on both sides.

Why not the plain straight-through width (round the relaxed width, rescale the step with it):
measured on LeNet-300-100 at 100x, it chattered. The width reached the step only through the
step multiplier s = s_ref * Q(ref) / Q(bits), so its gradient was the task's LSQ gradient of the
step (does the task want a larger step? -- near zero on average, not "is a finer grid worth it")
plus the size term's pull through the kept-weight count (a coarser grid has a larger step, so a
wider dead zone in absolute terms: this route was ~40x the bytes' own). The width sat on a
rounding boundary (fc1 at 2.50) and flipped every few steps, and each flip moved the step 3x
and the layer's density between 15% and 0.5%, so the multiplier never settled (docs/joint.md).

Here the width is its own decision, separated from the step and the dead zone:
- The quantizer sees the *held* integer width as a constant (no gradient through the step).
- The size term prices it through `bits_ste()` (bytes per kept weight, linear in bits).
- The accuracy side prices it with the expected loss of the grid's rounding noise: a kept
  weight rounded with step s gets noise of variance s^2 / 12, which costs about
  1/2 * F * s^2 / 12 (F the Fisher diagonal, as Optimal Brain Damage / HAWQ price it); with the
  range fixed, s scales as 1 / Q(bits). The relaxed cost interpolates the integer widths'
  costs linearly, so its slope is the segment's on which the relaxed width lies: dropping from
  3 to 2 bits costs 8x the noise of 3 bits, as it does.
- Hysteresis: the held width moves only when the relaxed width is HYSTERESIS past the rounding
  boundary, so it cannot flip back and forth on it.
- A width change moves precision, not sparsity: the step is re-fit to the kept weights at the
  new width (least squares over a grid of candidate steps, Fisher-weighted, as post-training
  calibrators do) and the dead zone is moved so its edge stays where it was (as far as the new
  grid allows: the edge is at least half a step).
"""
from __future__ import annotations

import math

import torch

from .zero_level_kernel import qmax_of

HYSTERESIS = 0.25  # the held width moves when the relaxed one is this far past the rounding boundary
FISHER_DECAY = 0.98  # the Fisher estimate averages the last ~50 steps' squared gradients
# where only the learned width's noise price reads the estimate (a sum over the layer, not per weight),
# a training run folds one step's gradient in this many (the folds were a tenth of a joint step on
# LeNet-300-100); the size budget's saliency weighs each weight by it and folds every step
FISHER_EVERY = 4
MIN_DEAD_ZONE_GAP = 0.02  # a moved dead zone stays this far above 0.5 (softplus keeps a usable slope)
MAX_DEAD_ZONE_GAP = 1e4  # a channel with nothing kept: its dead zone stays finite
STEP_CANDIDATES = torch.exp(torch.linspace(math.log(0.1), math.log(1.6), 48))  # times the range-keeping step


def raw_of_width(width: int, min_bits: int, max_bits: int) -> float:
    """The raw parameter whose relaxed width is exactly `width` (finite at the range's ends)."""
    if max_bits == min_bits:
        return 0.0
    frac = (width - min_bits) / (max_bits - min_bits)
    return max(-30.0, min(30.0, math.log(max(frac, 1e-30)) - math.log(max(1.0 - frac, 1e-30))))


def next_width(relaxed: float, held: int, min_bits: int, max_bits: int) -> int:
    """The held width after hysteresis: it moves to round(relaxed) only once |relaxed - held|
    reaches 0.5 + HYSTERESIS."""
    if abs(relaxed - held) < 0.5 + HYSTERESIS:
        return held
    return int(min(max_bits, max(min_bits, round(relaxed))))


def noise_cost_slope(cost_now: float, held: int, relaxed: float, min_bits: int, max_bits: int,
                     nonzero: bool = False) -> float:
    """d cost / d width of the linear interpolation of the rounding-noise cost between integer
    widths, on the segment the relaxed width lies on (cost ~ 1 / Q(bits)^2 at a fixed range;
    `nonzero`: the nonzero grid's Q)."""
    down = relaxed < held and held > min_bits or held >= max_bits
    other = held - 1 if down else held + 1
    ratio = (qmax_of(held, nonzero) / qmax_of(other, nonzero)) ** 2
    return cost_now * (1.0 - ratio) if down else cost_now * (ratio - 1.0)


@torch.no_grad()
def refit_step(w: torch.Tensor, kept: torch.Tensor, edge: torch.Tensor, step: torch.Tensor, qmax: int,
               weights: torch.Tensor | None) -> torch.Tensor:
    """The step (per channel, like `step`) that rounds the kept weights best at Q = qmax: the
    Fisher-weighted squared error over STEP_CANDIDATES times `step`, where a weight that falls
    under half a step (the new grid's smallest dead zone) costs its whole value."""
    mag = (w.abs() * kept).flatten(1) if step.numel() > 1 else (w.abs() * kept).reshape(1, -1)
    wts = torch.ones_like(mag) if weights is None else weights.reshape(mag.shape)
    base = step.reshape(-1, 1)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    lo = torch.maximum(edge.reshape(-1, 1), torch.zeros_like(base))
    for c in STEP_CANDIDATES.to(w.dtype):
        s = base * c
        t = torch.maximum(lo / s, torch.full_like(s, 0.5 + MIN_DEAD_ZONE_GAP))
        v = mag / s
        level = torch.where(v >= t, v.round().clamp(1, qmax), torch.zeros_like(v)) * s
        err = ((mag - level) ** 2 * wts * (mag > 0)).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.reshape(step.shape)


def dead_zone_raw_for(edge: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """dead_zone_raw that puts the dead zone's edge at `edge` (absolute) with step `step`."""
    gap = (edge / step - 0.5).clamp(MIN_DEAD_ZONE_GAP, MAX_DEAD_ZONE_GAP)
    return gap + torch.log(-torch.expm1(-gap))  # softplus' inverse, finite for large gaps


def _zeroed(grad: torch.Tensor | None) -> bool:
    """Whether a gradient was reset since the last backward: None (zero_grad's default), or all zeros
    (zero_grad(set_to_none=False) zeroes it in place; a backward that reached the weight leaves some
    entry non-zero). Read only between the micro-batches of an accumulated or skipped step."""
    return grad is None or not bool(grad.any())


class FisherDiagonal:
    """B * EMA of the squared gradient of the loss w.r.t. the quantized weight (the Fisher diagonal),
    caught where the quantizer's backward receives its output's gradient: only task and
    distillation reach it. The estimate
    lives in the quantizer's buffers (`value`, `seen`), so checkpoints and resumed runs carry it.
    It is the one estimate of a quantizer: the learned width's noise price and the size budget's
    saliency (saliency.py) both read it, so a run with both folds one caught gradient once a step.

    Gradient accumulation (K micro-batches, one optimizer step; CompressionTrainer, a user's loop):
    the step's gradient is the *sum* of its micro-batches' (each scaled as the loop scales its loss),
    and B the samples of all of them, so the fold squares the summed gradient: K micro-batches give
    the estimate one batch of the same samples gives, to float rounding. Squaring each micro-batch's
    part instead would miss the cross terms (and a K-times smaller part, squared, is K^2 smaller).
    Which forwards belong to the step: those the session's size budget `join`s (a training forward
    that went through session.loss with gradients on) while the gradients accumulate (the weight's
    .grad not reset since). What a forward the session did not join caught (the quantizer used
    outside the session, a measurement's extra forward and backward; evaluation under no_grad
    catches nothing) is dropped at the next forward, not added; once the gradients were zeroed (a
    step skipped for a non-finite loss or gradient, whose gradient may be inf, never folded) the
    next forward drops the step's sum as well."""

    def __init__(self, value: torch.Tensor, seen: torch.Tensor):
        self.value, self.seen = value, seen
        self.pending: torch.Tensor | None = None  # the gradient caught since the watched forward
        # whether a forward's output is watched this step. Every call of `watch` is a new forward: its
        # output was once told apart by id(), and a freed output's id handed to the next forward's
        # (an evaluation under no_grad in between replaces the quantizer's last_out) made that forward
        # look like the one before, so a measurement's gradient joined the step's sum (a flaky test)
        self.watched = False
        self.joined: int | None = None  # the watched forward's samples, once the session joined it to the step
        # gradient accumulation: the summed gradient of the step's earlier joined micro-batches, and their samples
        self.carried: torch.Tensor | None = None
        self.carried_samples = 0

    def watch(self, out: torch.Tensor, accumulator: torch.Tensor | None = None) -> None:
        """This forward's output is the one whose gradient the quantizer's backward hands to
        `catch`. A new output starts a new micro-batch: the gradient caught for the one before is
        carried into the step's sum if the session joined that forward to the step and
        `accumulator` (a leaf whose .grad accumulates with it: the layer's weight) still holds its
        gradient; otherwise it is dropped (see the class), and with a reset gradient so is the sum."""
        if not out.requires_grad:
            return
        if self.carried is not None or (self.pending is not None and self.joined is not None):
            if accumulator is not None and _zeroed(accumulator.grad):  # a new step's gradients
                self.carried, self.carried_samples = None, 0
            elif self.pending is not None and self.joined is not None:
                # a copy the first time: the caught tensor may be the one the weight's .grad holds, which
                # the next micro-batch's backward accumulates into in place
                self.carried = self.pending.clone() if self.carried is None else self.carried + self.pending
                self.carried_samples += self.joined
        self.pending, self.joined = None, None
        self.watched = True

    def join(self, samples: int) -> None:
        """The session's word that the watched forward is a training micro-batch of this step, of
        `samples` samples (the size budget says it from session.loss, gradients on): its gradient,
        once caught, adds to the step's if another micro-batch follows before the fold."""
        if self.watched:
            self.joined = samples

    def catch(self, grad: torch.Tensor | None) -> None:
        """The gradient of the watched output, from the quantizer's own backward (a tensor hook on
        the output cost as much again per layer and step). One backward per term on a coordinated
        step: their parts add up. Kept by reference, not copied: the backward only reads it."""
        if grad is not None:
            g = grad.detach()
            self.pending = g if self.pending is None else self.pending + g

    @torch.no_grad()
    def fold(self, batch_size: int, step: int | None = None, every: int = 1, loss_scale: float | None = None) -> bool:
        """This step's gradient into the estimate (once: a second call in the step does nothing).
        `batch_size`: the samples of the last (or only) micro-batch; with gradient accumulation the
        step's gradient is the micro-batches' sum and B their samples together (the class).
        With `every` > 1 and the training step given, only every `every`-th step's gradient is
        folded (and the first one caught, so the estimate starts at once), with the decay of as many
        steps: the same ~50-step average for fewer passes over the weights. `loss_scale`: the
        factor a mixed-precision loss scaler put into the caught gradient (divided out; a step it
        overflowed, inf or nan, is not folded: the scaler skips that step too). Returns whether
        the estimate moved."""
        self.watched, self.joined = False, None
        g, self.pending = self.pending, None
        if self.carried is not None:  # K micro-batches: their summed gradient, all their samples
            batch_size = self.carried_samples + (batch_size if g is not None else 0)
            g = self.carried if g is None else self.carried + g
            self.carried, self.carried_samples = None, 0
        if g is None:
            return False
        seen = bool(self.seen)
        if seen and step is not None and step % every:
            return False
        if loss_scale is not None:
            if not bool(torch.isfinite(g).all()):
                return False
            g = g / loss_scale
        if seen:  # two passes over the weights, no temporary: value = d * value + (1 - d) * B * g^2
            decay = FISHER_DECAY ** every
            self.value.mul_(decay).addcmul_(g, g, value=(1 - decay) * float(batch_size))
        else:
            torch.mul(g, g, out=self.value).mul_(float(batch_size))
            self.seen.fill_(True)
        return True

    def estimate(self) -> torch.Tensor | None:
        return self.value if bool(self.seen) else None

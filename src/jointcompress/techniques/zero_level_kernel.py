"""The zero-level quantizer's forward and backward as one autograd node (see zero_level.py).

Why one node: the plain composition (bits -> step multiplier -> stored step -> LSQ gradient
scale -> dead zone -> gate -> level, then the size term's own pass over the weights) costs a
few dozen tiny autograd nodes per layer and a dozen passes over the weights, each allocating a
weight-sized tensor. On CPU a fresh weight-sized tensor is often fresh memory from the OS (its
page faults cost more than the arithmetic), and comparisons, bool masks and `where` over a
random pattern run unvectorized. So here: masks are 0/1 floats (`step_gate`), work happens in
place, the forward keeps only w / s for the backward and recomputes the rest there, and the
kept-weight count the size term needs comes out of the same forward.

The values are the plain formulas' (the quantized weight bit for bit); the gradients are the
same up to float rounding (tests/test_zero_level_fused.py checks both against the plain
composition).

With `cfg.compiled` (quant_lsq.compile) the weight-sized part of the forward and of the
backward runs as two compiled kernels instead (zero_level_compiled.py); the step, the dead zone
and the width are still computed here, eagerly, so the quantized weights stay bit for bit the
same; the backward then keeps only w and recomputes the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..artifact.precision import round_step
from ..spec import qmax_of
from . import zero_level_compiled as compiled

GATE_TEMPERATURE = 0.5  # width of the dead zone's sigmoid surrogate, in steps
SOFTPLUS_THRESHOLD = 20.0  # F.softplus's: above it softplus is linear (its gradient 1)


def step_gate(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x >= 0, else 0.0 (a new tensor), in float arithmetic: floor(x) + 1 is >= 1
    exactly when x >= 0 and <= 0 below it."""
    return torch.floor(x).add_(1).clamp_(0, 1)


def per_channel_sum(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x summed onto the shape of a per-channel (or per-tensor) parameter `like`."""
    if like.numel() > 1:
        return x.sum(dim=tuple(range(1, x.dim())), keepdim=True)
    return x.sum().view_as(like)


def step_and_dead_zone(log_step, bits_raw, dead_zone_raw, cfg):
    """The stored step s (fp16 or as `cfg.step_format` says), the dead zone t, the integer width's Q.

    s = round_step(exp(log_step) * Q(ref) / Q(round(bits))), t = 0.5 + softplus(dead_zone_raw),
    bits = min_bits + (max_bits - min_bits) * sigmoid(bits_raw): zero_level.py's formulas.
    """
    sb, b, hard, qmax = _width_terms(bits_raw, cfg)
    e = log_step.exp()
    x = e * hard
    t = 0.5 + F.softplus(dead_zone_raw)
    return round_step(x, cfg.step_format), t, qmax, (sb, b, e, x)


_WIDTH_TERMS: dict[tuple, tuple] = {}


def _width_terms(bits_raw, cfg):
    """(sigmoid(bits_raw), the relaxed width, the step multiplier's value, the held width's Q).

    The quantizer passes the same constant raw width every step (zero_level._kernel_bits_raw:
    the held width, no gradient), so these are computed once per width, not per forward; a raw
    width that trains, or one changed in place, is computed afresh."""
    key = None
    if not bits_raw.requires_grad:
        key = (id(bits_raw), bits_raw._version, cfg.min_bits, cfg.max_bits, cfg.ref_qmax, cfg.nonzero)
        hit = _WIDTH_TERMS.get(key)
        if hit is not None:
            return hit[1:]
    sb = torch.sigmoid(bits_raw)
    b = cfg.min_bits + (cfg.max_bits - cfg.min_bits) * sb
    bh = b.round()
    hard = cfg.ref_qmax / qmax_of(bh, cfg.nonzero)  # the step multiplier's value
    terms = (sb, b, hard, int(qmax_of(int(bh), cfg.nonzero)))
    if key is not None:
        if len(_WIDTH_TERMS) > 1024:
            _WIDTH_TERMS.clear()
        _WIDTH_TERMS[key] = (bits_raw, *terms)  # holding bits_raw keeps its id from being reused
    return terms


@dataclass(frozen=True)
class ZeroLevelSetup:
    """The constants of one quantizer: reference width's Q, width range, weights per step, step format."""

    ref_qmax: float
    min_bits: int
    max_bits: int
    per_step: int  # weights sharing one step (LSQ's gradient scale is 1 / sqrt(per_step * Q))
    step_format: str | None
    compiled: bool = False  # the weight-sized arithmetic in compiled kernels (zero_level_compiled.py)
    gate: bool = False  # also hand out the 0/1 gate (the learned width's noise price reads it)
    nonzero: bool = False  # the nonzero grid's Q (qmax_of)


class ZeroLevelQuant(torch.autograd.Function):
    """(out, count, gate) from w and the raw parameters: out = s * q with q = 0 inside the dead zone
    |w/s| < t (or where `keep` is 0 once the pattern is fixed), else sign(w) * clamp(max(round(|w/s|),
    1), Q); count = the kept weights (a float; its gradient is the sigmoid surrogate's); gate = the
    0/1 floats of the kept weights with `cfg.gate` (no gradient), else None.

    Gradients (zero_level.py's docstring): w straight through inside the grid's range; the step
    gets LSQ's gradient (scaled by 1 / sqrt(per_step * Q)) from `out` and the plain one from
    `count`; the width gets both through the step multiplier's relaxed value; the dead zone gets
    the surrogate's from both.
    """

    @staticmethod
    def forward(ctx, w, log_step, bits_raw, dead_zone_raw, cfg: ZeroLevelSetup, keep, stash: dict | None = None):
        ctx.set_materialize_grads(False)
        s, t, qmax, (sb, b, e, x) = step_and_dead_zone(log_step, bits_raw, dead_zone_raw, cfg)
        ctx.fisher = None
        if stash is not None:  # the stored step and the dead zone, for the caller (width_step, the saliency)
            stash["step"], stash["dead_zone"] = s, t
            ctx.fisher = stash.get("fisher")  # a FisherDiagonal that catches the output's gradient
        ctx.qmax, ctx.cfg, ctx.grad_scale = qmax, cfg, 1.0 / math.sqrt(cfg.per_step * qmax)
        gate = None
        fused = None
        if cfg.compiled:
            fused = compiled.run(2 if cfg.gate else 0, w.detach(), s, t, compiled.constant((float(qmax),), s), keep)
        ctx.fused = fused is not None
        if ctx.fused:  # the backward recomputes v, the level and the gate from w
            (out, count, *rest), saved = fused, (w, None, None, keep)
            gate = rest[0] if rest else None
        else:
            out, count, saved = _eager_forward(ctx, w, s, t, qmax, keep)
            gate = ctx.gate if cfg.gate and keep is None else None
            ctx.gate = None
        ctx.save_for_backward(*saved, s, t, sb, b, e, x, dead_zone_raw)
        if keep is not None:
            ctx.mark_non_differentiable(count)  # a fixed pattern's count is a constant
        if gate is not None:
            ctx.mark_non_differentiable(gate)
        return out, count, gate

    @staticmethod
    def backward(ctx, grad, grad_count, _grad_gate=None):
        if ctx.fisher is not None:
            ctx.fisher.catch(grad)
        v, level, q, d, s, t, sb, b, e, x, dead_zone_raw = ctx.saved_tensors
        if ctx.fused:  # w in v's slot, keep in d's
            grads = _compiled_grads(ctx, grad, grad_count, v, s, t, d, (sb, b, e, x, dead_zone_raw.detach()))
            if grads is not None:
                return grads
            _, _, (v, level, q, d) = _eager_forward(ctx, v.detach(), s, t, ctx.qmax, d)  # failed: eager
        grad_w, grad_s, grad_sc, grad_t = _eager_weight_grads(ctx, grad, grad_count, v, level, q, d, s)
        raw = _raw_grads(ctx, grad_s, grad_sc, grad_t, sb, b, e, x, dead_zone_raw)
        return (grad_w if ctx.needs_input_grad[0] else None, *raw, None, None, None)


def _eager_forward(ctx, w, s, t, qmax, keep):
    """out, count and what the eager backward keeps (v, the signed level, q, the edge distance)."""
    v = w / s
    level = v.abs()
    # whether any weight lies beyond the grid's range (rare): the backward's clipping masks only then
    ctx.clipped = bool(level.max() > qmax) if level.numel() else False
    d = level - t if keep is None else None  # the distance to the dead zone's edge, in steps
    gate = step_gate(d) if keep is None else keep
    ctx.gate = gate
    count = gate.sum()  # a float32 sum of 0/1 is exact up to 2^24 kept weights per layer
    level.round_().clamp_(1, qmax).mul_(torch.sign(v))  # the signed level the weight has when kept
    q = torch.mul(level, gate).add_(0.0)  # + 0.0: a pruned negative weight is +0.0, not -0.0
    return q * s, count, (v, level, q, d)


def _compiled_grads(ctx, grad, grad_count, w, s, t, keep, aux):
    """The backward's seven results from the compiled kernel (None where the eager backward
    gives None), or None if it is unavailable. Only plain tensors go in (a Parameter's shape
    would be a compile-time constant: one kernel per layer)."""
    cfg = ctx.cfg
    consts = compiled.constant((cfg.ref_qmax, float(cfg.max_bits - cfg.min_bits), ctx.grad_scale), s)
    g = grad.contiguous() if grad is not None else torch.zeros_like(w)
    gc = grad_count if grad_count is not None else compiled.constant((0.0,), w)
    res = compiled.run(1, g, gc, w.detach(), s, t, compiled.constant((float(ctx.qmax),), s), keep, *aux, consts)
    if res is None:
        return None
    grad_w, g_log, g_bits, g_dz = res
    need_w, need_log, need_bits, need_dz = ctx.needs_input_grad[:4]
    steps = grad is not None or (keep is None and grad_count is not None)  # the step got a gradient
    return (grad_w if need_w else None, g_log if need_log and steps else None, g_bits if need_bits and steps else None,
            g_dz if need_dz and keep is None else None, None, None, None)


def _eager_weight_grads(ctx, grad, grad_count, v, level, q, d, s):
    """(grad_w, grad_s, grad_sc, grad_t): the gradients of w and the per-channel sums the
    step (out's, count's) and the dead zone get, in eager passes over the weights."""
    need_w, need_log, need_bits, need_dz = ctx.needs_input_grad[:4]
    if grad is not None:
        # a linear layer's weight gradient arrives transposed; mixed layouts make every pass
        # below strided (slow), and the weight's .grad is stored contiguous anyway
        grad = grad.contiguous()
    grad_w = grad_s = grad_sc = grad_t = None
    scratch = None
    if grad is not None:
        inside = ((ctx.qmax + 1) - v.abs()).floor_().clamp_(0, 1) if ctx.clipped else None  # |v| <= Q
        if need_log or need_bits:
            scratch = _out_step_grad(grad, v, q, inside, ctx.qmax)
            grad_s = per_channel_sum(scratch, s)
        grad_w = grad if inside is None else inside.mul_(grad)
    if d is not None and ((grad is not None and need_dz) or grad_count is not None):
        # the gate's surrogate slope: d sigmoid(z) / dz with z = (|v| - t) / T (the 1 / T comes later)
        sig = torch.mul(d, 1.0 / GATE_TEMPERATURE).sigmoid_()
        one = torch.ones((), dtype=sig.dtype, device=sig.device)
        slope = torch.ops.aten.sigmoid_backward(one, sig)  # sigmoid(z) (1 - sigmoid(z)), in one pass
        scratch = sig
        if grad is not None and need_dz:  # d out / d t of the surrogate out = s * level * sigmoid(z)
            grad_t = per_channel_sum(torch.mul(grad, level, out=scratch).mul_(slope), s) * (-s / GATE_TEMPERATURE)
        if grad_count is not None:
            grad_t, grad_w, grad_sc = _count_grads(v, level, slope, scratch, s, grad_count, grad_t, grad_w, need_w)
    return grad_w, grad_s, grad_sc, grad_t


def _out_step_grad(grad, v, q, inside, qmax):
    """grad * d out / d s per weight: q - v inside the grid's range, the clipped level +-Q outside."""
    ds = torch.sub(q, v)
    if inside is not None:
        outside = v.clamp(-qmax, qmax)
        ds.mul_(inside).add_(outside.addcmul_(outside, inside, value=-1))  # + (1 - inside) * clamp(v, -Q, Q)
    return ds.mul_(grad)


def _count_grads(v, level, slope, scratch, s, gc, grad_t, grad_w, need_w):
    """The surrogate count's gradients (slope without its 1 / T): d/dw = slope sign(v) / (s T),
    d/ds = -slope |v| / (s T), d/dt = -slope / T."""
    factor = gc / GATE_TEMPERATURE
    gt = per_channel_sum(slope, s) * (-factor)
    grad_t = gt if grad_t is None else grad_t + gt
    grad_sc = per_channel_sum(torch.abs(v, out=scratch).mul_(slope), s) * (-factor / s)
    if need_w:
        sign = torch.sign(level, out=scratch)  # sign(v): the level is >= 1 in size, 0 only where v is
        slope.mul_(factor / s)
        grad_w = torch.mul(slope, sign) if grad_w is None else torch.addcmul(grad_w, slope, sign)
    return grad_t, grad_w, grad_sc


def _raw_grads(ctx, grad_s, grad_sc, grad_t, sb, b, e, x, dead_zone_raw):
    """Chain the step's and the dead zone's gradients onto log_step, bits_raw and dead_zone_raw.

    s (out's) = exp(log_step) * m with LSQ's scale on log_step; s (count's) = exp(log_step) * m;
    m = Q(ref) / Q(round(b)) in value, Q(ref) / Q(b) in gradient; t = 0.5 + softplus(raw).
    """
    cfg = ctx.cfg
    need_log, need_bits, need_dz = ctx.needs_input_grad[1:4]
    g_log = g_bits = g_dz = None
    if grad_s is not None or grad_sc is not None:
        zero = torch.zeros_like(x)
        out_part = grad_s if grad_s is not None else zero
        count_part = grad_sc if grad_sc is not None else zero
        if need_log:
            g_log = (out_part * ctx.grad_scale + count_part) * x
        if need_bits:
            qm = qmax_of(b, cfg.nonzero)
            dsoft = -cfg.ref_qmax * (2 ** (b - 1)) * math.log(2) / (qm * qm)
            g_bits = ((out_part + count_part) * e).sum() * dsoft * ((cfg.max_bits - cfg.min_bits) * sb * (1 - sb))
    if grad_t is not None and need_dz:
        z = dead_zone_raw.exp()
        slope = torch.where(dead_zone_raw > SOFTPLUS_THRESHOLD, torch.ones_like(z), z / (z + 1))
        g_dz = grad_t * slope
    return g_log, g_bits, g_dz

"""The zero-level quantizer's weight-sized arithmetic as two compiled kernels (torch.compile).

Why: in eager PyTorch the quantizer's forward and backward are some thirty passes over the
weights (each a separate loop, most allocating a weight-sized tensor), which made a joint
step with the size term three times a plain training step. Compiled, the forward is one loop
that reads w and writes the quantized weight and the kept-weight count, and the backward one
loop that reads the incoming gradient and w and writes the weight's gradient and the
per-channel sums the step, dead zone and width need (recomputing w / s, the level and the gate
instead of keeping them from the forward). A third kernel gives the size budget's Fisher saliency
its dead-zone gradient (saliency.py) in one pass.

Numerics: the forward performs the eager kernel's operations in the same order, so the
quantized weights and the count are bit for bit the eager ones (element-wise IEEE operations;
the count is a sum of 0/1). The backward's per-channel sums add in another order and the
compiler may fuse a multiply-add, so gradients agree to float rounding (~1e-7 relative);
tests/test_zero_level_compiled.py checks both and a training trajectory against eager.

When: compiling costs seconds per kernel the first time on a machine (the code is cached on
disk after that), so `quant_lsq.compile: auto` compiles only runs long enough to earn it back
(`AUTO_MIN_STEPS`); `true` always, `false` never. If compiling or running a compiled kernel fails
(no C++ compiler, an unsupported backend), a warning says so and the eager kernel runs for the
rest of the process.
"""
from __future__ import annotations

import math
import warnings

import torch

from .traced_kernel import TracedKernel

GATE_TEMPERATURE = 0.5  # zero_level_kernel's (kept here so this file imports nothing of it)
SOFTPLUS_THRESHOLD = 20.0
AUTO_MIN_STEPS = 2000  # `auto`: a run this long saves more than the first compile costs (see docs)

_STATE = {"kernels": None, "direct": None, "broken": False}
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def wants_compiled(mode: bool | str, total_steps: int) -> bool:
    """Whether a run of `total_steps` with `quant_lsq.compile: mode` (true, false, "auto") uses
    the compiled kernels."""
    return mode is True or (mode == "auto" and total_steps >= AUTO_MIN_STEPS)


def _per_channel_sum(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.numel() > 1:
        return x.sum(dim=tuple(range(1, x.dim())), keepdim=True)
    return x.sum().view_as(like)


def _levels(w, s, t, qmax, keep):
    """v = w / s, |v|, the signed level (|level| in [1, Q]), the 0/1 gate and the edge distance
    (None with a fixed pattern): the eager kernel's forward, operation for operation."""
    v = w / s
    mag = v.abs()
    d = mag - t if keep is None else None
    gate = torch.floor(d).add(1).clamp(0, 1) if keep is None else keep
    level = torch.minimum(mag.round().clamp(min=1), qmax) * torch.sign(v)
    return v, mag, level, gate, d


def weights_forward(w, s, t, qmax, keep):
    """(s * q, count of kept weights), q = the level where the gate is open, else +0.0."""
    _, _, level, gate, _ = _levels(w, s, t, qmax, keep)
    q = level * gate + 0.0  # + 0.0: a pruned negative weight is +0.0, not -0.0
    return q * s, gate.sum()


def weights_forward_gate(w, s, t, qmax, keep):
    """`weights_forward` and its 0/1 gate (what the learned width's noise price counts as kept)."""
    _, _, level, gate, _ = _levels(w, s, t, qmax, keep)
    q = level * gate + 0.0
    return q * s, gate.sum(), gate


def weights_backward(grad, grad_count, w, s, t, qmax, keep, sb, b, e, x, dead_zone_raw, consts):
    """(d/dw, d/dlog_step, d/dbits_raw, d/ddead_zone_raw): the eager backward's formulas
    (zero_level_kernel.py), with zeros for a missing gradient; consts = (Q(ref), max_bits -
    min_bits, LSQ's gradient scale)."""
    v, mag, level, gate, d = _levels(w, s, t, qmax, keep)
    q = level * gate + 0.0
    inside = ((qmax + 1) - mag).floor().clamp(0, 1)  # |v| <= Q
    clipped = torch.maximum(torch.minimum(v, qmax), -qmax)
    ds = (q - v) * inside + (clipped - clipped * inside)
    grad_s = _per_channel_sum(ds * grad, s)
    grad_w = grad * inside
    grad_sc = grad_t = None
    if d is not None:
        sig = torch.sigmoid(d * (1.0 / GATE_TEMPERATURE))
        slope = (1 - sig) * sig
        factor = grad_count / GATE_TEMPERATURE
        grad_t = _per_channel_sum(grad * level * slope, s) * (-s / GATE_TEMPERATURE) + _per_channel_sum(slope, s) * (-factor)
        grad_sc = _per_channel_sum(mag * slope, s) * (-factor / s)
        grad_w = grad_w + (slope * (factor / s)) * torch.sign(level)
    return (grad_w, *_raw_grads(grad_s, grad_sc, grad_t, sb, b, e, x, dead_zone_raw, consts))


def _raw_grads(grad_s, grad_sc, grad_t, sb, b, e, x, dead_zone_raw, consts):
    """The per-channel sums chained onto log_step, bits_raw and dead_zone_raw (the eager
    kernel's `_raw_grads`, every gradient computed)."""
    ref_qmax, span, scale = consts[0], consts[1], consts[2]
    count_part = grad_sc if grad_sc is not None else torch.zeros_like(x)
    g_log = (grad_s * scale + count_part) * x
    qm = 2 ** (b - 1) - 1
    dsoft = -ref_qmax * (2 ** (b - 1)) * math.log(2) / (qm * qm)
    g_bits = ((grad_s + count_part) * e).sum() * dsoft * (span * sb * (1 - sb))
    if grad_t is None:
        return g_log, g_bits, None
    z = dead_zone_raw.exp()
    slope = torch.where(dead_zone_raw > SOFTPLUS_THRESHOLD, torch.ones_like(z), z / (z + 1))
    return g_log, g_bits, grad_t * slope


def obd_cost(v, s, qmax, fisher, half_weight):
    """half_weight * F * (level s)^2 per weight, |v| = |w / s|: what removing the weight's quantized
    value costs the loss (Optimal Brain Damage with the Fisher diagonal F)."""
    level = torch.minimum(v.round().clamp(min=1), qmax)
    return half_weight * fisher * (level * s) ** 2


def saliency_dead_zone_grad(w, s, t, qmax, fisher, dead_zone_raw, half_weight):
    """d/d dead_zone_raw of sum_i half_weight * F_i * (level_i s)^2 * P(w_i pruned): the size
    budget's Fisher saliency (saliency.py), in closed form. P(pruned) = 1 - sigmoid((|w/s| - t) / T),
    whose derivative in t is sigmoid' / T; t = 0.5 + softplus(dead_zone_raw)."""
    v = (w / s).abs()
    sig = torch.sigmoid((v - t) * (1.0 / GATE_TEMPERATURE))
    per_channel = _per_channel_sum(obd_cost(v, s, qmax, fisher, half_weight) * ((1 - sig) * sig), s) * (1.0 / GATE_TEMPERATURE)
    z = dead_zone_raw.exp()
    return per_channel * torch.where(dead_zone_raw > SOFTPLUS_THRESHOLD, torch.ones_like(z), z / (z + 1))


def constant(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """`values` as a (cached) tensor of like's dtype and device: 0-d for one value. Passed to a
    kernel as a tensor, Q and the other per-layer constants are inputs, not compile-time
    constants (which would compile a kernel per bit-width and per layer)."""
    key = (values, like.dtype, like.device)
    if key not in _CONSTANTS:
        if len(_CONSTANTS) > 4096:
            _CONSTANTS.clear()
        _CONSTANTS[key] = torch.tensor(values[0] if len(values) == 1 else values, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


KERNEL_FUNCTIONS = (weights_forward, weights_backward, weights_forward_gate, saliency_dead_zone_grad)


def _direct_kernels() -> tuple[TracedKernel, ...]:
    """The kernels called without TorchDynamo (traced_kernel.py): the same Inductor code, a
    fraction of the per-call cost."""
    if _STATE["direct"] is None:
        _STATE["direct"] = tuple(TracedKernel(fn) for fn in KERNEL_FUNCTIONS)
    return _STATE["direct"]


def _kernels():
    if _STATE["kernels"] is None:
        _STATE["kernels"] = tuple(torch.compile(fn, dynamic=True) for fn in KERNEL_FUNCTIONS)
    return _STATE["kernels"]


def forget_kernels() -> None:
    """Drop the compiled kernels, so the next call compiles them afresh. Inductor's CPU kernels take
    the intra-op thread count at compile time (their reductions split by it): a process that
    changes `torch.set_num_threads` and needs the same summation order as before compiles again."""
    _STATE["kernels"] = _STATE["direct"] = None
    torch._dynamo.reset()


def run(which: int, *args):
    """The compiled kernel `which` (0: forward, 1: backward, 2: forward with the gate, 3: the saliency's
    dead-zone gradient) on args, or None where compiling is unavailable (then the caller runs its
    eager kernel). Called directly (traced_kernel.py); through torch.compile where tracing it for
    these arguments failed."""
    if _STATE["broken"]:
        return None
    try:
        return _direct_kernels()[which](*args)
    except Exception:  # noqa: BLE001 -- KernelUnavailable or a failing call: the torch.compile path below
        pass
    try:
        return _kernels()[which](*args)
    except Exception as exc:  # noqa: BLE001 -- any compiler failure means: run eager
        _STATE["broken"] = True
        warnings.warn(f"quant_lsq.compile: torch.compile of the zero-level quantizer failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); running it eagerly (same results, slower). "
                      "Set quant_lsq.compile: false to skip the attempt", RuntimeWarning, stacklevel=2)
        return None

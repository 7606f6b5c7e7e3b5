"""LSQ fake quantization (Esser et al., 2020) with learnable per-channel step sizes.

w_q = round(clamp(w / s, -Q, Q)) * s, Q = 2^(b-1) - 1 (symmetric, restricted range, so zero
is exact and a pruned weight stays exactly 0). Rounding uses a straight-through estimator and
the step-size gradient is scaled by 1/sqrt(n_w * Q) as in the paper. The step is learned as
log(s): Adam's update is scale-free, so on s itself a 1e-3 step would move a 0.02 step size
by 5% per iteration and 4-bit training collapses; on log(s) it is a 0.1% change. The quantizer is a
parametrization stacked *after* the pruning masks, so it sees the masked weights, and its
step sizes initialise from those pruned weights the first time it runs.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..artifact.precision import round_step
from ..model_copy import CopiedWithoutGraph
from .base import RunContext, Technique, selected_layers
from .bias_quant import attach_bias_quant
from .norm_storage import attach_folded_batchnorm, attach_norm_storage


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, exactly (the added term is 0.0); identity gradient (straight-through)."""
    return x.round().detach() + (x - x.detach())


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity forward, exactly; multiplies the gradient by g (LSQ's step-size gradient scale)."""
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())


class LSQFunction(torch.autograd.Function):
    """Fused LSQ fake quantization with the paper's gradients, for speed.

    Forward: q = clamp(round(w / s), -Q, Q); out = q * s with s = exp(log_s).
    Backward: d out / d w = 1 inside the clipping range, 0 outside (STE);
    d out / d s = q - w / s inside, +-Q outside; times the step-size gradient scale g,
    and times s for the log parametrization. Equal to autograd through
    round_ste/clamp/grad_scale (tested), with a handful of ops instead of a dozen.
    """

    @staticmethod
    def forward(ctx, w, log_step, qmax: int, g: float, step_format: str | None = None):
        s = round_step(log_step.exp(), step_format)  # the step exactly as the artifact stores it
        v = w / s
        q = torch.clamp(torch.round(v), -qmax, qmax)
        ctx.save_for_backward(v, q, s)
        ctx.qmax, ctx.g = qmax, g
        return q * s

    @staticmethod
    def backward(ctx, grad):
        v, q, s = ctx.saved_tensors
        inside = v.abs() <= ctx.qmax
        grad_w = grad * inside
        ds = torch.where(inside, q - v, q)  # q is +-Q where clipped
        grad_s = grad * ds
        if s.numel() == 1:
            grad_log = (grad_s.sum() * ctx.g * s).view_as(s)
        else:
            grad_log = grad_s.sum(dim=tuple(range(1, grad.dim())), keepdim=True) * ctx.g * s
        return grad_w, grad_log, None, None, None


def lsq_init_step(w: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
    """LSQ's 2*mean(|w|)/sqrt(Q) over the *non-zero* weights (pruned ones would bias it down)."""
    flat = w.detach().flatten(1) if per_channel else w.detach().flatten().unsqueeze(0)
    nz = (flat != 0).float()
    mean_abs = (flat.abs() * nz).sum(1) / nz.sum(1).clamp_min(1)
    step = 2 * mean_abs / math.sqrt(qmax)
    step = torch.where(step > 0, step, torch.full_like(step, 1e-3))
    shape = [-1] + [1] * (w.dim() - 1) if per_channel else [1] * w.dim()
    return step.view(shape)


FORWARD_CACHES = ("last_in", "last_w")  # names the forward's input was once registered under


def remember(module: nn.Module, **tensors) -> None:
    """Keep a forward's tensors on a quantizer as plain attributes.

    Not through nn.Module.__setattr__: the first parametrization's input is the layer's weight
    Parameter itself, which setattr would register as a parameter of the quantizer (the weight
    then appeared two more times in every state dict, checkpoint and rollback snapshot), and
    setattr's checks cost more than the assignment on every forward."""
    module.__dict__.update(tensors)


def _drop_forward_caches(module, state_dict, prefix, *args) -> None:
    """States saved while the forward's input was registered as a parameter (see `remember`)
    hold the weight again under these names: they are not state, so they are dropped."""
    for name in FORWARD_CACHES:
        state_dict.pop(prefix + name, None)


class LSQWeight(CopiedWithoutGraph, nn.Module):
    """Parametrization: per-channel LSQ fake quantization of a weight tensor."""

    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool = True):
        super().__init__()
        self.bits, self.per_channel = bits, per_channel
        self.qmax = 2 ** (bits - 1) - 1
        shape = [weight.shape[0]] + [1] * (weight.dim() - 1) if per_channel else [1] * weight.dim()
        self.log_step = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.last_in: torch.Tensor | None = None
        self.last_out: torch.Tensor | None = None
        self.step_format = "fp16"  # storage of the step (artifact/precision.py); the forward uses exactly it
        self._register_load_state_dict_pre_hook(_drop_forward_caches, with_module=True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.log_step.copy_(lsq_init_step(w, self.qmax, self.per_channel).log())
                self.initialized.fill_(True)
        n = w[0].numel() if self.per_channel else w.numel()
        out = LSQFunction.apply(w, self.log_step, self.qmax, 1.0 / math.sqrt(n * self.qmax), self.step_format)
        if torch.is_grad_enabled() or self.last_in is None:  # an evaluation between the training forward and
            remember(self, last_in=w, last_out=out)  # session.loss leaves that forward's, which loss_terms reads
        return out

    @property
    def step(self) -> torch.Tensor:
        return round_step(self.log_step.exp(), self.step_format)

    def scale(self) -> torch.Tensor:
        return self.step.detach().flatten()


def input_levels(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of an input grid: symmetric when the inputs can be negative, else
    [0, 2^bits - 1] (LSQ's unsigned case: after a ReLU a signed grid wastes half its levels)."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


class LSQActivation(nn.Module):
    """LSQ quantizer for a layer's input (per tensor), run as a forward pre-hook. Unsigned while no
    training input has been negative (the input of a layer after a ReLU), signed from the first
    one on (with a warning, if that comes after the first batch); kept in the state dict (`signed`;
    a checkpoint written before it is read as signed, as it trained)."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.log_step = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.ones((), dtype=torch.bool))
        self._register_load_state_dict_pre_hook(_signed_if_absent, with_module=True)

    @property
    def step(self) -> torch.Tensor:
        return self.log_step.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.signed.fill_(bool((x.detach() < 0).any()))
                top = input_levels(self.bits, bool(self.signed))[1]
                self.log_step.fill_(math.log(float(2 * x.detach().abs().mean() / math.sqrt(top)) or 1e-3))
                self.initialized.fill_(True)
        elif self.training and not bool(self.signed) and bool((x.detach() < 0).any()):
            self.signed.fill_(True)  # negatives after all: clamped to 0 they would be lost without a word
            warnings.warn("quant_lsq activations: a layer's inputs were non-negative in the first batch, negative "
                          f"later; its {self.bits}-bit grid is signed from now on", stacklevel=2)
        low, high = input_levels(self.bits, bool(self.signed))
        s = grad_scale(self.log_step, 1.0 / math.sqrt(x[0].numel() * high)).exp()
        return round_ste(torch.clamp(x / s, low, high)) * s


def _signed_if_absent(module, state_dict, prefix, *_):
    """A state dict from before `signed` existed trained a signed grid."""
    state_dict.setdefault(prefix + "signed", torch.ones((), dtype=torch.bool))


class FrozenInputQuant(nn.Module):
    """A trained LSQActivation made permanent by finalize: the layer's input rounded on the same grid,
    the step fixed, so the finalized model computes what the trained one did. The step is not in the
    state dict (the model keeps its plain keys); the artifact stores bits, step and sign per layer and
    load attaches it again (attach_frozen_input_quant)."""

    def __init__(self, bits: int, step: float | torch.Tensor, signed: bool = True):
        super().__init__()
        self.bits, self.signed = bits, bool(signed)
        self.low, self.high = input_levels(bits, self.signed)
        self.register_buffer("step", torch.as_tensor(step, dtype=torch.float32).detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(torch.clamp(x / self.step, self.low, self.high)) * self.step


def attach_frozen_input_quant(layer: nn.Module, bits: int, step: float | torch.Tensor, signed: bool = True) -> None:
    """Round `layer`'s input as training did (finalize, and load from an artifact)."""
    had = hasattr(layer, "input_quant")
    layer.input_quant = FrozenInputQuant(bits, step, signed)
    if not had:
        layer.register_forward_pre_hook(_quantize_input)


def input_roundings(model: nn.Module) -> dict[str, FrozenInputQuant]:
    """Layer name -> the trained rounding of its input, for every layer of a finalized model that has one."""
    return {name: m.input_quant for name, m in model.named_modules()
            if isinstance(getattr(m, "input_quant", None), FrozenInputQuant)}


def rounded_inputs(model: nn.Module) -> list[str]:
    """The layers of a finalized model that round their inputs (FrozenInputQuant)."""
    return list(input_roundings(model))


def has_training_hooks(model: nn.Module) -> bool:
    """A forward pre-hook left by training (a mask's) on some layer; a finalized layer's input rounding is
    part of the model, not one."""
    return any(m._forward_pre_hooks and not isinstance(getattr(m, "input_quant", None), FrozenInputQuant)
               for m in model.modules())


def _quantize_input(module, args):
    return (module.input_quant(args[0]),) + tuple(args[1:])


def takes_ids(layer: nn.Module) -> bool:
    """An embedding's input is integer token ids (and offsets): an input quantizer there would round ids
    on a float grid (torch refused the mean of int64 ids); its table is quantized as any weight."""
    return isinstance(layer, (nn.Embedding, nn.EmbeddingBag))


def warn_bags_left_out(model: nn.Module, cfg) -> None:
    """`embeddings: true` selects nn.Embedding tables only: an nn.EmbeddingBag its targets match is left
    out and stored in fp32, whole; said (as transposed convolutions are), not silently."""
    import warnings

    from ..graph import matches

    bags = [n for n, m in model.named_modules() if isinstance(m, nn.EmbeddingBag)
            and matches(n, cfg.targets) and not matches(n, cfg.exclude)]
    if bags:
        more = f" and {len(bags) - 1} more" if len(bags) > 1 else ""
        warnings.warn(f"quant_lsq: embeddings: true quantizes nn.Embedding tables only; the nn.EmbeddingBag "
                      f"'{bags[0]}'{more} is left out and stored in fp32, whole (the same table as an nn.Embedding, "
                      "its rows summed or averaged in forward, would be quantized)", stacklevel=2)


class QuantLSQ(Technique):
    kind = "quant_lsq"
    order = 20

    def __init__(self, config):
        super().__init__(config)
        self.quantizers: dict[str, LSQWeight] = {}
        self.act_quantizers: dict[str, LSQActivation] = {}
        self.norm_layers: list[str] = []  # rounded as stored (norm_format: fp16)
        self.hooks = []

    def setup(self, ctx: RunContext) -> None:
        for name, layer in selected_layers(ctx.model, self.config).items():
            bits = (self.config.layer_bits or {}).get(name, self.config.bits)
            q = self._quantizer(layer.weight.detach(), bits)
            q.step_format = self.config.stored_scale_format
            q.compiled = self._compiled(ctx)
            parametrize.register_parametrization(layer, "weight", q)
            self.quantizers[name] = q
            attach_bias_quant(layer, q, getattr(self.config, "bias_format", "fp16"), name)  # trained as stored
            if self.config.activations and not takes_ids(layer):
                had = hasattr(layer, "input_quant")  # a finalized model's frozen one: replaced, its hook kept
                layer.input_quant = LSQActivation(self.config.act_bits)
                self.act_quantizers[name] = layer.input_quant
                if not had:
                    self.hooks.append(layer.register_forward_pre_hook(_quantize_input))
        if getattr(self.config, "embeddings", False):
            warn_bags_left_out(ctx.model, self.config)
        if self.config.norms_in_fp16:
            self.norm_layers = attach_norm_storage(ctx.model)
        if self.config.stored_norm_format == "fp16_folded":
            attach_folded_batchnorm(ctx.model)
        self.attached = True
        with torch.no_grad():  # initialise step sizes now, from the (masked) weights as they are
            for name, layer in selected_layers(ctx.model, self.config).items():
                _ = layer.weight

    def _compiled(self, ctx: RunContext) -> bool:
        """Whether the zero-level quantizers run compiled kernels (quant_lsq.compile)."""
        from .zero_level_compiled import wants_compiled

        return bool(self.config.zero_level) and wants_compiled(getattr(self.config, "compile", "auto"), ctx.total_steps)

    def _quantizer(self, weight: torch.Tensor, bits: int) -> LSQWeight:
        cfg = self.config
        if not cfg.zero_level:
            return LSQWeight(weight, bits, cfg.per_channel)
        from .zero_level import ZeroLevelLSQWeight

        return ZeroLevelLSQWeight(weight, bits, cfg.per_channel, cfg.learn_bits, cfg.min_bits, cfg.max_bits,
                                  bool(cfg.nonzero_grid))

    def loss_terms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Optional: pull weights toward their grid points (less rounding noise, fewer flips)."""
        lam = self.config.regularization
        if lam == 0 or self.frozen:
            return {}
        terms = [
            ((q.last_in - q.last_out.detach()) ** 2).mean() / (q.step.detach() ** 2).mean()
            for q in self.quantizers.values()
            if q.last_in is not None and q.last_in.requires_grad
        ]
        return {"quant": lam * torch.stack(terms).mean()} if terms else {}

    def after_optimizer_step(self, ctx: RunContext) -> None:
        for q in self.quantizers.values():  # the zero-level quantizers' kept-weight counts are now stale
            forget = getattr(q, "forget_forward", None)
            if forget is not None:
                forget()

    def freeze(self) -> None:
        super().freeze()
        for q in list(self.quantizers.values()) + list(self.act_quantizers.values()):
            q.log_step.requires_grad_(False)

    def parameters(self) -> list[dict]:
        if self.frozen:
            return []
        steps = [q.log_step for q in self.quantizers.values()] + [q.log_step for q in self.act_quantizers.values()]
        groups = [{"params": steps, "lr": self.config.step_lr, "weight_decay": 0.0, "name": "quant_steps"}]
        lr = self.config.zero_level_lr or max(getattr(q, "decision_lr", 5e-3) for q in self.quantizers.values())
        # dead zones and bit-widths: where accuracy and size meet
        for attr, name, scale in (("dead_zone_raw", "dead_zones", 1.0), ("bits_raw", "bit_widths", 1.0)):
            params = [getattr(q, attr) for q in self.quantizers.values() if getattr(q, attr, None) is not None]
            params = [p for p in params if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr * scale, "weight_decay": 0.0, "name": name})
        return groups

    def metrics(self) -> dict[str, float]:
        if not self.quantizers:
            return {"bits": float(self.config.bits)}
        n = {k: q.last_in.numel() if q.last_in is not None else 1 for k, q in self.quantizers.items()}
        mean_bits = sum(q.bits * n[k] for k, q in self.quantizers.items()) / max(1, sum(n.values()))
        return {"bits": float(mean_bits)}

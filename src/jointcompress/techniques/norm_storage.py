"""Normalization layers trained as the artifact stores them (quant_lsq.norm_format: fp16).

The artifact writer keeps every tensor no technique compresses as it is, and an fp32 tensor
holding only fp16 values in fp16, bit for bit (artifact/encode.py). BatchNorm keeps four fp32
numbers per channel: in a small ResNet at 30x they are about half of the weights file, at any
higher ratio more than the weights. With `norm_format: fp16` the affine weight and bias of every
normalization layer are rounded to fp16 in each forward pass (straight-through gradient), and
BatchNorm's running statistics after every update, so the model a run evaluates is the one the
file stores at half the bytes, and `finalize` changes no logit.

Why rounding the running statistics in place loses nothing that matters: an update moves them
by momentum * (batch statistic - running one), some percent of their value at usual batch
sizes, while fp16's spacing is 0.05-0.1% of it. (A cumulative average, momentum None, stops
moving once 1 / num_batches_tracked falls below that spacing.)

`norm_format: fp16_folded` goes one step further for BatchNorm, whose four tensors an inference
needs only as one scale and one shift per channel (y = x * a + c, a = weight / sqrt(var + eps),
c = bias - mean * a: what ONNX Runtime and every deployment fold it into). Each evaluation forward
computes exactly that, with a and c rounded to fp16, and finalize writes them as the layer's
weight and bias over a zero mean and a variance v with v + eps == 1 in fp32: the same call of
torch's kernel, so no logit changes, and the file holds two fp16 tensors per layer (the constant
statistics are one stored value each, artifact/encode.py). Training forwards normalize by the
batch as before; what is lost is only BatchNorm's training state, so a folded artifact cannot be
the start of another training run (pipeline.load_start refuses it).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..artifact.precision import fp16_exact, round_fp16_storable

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
RUNNING_STATS = ("running_mean", "running_var")


def is_norm(module: nn.Module) -> bool:
    """torch's normalization layers, and a model's own (transformers' LlamaRMSNorm, T5LayerNorm,
    ...: a class named *Norm with a weight Parameter and no child modules)."""
    if isinstance(module, NORM_TYPES):
        return True
    own = type(module).__name__.endswith("Norm") and not any(True for _ in module.children())
    return own and isinstance(getattr(module, "weight", None), nn.Parameter)


class StoredFp16(nn.Module):
    """Parametrization: the tensor rounded to fp16 values (same dtype), straight-through gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (round_fp16_storable(x.detach()) - x.detach())


@torch.no_grad()
def _round_stats(module: nn.Module) -> None:
    """Replace (not overwrite) each running statistic by its rounding: the training forward that
    just updated them saved them for its backward, which an in-place change would invalidate."""
    for name in RUNNING_STATS:
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            setattr(module, name, round_fp16_storable(t).clone())


def _round_running_stats(module: nn.Module, args, output) -> None:
    """Forward hook: the statistics this training forward just updated, rounded to fp16 values."""
    if module.training:
        _round_stats(module)


def _hook_ids(module: nn.Module) -> list[int]:
    # found by the function, not by a handle: a deep copy of the model carries the hook along,
    # and a copied handle would still point at the original's hook dict
    return [k for k, fn in module._forward_hooks.items() if fn is _round_running_stats]


def attach_norm_storage(model: nn.Module) -> list[str]:
    """Round every normalization layer of `model` as the artifact will store it; returns their
    names. The running statistics are rounded now as well (the model evaluated before the first
    step is the stored one too)."""
    names = []
    for name, module in model.named_modules():
        if not is_norm(module) or _hook_ids(module) or _rounded(module):
            continue
        for pname in ("weight", "bias"):
            if isinstance(getattr(module, pname, None), nn.Parameter) or parametrize.is_parametrized(module, pname):
                parametrize.register_parametrization(module, pname, StoredFp16())
        if any(isinstance(getattr(module, s, None), torch.Tensor) for s in RUNNING_STATS):
            module.register_forward_hook(_round_running_stats)
            _round_stats(module)
        names.append(name)
    return names


def _rounded(module: nn.Module) -> list[str]:
    """The names of the module's tensors that StoredFp16 rounds."""
    plist = getattr(module, "parametrizations", {}) or {}
    return [name for name in plist if any(isinstance(p, StoredFp16) for p in plist[name])]


def detach_norm_storage(module: nn.Module) -> bool:
    """Remove the running statistics' hook and make a folded BatchNorm's affine its tensors
    (finalize, after the parametrizations went); returns whether the module was folded."""
    for k in _hook_ids(module):
        del module._forward_hooks[k]
    folded = [k for k, fn in module._forward_hooks.items() if fn is _folded_eval_output]
    for k in folded:
        del module._forward_hooks[k]
    if folded:
        bake_fold(module)
    return bool(folded)


def foldable(module: nn.Module) -> bool:
    """A BatchNorm whose evaluation reads running statistics through an affine scale and shift."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None)


@functools.lru_cache(maxsize=None)
def unit_variance(eps: float) -> float:
    """The fp32 variance v with v + eps == 1 exactly, so 1 / sqrt(v + eps) is exactly 1 (cached:
    every evaluation forward of a folded layer asks)."""
    one = torch.ones((), dtype=torch.float32)
    v = one - torch.tensor(eps, dtype=torch.float32)
    for _ in range(8):
        total = v + torch.tensor(eps, dtype=torch.float32)
        if bool(total == one):
            return float(v)
        v = torch.nextafter(v, one + one if bool(total < one) else -one)
    raise ValueError(f"no fp32 variance v with v + {eps} == 1")


def folded_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of a BatchNorm in evaluation, rounded as the file stores them."""
    scale = module.weight / torch.sqrt(module.running_var + module.eps)
    shift = module.bias - module.running_mean * round_fp16_storable(scale.detach())
    return round_fp16_storable(scale.detach()), round_fp16_storable(shift.detach())


def _folded_eval_output(module: nn.Module, args, output):
    """Forward hook: in evaluation, the layer as finalize will store it (folded_affine), through the
    very kernel call the finalized layer makes; training forwards keep the batch statistics."""
    if module.training:
        return output
    scale, shift = folded_affine(module)
    mean = torch.zeros_like(module.running_mean)
    var = torch.full_like(module.running_var, unit_variance(module.eps))
    return F.batch_norm(args[0], mean, var, scale, shift, False, 0.0, module.eps)


def attach_folded_batchnorm(model: nn.Module) -> list[str]:
    """Evaluate every foldable BatchNorm of `model` as its folded, fp16 affine; returns their names."""
    names = []
    for name, module in model.named_modules():
        if foldable(module) and not any(fn is _folded_eval_output for fn in module._forward_hooks.values()):
            module.register_forward_hook(_folded_eval_output)
            names.append(name)
    return names


@torch.no_grad()
def bake_fold(module: nn.Module) -> None:
    """Write a BatchNorm's folded affine as its tensors: weight = scale, bias = shift, mean 0 and
    variance v (unit_variance), which torch's evaluation kernel turns into exactly x * scale + shift."""
    scale, shift = folded_affine(module)
    module.weight.copy_(scale)
    module.bias.copy_(shift)
    module.running_mean.zero_()
    module.running_var.fill_(unit_variance(module.eps))


@torch.no_grad()
def round_norms(model: nn.Module) -> None:
    """Round every normalization layer's tensors in place, as a run with norm_format: fp16 will
    have them (the size allocator measures its candidate artifacts this way)."""
    for module in model.modules():
        if is_norm(module):
            for pname in ("weight", "bias"):
                t = getattr(module, pname, None)
                if isinstance(t, nn.Parameter):
                    t.copy_(round_fp16_storable(t))
            _round_stats(module)


def _norm_tensors(model: nn.Module):
    """(state-dict key, tensor as the forward reads it) of every normalization layer's affine
    weights and running statistics."""
    for name, m in model.named_modules():
        if is_norm(m):
            for n in ("weight", "bias") + RUNNING_STATS:
                t = getattr(m, n, None)
                if isinstance(t, torch.Tensor):
                    yield f"{name}.{n}".lstrip("."), t


def norm_state_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of every normalization layer's float tensors (of a plain model)."""
    return [key for key, _ in _norm_tensors(model)]


def bake_norm_storage(model: nn.Module) -> None:
    """Make the rounding (and a fold) permanent on a copy that is measured, not trained (the
    steering's candidate): the rounded values become the plain tensors, and the hooks go."""
    for module in model.modules():
        for pname in _rounded(module):
            parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
        detach_norm_storage(module)


@torch.no_grad()
def fold_norms(model: nn.Module) -> list[str]:
    """Fold every foldable BatchNorm of a plain model in place (bake_fold), as a run with
    norm_format: fp16_folded stores it; returns their names (the size allocator's candidates)."""
    names = [name for name, m in model.named_modules() if foldable(m)]
    for name in names:
        bake_fold(model.get_submodule(name))
    return names


def norm_format_hint(model: nn.Module) -> str:
    """A sentence for size errors: the bytes of normalization layers stored in fp32, if any, and
    the setting that halves them."""
    with torch.no_grad():
        wide = sum(t.numel() * 4 for _, t in _norm_tensors(model) if t.numel() and not fp16_exact(t))
    if wide:
        return f"; normalization layers hold {wide:,} B of it in fp32: quant_lsq.norm_format: fp16 stores them in half"
    unfolded = [m for m in model.modules() if foldable(m) and not _folded(m)]  # in fp16 already: folding halves them
    if not unfolded:
        return ""
    held = sum(2 * 4 * m.num_features for m in unfolded)
    return (f"; BatchNorm layers hold about {held:,} B of it in fp16: quant_lsq.norm_format: fp16_folded stores each "
            "as its scale and shift, about half (exact in evaluation; not a start for another training run)")


def _folded(module: nn.Module) -> bool:
    """Evaluated as its folded affine (the run's hook), or folded into its tensors already (bake_fold)."""
    if any(fn is _folded_eval_output for fn in module._forward_hooks.values()):
        return True
    with torch.no_grad():
        return bool((module.running_mean == 0).all()) and bool((module.running_var == unit_variance(module.eps)).all())

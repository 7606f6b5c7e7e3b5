"""Layers a technique cannot compress correctly, found before training (no transformers import:
a model holding a transformers layer has imported transformers already)."""
from __future__ import annotations

import sys

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2's projections: x @ W + b with W stored [in, out])."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def tied_weights(model: nn.Module) -> dict[str, str]:
    """module name -> the other module whose weight Parameter it shares (e.g. lm_head -> wte)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        if id(w) in first and first[id(w)] != name:
            tied[name] = first[id(w)]
        else:
            first.setdefault(id(w), name)
    return tied


def attached_layers(model: nn.Module) -> list[str]:
    """Layers that still carry this package's masks or quantizers: a model given to compress() or
    prepare() before, and not finalized (a notebook cell run twice). Compressing it again would
    stack a second mask and quantizer on each weight."""
    from torch.nn.utils import parametrize

    found = []
    for name, m in model.named_modules():
        ours = parametrize.is_parametrized(m) and any(
            type(p).__module__.startswith("jointcompress") for plist in m.parametrizations.values() for p in plist)
        if ours or type(getattr(m, "input_quant", None)).__name__ == "LSQActivation":  # a finalized one is frozen
            found.append(name)
    return found


def check_teacher(model: nn.Module, teacher: nn.Module | None) -> None:
    """The teacher must stay as it is: `teacher=model` (the same object) or a teacher built from the
    model's own layers would be masked, quantized and trained with it, and distillation would pull
    the model toward itself (and put it in eval mode, where the teacher runs)."""
    if teacher is None:
        return
    from ..errors import RecipeError

    mine = {id(p) for p in model.parameters()}
    shared = [n for n, p in teacher.named_parameters() if id(p) in mine]
    if shared:
        what = ("is the model being compressed" if teacher is model else
                f"shares {len(shared)} parameters with the model being compressed (e.g. '{shared[0]}')")
        raise RecipeError(f"the teacher {what}; the teacher must stay as it is while the model is compressed: pass a copy "
                          "made before compressing, teacher = copy.deepcopy(model)")


def weight_problem(module: nn.Module) -> str | None:
    """Why a selected layer's weight cannot carry the techniques' parametrizations, or None.

    Another library's parametrization on it (weight_norm, spectral_norm) would be baked in with
    ours by finalize while the techniques read and store only their own input; the old hook-based
    weight_norm recomputes the weight every forward, so it is no Parameter to parametrize; and the
    step sizes, masks and estimates the techniques train are float32, which parametrize refuses to
    put on a weight of another dtype. Each is fixed in one call before compressing."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        foreign = [type(p).__name__ for p in module.parametrizations.weight
                   if not type(p).__module__.startswith("jointcompress")]
        if foreign:
            return (f"its weight already has a parametrization ({', '.join(foreign)}), which the techniques would "
                    "stack on and finalize would bake in; make it permanent first with "
                    "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') (the layer computes the same), "
                    "before any deep copy of the model (a teacher): a copy of a parametrized layer shares its class "
                    "with the original, and removing the parametrization from one breaks the other")
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter):
        if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            return ("its weight is recomputed every forward by torch.nn.utils.weight_norm's hook; remove it first with "
                    "torch.nn.utils.remove_weight_norm(layer) (the layer computes the same)")
        return None
    if w.dtype != torch.float32:
        return (f"its weight is {w.dtype}, and the techniques train float32 weights (their step sizes, masks and "
                "estimates are float32); call model.float() (and teacher.float()) before compressing: the artifact "
                "stores the low-bit weights either way")
    return None

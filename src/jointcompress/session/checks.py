"""Layers a technique cannot compress correctly, found before training (no transformers import:
a model holding a transformers layer has imported transformers already)."""
from __future__ import annotations

import sys

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

"""Fake quantization of a quantized layer's bias, so what a run evaluates is what is stored.

The artifact stores a quantized layer's bias in low precision (artifact/precision.py):
``fp16`` by default, or ``int`` (an integer multiple of the layer's own per-channel step,
a few bits per channel after entropy coding). This parametrization rounds the bias the same
way in every forward pass, with a straight-through gradient, so finalize's plain bias is
already exactly representable and the encoder stores it losslessly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..artifact.precision import round_bias

DEFAULT_BIAS_FORMAT = "fp16"


class BiasQuant(nn.Module):
    """Parametrization of `bias`: round onto the storage format, straight-through gradient."""

    def __init__(self, weight_quant: nn.Module | None = None, fmt: str = DEFAULT_BIAS_FORMAT):
        super().__init__()
        self.fmt = fmt
        # the weight quantizer owns the step; kept out of this module's children so the step is
        # neither registered twice in the state dict nor trained through the bias
        self.__dict__["weight_quant"] = weight_quant

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        step = None
        if self.fmt == "int":
            step = self.weight_quant.step.detach().to(b.dtype)
            if not bool(self.weight_quant.initialized):
                return b  # the step is set on the first weight forward; nothing to round onto yet
        return b + (round_bias(b.detach(), self.fmt, step) - b.detach())


def attach_bias_quant(layer: nn.Module, weight_quant: nn.Module, fmt: str = DEFAULT_BIAS_FORMAT) -> BiasQuant | None:
    """Register BiasQuant on `layer.bias` (if it has one); returns it."""
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        return None
    bq = BiasQuant(weight_quant, fmt)
    parametrize.register_parametrization(layer, "bias", bq)
    return bq

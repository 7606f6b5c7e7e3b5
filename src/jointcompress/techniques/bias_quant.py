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


def _warn_past_fp16(name: str, bias: torch.Tensor, fmt: str) -> None:
    """A bias past fp16's largest value (65,504) is stored clamped there: two classes that differed
    by their bias tied, and the logits moved by the excess, while every parity check passed (they
    compare with the clamped model). Said when the layer is attached, with the fix."""
    from ..artifact.precision import FP16_MAX

    if fmt == "fp16" and bias.numel() and float(bias.detach().abs().max()) > FP16_MAX:
        import warnings

        warnings.warn(f"quant_lsq: layer '{name}''s bias reaches {float(bias.detach().abs().max()):.6g}, past "
                      f"float16's largest value ({FP16_MAX:g}), and bias_format fp16 stores it clamped there; set "
                      "quant_lsq.bias_format: fp32 (or int) for this model", stacklevel=4)


def attach_bias_quant(layer: nn.Module, weight_quant: nn.Module, fmt: str = DEFAULT_BIAS_FORMAT,
                      name: str = "") -> BiasQuant | None:
    """Register BiasQuant on `layer.bias` (if it has one); returns it. `name`: the layer's, for messages."""
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        return None
    _warn_past_fp16(name or type(layer).__name__, bias, fmt)
    bq = BiasQuant(weight_quant, fmt)
    parametrize.register_parametrization(layer, "bias", bq)
    return bq

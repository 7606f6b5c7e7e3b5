"""`training.precision`: the training forward in bfloat16 autocast.

The weights, their gradients, the step sizes, masks and the optimizer stay float32; only the
forward's matrix products and convolutions (and what torch.autocast lists with them) run in
bfloat16, on the model's device. Whole joint runs were 1.2x (LeNet-5) and 1.5x (a small ResNet)
faster on a CPU with AVX512-BF16, at the same accuracy (benchmarks/precision_cost.py, BENCHMARKS.md);
on a GPU it is the usual mixed-precision speed-up (not measured here). The loss,
softmax and the distillation terms stay float32 (autocast keeps them there). Evaluation, the
saved artifact and every exported model are float32: accuracy is read on the model as it is
deployed. fp16 needs a loss scaler that the built-in loop's non-finite recovery would mistake for
a diverging run; a loop of your own can use one (session.backward(terms, scaler=...)).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..errors import RecipeError
from ..model_call import model_device


def check_precision(model: torch.nn.Module, precision: str) -> None:
    """bf16 where the model's device cannot compute it: refused before the run, named."""
    if precision != "bf16":
        return
    device = model_device(model)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RecipeError(f"training.precision: bf16 on {torch.cuda.get_device_name(device)}, which has no bfloat16 "
                          "(a GPU from NVIDIA's Ampere generation on has it); set training.precision: fp32")
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"training.precision: bf16 autocast is offered on the CPU and CUDA GPUs, not on "
                          f"{device.type}; set training.precision: fp32")
    if device.type == "cpu" and not _cpu_computes_bf16():
        warnings.warn("training.precision: bf16 on a CPU without bfloat16 instructions (AVX512-BF16, AMX-BF16): "
                      "autocast emulates them and may train slower than fp32", RuntimeWarning, stacklevel=3)


def _cpu_computes_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (torch.cpu.get_capabilities' bf16 flags; True where unknown)."""
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return True
    return any(on is True and "bf16" in name for name, on in capabilities.items())


def forward_precision(model: torch.nn.Module, precision: str):
    """The context the training forward runs in."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16)

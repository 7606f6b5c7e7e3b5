"""`training.precision`: the training forward in bfloat16 or float16 autocast.

The weights, their gradients, the step sizes, masks and the optimizer stay float32; only the
forward's matrix products and convolutions (and what torch.autocast lists with them) run in
16 bits, on the model's device. Whole joint runs in bf16 were 1.2x (LeNet-5) and 1.5x (a small
ResNet) faster on a CPU with AVX512-BF16, at the same accuracy (benchmarks/precision_cost.py,
BENCHMARKS.md); on a GPU it is the usual mixed-precision speed-up (not measured here). The loss,
softmax and the distillation terms stay float32 (autocast keeps them there). Evaluation, the
saved artifact and every exported model are float32: accuracy is read on the model as it is
deployed.

fp16 (GPUs without bfloat16: V100, T4) adds a loss scaler (torch.amp.GradScaler): the loop
gives it to session.backward, unscales before the finiteness check, and a step whose scaled
gradients overflowed is the scaler's own skip (a smaller scale next step, an event in the
history), not the non-finite recovery's rollback, unless the gradients overflow at a scale of 1.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..errors import RecipeError
from ..model_call import model_device

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# torch.cpu.get_capabilities() flags of CPUs that compute each type natively
CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def check_precision(model: torch.nn.Module, precision: str) -> None:
    """A 16-bit precision where the model's device cannot compute it: refused before the run, named; on a
    CPU that emulates it, a warning."""
    if precision not in DTYPES:
        return
    device = model_device(model)
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RecipeError(f"training.precision: bf16 on {torch.cuda.get_device_name(device)}, which has no bfloat16 "
                          "(a GPU from NVIDIA's Ampere generation on has it); set training.precision: fp16 or fp32")
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"training.precision: {precision} autocast is offered on the CPU and CUDA GPUs, not on "
                          f"{device.type}; set training.precision: fp32")
    if device.type == "cpu" and not _cpu_computes(precision):
        warnings.warn(f"training.precision: {precision} on a CPU without {precision} instructions "
                      f"({', '.join(CPU_FLAGS[precision])}): autocast emulates them and may train slower than fp32",
                      RuntimeWarning, stacklevel=3)


def _cpu_computes(precision: str) -> bool:
    """Whether the CPU has the type's instructions (torch.cpu.get_capabilities; True where unknown)."""
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return True
    return any(capabilities.get(flag) is True for flag in CPU_FLAGS[precision])


def forward_precision(model: torch.nn.Module, precision: str):
    """The context the training forward runs in."""
    if precision not in DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=DTYPES[precision])


def loss_scaler(model: torch.nn.Module, precision: str):
    """fp16's GradScaler on the model's device (None for the other precisions)."""
    return torch.amp.GradScaler(model_device(model).type) if precision == "fp16" else None

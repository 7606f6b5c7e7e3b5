"""Where the command line trains: its `--device`, read once and checked before any work.

The Python API needs none of this: compress() and prepare() run where the user put the model, and
batches follow it (model_call.call_model). The commands build the model themselves, so they are
told. Whatever trains where, artifacts, int8 models and latency are made and measured on the CPU,
the deployment target the numbers are for.
"""
from __future__ import annotations

import torch

from .errors import JointCompressError

CHOICES = "cpu, cuda, cuda:N, mps or auto (a GPU where there is one, else the CPU)"


def resolve_device(name: str | None) -> torch.device:
    """The torch.device `--device NAME` asks for; 'auto' is CUDA where it is available. A device this
    machine has not got is refused here, named, not at the first batch."""
    text = (name or "cpu").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise JointCompressError(f"--device {name!r}: not a device; give {CHOICES}") from None
    if device.type == "cuda":
        return _cuda(device, name)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise JointCompressError(f"--device {name!r}: this machine has no Apple GPU (torch.backends.mps); use --device cpu")
    if device.type not in ("cpu", "mps"):
        raise JointCompressError(f"--device {name!r}: training on {device.type} is not supported; give {CHOICES}")
    return device


def _cuda(device: torch.device, name: str | None) -> torch.device:
    if not torch.cuda.is_available():
        raise JointCompressError(f"--device {name!r}: no CUDA device is visible here (torch.cuda.is_available() is False: "
                                 "a CPU-only build of torch, no driver, or CUDA_VISIBLE_DEVICES empty); use --device cpu")
    if device.index is None:  # the current one: under torchrun, the rank's own (distributed.init_from_env set it)
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise JointCompressError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                 f"numbered from 0; give cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device

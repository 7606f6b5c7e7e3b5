"""Whether a forward pass at a latency target's batch fits in this machine's memory, checked before it runs.

Why: `target: {latency_ms, batch: 100000}` passed the recipe's checks, and `recipe validate` was then killed by the
operating system for memory with no message: timing LeNet-5 at that batch needs about 11 GiB per forward (its
first convolution's unfolded input alone is 25 values per pixel). The estimate here is read from one forward at
batch 1: per layer, what a no-grad forward holds at once (the layer's input, its output and, for a convolution, its
input unfolded into columns), the largest over the layers, times the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .bench import batch_of
from .layer_types import CONVOLUTIONS
from .model_call import call_model, evaluating, forward_hooks

# a timing holds more than one forward's tensors at once (the model and its shrunk copy timed side by side, the
# inputs of both): refused where this many forwards' worth does not fit in the memory available
FORWARDS_HELD = 2


def bytes_per_row(model: nn.Module, example_inputs) -> int:
    """The most bytes one layer of `model` holds at once per input row in a no-grad forward (its input, output and a
    convolution's unfolded columns), read from one forward at batch 1."""
    largest = 0

    def hold(module, args, output):
        nonlocal largest
        held = sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))
        held += sum(t.numel() * t.element_size() for t in _tensors(output))
        if isinstance(module, CONVOLUTIONS) and isinstance(output, torch.Tensor):
            columns = module.in_channels // module.groups * math.prod(module.kernel_size) * math.prod(output.shape[2:])
            held += columns * output.element_size()
        largest = max(largest, held)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    with forward_hooks((m, hold) for m in leaves), torch.no_grad(), evaluating(model):
        call_model(model, batch_of(example_inputs, 1))
    return largest


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


def available_bytes() -> int | None:
    """The memory the operating system can give a new allocation (MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_batch_fits(model: nn.Module, example_inputs, batch: int, available: int | None = None) -> None:
    """Refuse `target.batch` where FORWARDS_HELD forwards at that batch need more memory than is available, naming
    both numbers; silent where the memory available is not known."""
    from .targets import TargetError

    available = available_bytes() if available is None else available
    if available is None or batch <= 1:
        return
    per_batch_row = FORWARDS_HELD * bytes_per_row(model, example_inputs)
    needed = batch * per_batch_row
    if needed > available:
        fits = max(1, available // max(1, per_batch_row))
        raise TargetError(
            f"target.batch: {batch}: timing the model at {batch} rows needs about {_size(needed)} (its largest "
            f"layer's input, output and unfolded columns, {FORWARDS_HELD} forwards held at once), and this machine has "
            f"{_size(available)} available; set target.batch to the batch the model serves (at most about "
            f"{fits} rows fit here)")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

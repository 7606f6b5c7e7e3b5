"""One way to feed a model its inputs, for every place that runs the user's model.

Inputs are a tensor (`model(x)`), a dict (`model(**inputs)`: Hugging Face batches, or any model
whose forward takes named inputs) or a tuple / list (`model(*inputs)`: a model with several
positional inputs, as example inputs and artifacts record them). Training, tracing the channel
graph, checking groups, finalizing and distilling all call the model through this, so a model
that trains also traces and finalizes.

Inputs follow the model: a model on a GPU fed from an ordinary (CPU) loader gets its batches
moved to its device here, as the Hugging Face Trainer does, so no caller has to know where the
model lives. A model already beside its inputs pays one device comparison per call, no copy.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping

import torch
import torch.nn as nn


def model_device(model) -> torch.device | None:
    """The device of the model's first parameter (or buffer): where its inputs must be. None for
    anything without tensors (a function, a module with no weights), whose inputs stay put."""
    if not isinstance(model, nn.Module):
        return None
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if first is None else first.device


def on_model_device(model):
    """A context in which new tensors are made on the model's device: what a technique creates as it
    attaches (mask scores, LSQ step sizes, dead zones, their buffers) then sits beside the weights it
    acts on, on a GPU too. A model on the CPU (or without weights) gets no context at all."""
    device = model_device(model)
    return torch.device(device) if device is not None and device.type != "cpu" else contextlib.nullcontext()


def to_device(obj, device: torch.device | None):
    """`obj` with every tensor in it (nested in dicts, tuples and lists) on `device`; tensors
    already there, and everything that is not a tensor, are returned as they are."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, Mapping):  # a dict, or a mapping such as transformers' BatchEncoding (becomes a dict)
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):  # a named tuple keeps its type as given
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@contextlib.contextmanager
def kept_modes(model: nn.Module):
    """Each module's train / eval mode put back as it was when the block ends, not the top one's copied down
    (`model.train(was)` would wake a backbone the user froze)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def forward_hooks(hooked):
    """Each (module, hook) pair's forward hook on its module for the block's length, removed when it ends (also on
    an error): the readings of a model's layers on one example forward (shapes, sizes, which layers ran)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooked]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode for a reading (its structure, a check, the user's evaluate), each module's
    mode put back after (kept_modes): in train mode the reading would move BatchNorm's running statistics
    (and draw dropout masks)."""
    with kept_modes(model):
        model.eval()
        yield


def call_model(model: nn.Module, inputs):
    """model(**inputs) for a dict, model(*inputs) for a tuple or list, model(inputs) otherwise,
    with the inputs on the model's device."""
    inputs = to_device(inputs, model_device(model))
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)

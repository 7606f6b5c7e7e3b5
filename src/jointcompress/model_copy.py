"""A deep copy of a model in training that is safe to finalize or strip.

Two things stand in the way of `copy.deepcopy` on a model with masks and quantizers attached:
the forward caches of the parametrizations (last_in, last_mask, ...) are graph tensors, which
deepcopy refuses, and the copy shares each parametrized module's generated class with the live
model, so removing a parametrization from the copy would remove it from the live model too.
"""
from __future__ import annotations

import collections
import copy
import itertools

import torch
import torch.nn as nn


def load_model_state(model: nn.Module, state, strict: bool = True):
    """`model.load_state_dict(state)` for a state that lost its version metadata (a copy made key by key,
    or read back from a file): a module with a `_version` of its own reads that metadata while loading
    (torchvision's MNASNet refuses a state without it), so the model's own is supplied; the state was made
    by the same classes."""
    if getattr(state, "_metadata", None) is None:
        own = model.state_dict()._metadata
        state = collections.OrderedDict(state)
        state._metadata = own
    return model.load_state_dict(state, strict=strict)


class CopiedWithoutGraph:
    """For an object that keeps tensors of its last forward (a quantizer's input and output, a mask, a
    captured feature): a copy of the model (copy.deepcopy, a user's best-model or EMA snapshot) leaves
    those that belong to an autograd graph behind (None), which deepcopy refuses ("Only Tensors created
    explicitly by the user ... support the deepcopy protocol") right after a training step."""

    def __getstate__(self):
        own = getattr(super(), "__getstate__", None)  # object's from Python 3.11, nn.Module's
        state = own() if own is not None else self.__dict__.copy()
        return {key: None if isinstance(value, torch.Tensor) and value.grad_fn is not None else value
                for key, value in state.items()}


def own_class(module: nn.Module) -> None:
    """Give a parametrized module a generated class of its own: a copy of the module shares the class
    torch made for it, whose properties removing a parametrization deletes (a copy taken before
    finalize then lost its `weight`)."""
    shared = module.__class__
    module.__class__ = type(shared.__name__, shared.__bases__, dict(shared.__dict__))


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy without the forward caches, whose parametrized modules have classes of their own."""
    memo = {id(v): None for v in _graph_tensors(model)}
    plain = copy.deepcopy(model, memo)
    for m in plain.modules():
        if hasattr(m, "parametrizations"):
            own_class(m)
    return plain


def _graph_tensors(model: nn.Module):
    """The graph tensors a module holds: its own attributes (the parametrizations' caches) and those
    of the objects its hooks are (distill_kd's feature capture keeps the last output it saw)."""
    for m in model.modules():
        holders = [m] + [h for hooks in (m._forward_hooks, m._forward_pre_hooks) for h in hooks.values()
                         if hasattr(h, "__dict__")]
        for holder in holders:
            for v in vars(holder).values():
                if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                    yield v


def on_cpu(model: nn.Module, spec=None):
    """(model, spec) with every tensor on the CPU, where artifacts are written and ONNX and int8
    models are made: the objects themselves when they are there already, else copies, so a model
    finalized on a GPU can be saved and deployed and still be used where it is."""
    from dataclasses import replace

    if all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers())):
        moved = model
    else:
        moved = plain_copy(model).cpu()
    if spec is not None and any(ls.scale is not None and ls.scale.device.type != "cpu" for ls in spec.layers.values()):
        spec = replace(spec, layers={n: replace(ls, scale=None if ls.scale is None else ls.scale.cpu())
                                     for n, ls in spec.layers.items()})
    return moved, spec

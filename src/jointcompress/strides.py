"""Downsampling earlier: a convolution's stride raised, so every layer after it runs on smaller maps.

Why: removing channels divides a convolution's work by the fraction kept (twice, where both its
inputs and outputs lose channels) but never touches the size of its maps. A CNN whose stem keeps
the full resolution (the small ResNet: stride 1, its first block on 28x28 maps) spends most of its
multiply-adds there at every width, so channel pruning alone stops short of 20x (docs/latency.md,
"What bounds the speed-up"). A stride of 2 at the stem makes every later map a quarter the size,
as the stems of ResNet and MobileNet do. The weights keep their shapes: the state dict, the masks,
the quantizers and the pruning history are untouched, so the change is an attribute, set on the
model the run trains (techniques/raise_stride.py), recorded in the spec and the artifact
(`strides`) and set again by `load`.

A stride can be raised only where the model's output keeps its shape on the example input: a
global-pooling head allows it, a flatten into a Linear (LeNet-5) does not.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .errors import UnsupportedModelError
from .model_call import call_model, forward_hooks

# set on a convolution whose stride was raised: the stride it had before (finalize records the layer)
RAISED_FROM = "_jointcompress_stride_raised_from"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def first_conv(model: nn.Module, maps: dict[str, tuple[int, ...]] | None = None) -> str:
    """The first convolution in module order whose stride is 1 everywhere, and, given `maps` (each
    convolution's output map on the example input), whose map a stride can shrink: the default to raise.
    A 1x1 map (a squeeze-and-excitation block's convolution after global pooling) stays 1x1 at any stride."""
    for name, m in model.named_modules():
        if isinstance(m, _CONVS) and all(s == 1 for s in m.stride) and (maps is None or _shrinks(maps.get(name))):
            return name
    raise UnsupportedModelError(f"raise_stride: {type(model).__name__} has no Conv1d/2d/3d with stride 1 on maps larger "
                                "than 1; name the layer to downsample in `layer`, or remove raise_stride (it applies "
                                "to CNNs)")


def _shrinks(out_map: tuple[int, ...] | None) -> bool:
    """A convolution at stride 1 with this output map gives a smaller map at stride 2 (some side above 1)."""
    return out_map is not None and any(side > 1 for side in out_map)


def output_maps(model: nn.Module, example_inputs) -> dict[str, tuple[int, ...]]:
    """Each convolution's output map (its spatial sides) on the example input."""
    maps = {}

    def record(name):
        def hook(mod, inp, out):  # returns None: the output passes on unchanged
            maps.setdefault(name, tuple(out.shape[2:]))
        return hook

    with forward_hooks((m, record(name)) for name, m in model.named_modules() if isinstance(m, _CONVS)):
        _output_shape(model, example_inputs)
    return maps


def _conv(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        conv = model.get_submodule(name)
    except AttributeError:
        raise UnsupportedModelError(f"{where}: layer {name!r} is not a module of {type(model).__name__}; "
                                    "give the name as model.named_modules() lists it") from None
    if not isinstance(conv, _CONVS):
        raise UnsupportedModelError(f"{where}: layer {name!r} is a {type(conv).__name__}; only a Conv1d/2d/3d's "
                                    "stride can be raised")
    return conv


def set_strides(model: nn.Module, strides: dict[str, list[int]], where: str = "raise_stride") -> None:
    """Give each named convolution its stride (all spatial dims), remembering the one it had."""
    for name, stride in strides.items():
        conv = _conv(model, name, where)
        stride = tuple(int(s) for s in stride)
        if len(stride) != len(conv.stride):
            raise UnsupportedModelError(f"{where}: layer {name!r} takes {len(conv.stride)} stride value(s), "
                                        f"got {list(stride)}")
        if not hasattr(conv, RAISED_FROM):
            setattr(conv, RAISED_FROM, tuple(conv.stride))
        conv.stride = stride


def raised_strides(model: nn.Module) -> dict[str, list[int]]:
    """The convolutions whose stride was raised (set_strides) and their strides now, for the spec."""
    return {name: list(m.stride) for name, m in model.named_modules()
            if isinstance(m, _CONVS) and hasattr(m, RAISED_FROM) and tuple(m.stride) != getattr(m, RAISED_FROM)}


def raise_stride(model: nn.Module, example_inputs, layer: str | None, stride: int) -> dict[str, list[int]]:
    """Raise `layer`'s stride (default: first_conv) to `stride`, refusing a model whose output
    would change shape; returns {layer: stride per dim}."""
    with torch.no_grad():
        maps = output_maps(model, example_inputs)
    name = layer or first_conv(model, maps)
    conv = _conv(model, name, "raise_stride")
    dims, had = len(conv.stride), list(conv.stride)
    if max(had) >= stride:
        raise UnsupportedModelError(f"raise_stride: layer {name!r} already runs at stride {tuple(had)}; give a stride "
                                    f"above {max(had)}, or another layer")
    if name in maps and not _shrinks(maps[name]):
        raise UnsupportedModelError(f"raise_stride: layer {name!r} gives a {'x'.join(map(str, maps[name]))} map on the "
                                    "example input, which no stride makes smaller; name a layer on larger maps")
    with torch.no_grad():
        before = _output_shape(model, example_inputs)
        set_strides(model, {name: [stride] * dims})
        try:
            after = _output_shape(model, example_inputs)
        except Exception as exc:
            after = f"an error ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if after != before:
        set_strides(model, {name: had})
        raise UnsupportedModelError(
            f"raise_stride: with {name!r} at stride {stride}, {type(model).__name__} gives {after} instead of "
            f"{before}: a later layer needs the full-size maps (a flatten into a Linear, or a residual addition whose "
            "other input keeps them); it applies to models that pool globally before their head, at a layer outside "
            "a residual block (name it in `layer`)")
    return {name: [stride] * dims}


def stride_note(model: nn.Module, example_inputs) -> str:
    """What `jointcompress dry-run` says about raise_stride on this model (tried on a copy)."""
    from .errors import JointCompressError
    from .recipe import RaiseStride

    defaults = RaiseStride(type="raise_stride")
    try:
        (name, stride), = raise_stride(copy.deepcopy(model), example_inputs, defaults.layer, defaults.stride).items()
    except JointCompressError as exc:
        return f"raise_stride: not with its defaults ({str(exc).removeprefix('raise_stride: ')})"
    return f"raise_stride can run {name} at stride {stride[0]}: every later map half as long in each spatial dimension"


def _output_shape(model: nn.Module, example_inputs):
    was = model.training
    model.eval()
    try:
        out = call_model(model, example_inputs)
    finally:
        model.train(was)
    out = getattr(out, "logits", out)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__

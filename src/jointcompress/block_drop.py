"""Whole residual blocks of a CNN: which ones can be dropped, and dropping them.

Why: channel pruning cannot make every CNN fast. A small ResNet whose first stage works at full
resolution spends about 70% of its multiply-adds there (docs/latency.md), so with every group
cut to 8 channels it is still only about 4x faster than dense. A residual block `y = f(x) + x` whose output has its
input's shape can be removed whole: with `f` gone it is the identity, the next block reads `x`
directly, and nothing else in the network changes shape. That is what `prune_blocks` trains
towards (techniques/prune_blocks.py fades a block into the identity under distillation), and
what the latency allocator can take as a starting point (deploy/against.py `drop_blocks`).

A block is droppable when, on the example input, it returns one tensor of its input's shape,
and its traced forward adds its own input to something it computed (the skip connection). The
forward is traced symbolically (torch.fx) where it can be; a block whose forward reads its
input's sizes as numbers (transformers' MobileNetV2 computes its TF-style padding so) is traced
on the input it got in the example's forward instead (make_fx, shapes concrete).
Blocks nest (a stage of residual layers is itself droppable); a name and one inside it cannot
both be dropped.
"""
from __future__ import annotations

import contextlib
import copy
import operator

import torch
import torch.nn as nn

from .errors import UnsupportedModelError
from .model_call import call_model, forward_hooks

_ADDS = (operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
# what make_fx's graph makes of an identity shortcut: the input itself under another node
_SAME = (torch.ops.aten.alias.default, torch.ops.aten.detach.default, torch.ops.aten.clone.default)


def _adds_its_input(module: nn.Module, example: torch.Tensor | None = None) -> bool:
    """True when the module's traced forward adds its (single) input to another value."""
    graph = _traced_graph(module, example)
    if graph is None:  # not traceable (data-dependent control flow, HF outputs): not a plain block
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    modules = dict(module.named_modules())
    same = {inputs[0]}  # the input, and what an identity shortcut (nn.Identity, empty Sequential) makes of it
    for node in graph.nodes:
        if node.args and node.args[0] in same and (
                (node.op == "call_module" and _is_identity(modules.get(node.target)))
                or (node.op == "call_function" and node.target in _SAME)):
            same.add(node)
        is_add = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in ("add", "add_"))
        if is_add and any(a in same for a in node.args):
            return True
    return False


def _traced_graph(module: nn.Module, example: torch.Tensor | None):
    """The module's forward as a graph: symbolic where torch.fx can trace it, else traced on `example`
    (the input it got in the example's forward) by make_fx; None where neither can."""
    try:
        return torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - fx raises anything its proxies meet (int() of a size, control flow)
        if example is None:
            return None
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with torch.no_grad():
            return make_fx(module)(example).graph
    except Exception:  # noqa: BLE001 - a forward make_fx cannot trace is no plain block either
        return None


def _torch_layer(m: nn.Module) -> bool:
    """torch.nn's own layers and containers (BatchNorm2d, Conv2d, Sequential, ...): none adds its input
    to what it computes, and a deep CNN has hundreds of them to trace for nothing."""
    return type(m).__module__.startswith("torch.nn.")


def _is_identity(m) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Sequential) and len(m) == 0)


def _shape_preserving(model: nn.Module, example_inputs) -> dict[str, torch.Tensor]:
    """The submodules (not torch.nn's own layers) that returned one tensor of their input's shape on the example,
    each with that input (the first call's, kept for tracing), in the order they ran."""
    found = {}

    def hook(mod, inp, out, name):
        if len(inp) == 1 and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor) \
                and out.shape == inp[0].shape:
            found.setdefault(name, inp[0])

    hooked = [(m, lambda mod, inp, out, name=name: hook(mod, inp, out, name)) for name, m in model.named_modules()
              if name and not _torch_layer(m) and next(m.parameters(), None) is not None]
    with forward_hooks(hooked), torch.no_grad():
        call_model(model, example_inputs)
    return found


def residual_blocks(model: nn.Module, example_inputs) -> list[str]:
    """The blocks `drop_blocks` can remove (module docstring), in model order."""
    was_training = model.training
    model.eval()  # traced as deployed: no BatchNorm statistics updates in the graph
    try:
        candidates = _shape_preserving(model, example_inputs)
        modules = dict(model.named_modules())
        blocks = [n for n, example in candidates.items() if _adds_its_input(modules[n], example)]
    finally:
        model.train(was_training)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(blocks, key=order.__getitem__)


def check_droppable(model: nn.Module, example_inputs, names: list[str]) -> None:
    """A clear error for a name that is not a droppable block (naming the ones that are)."""
    if not names:
        return
    droppable = residual_blocks(model, example_inputs)
    modules = dict(model.named_modules())
    for name in names:
        if name in droppable:
            continue
        why = ("no such module" if name not in modules else
               "it is not a residual block whose output has its input's shape (dropping it would change "
               "what the next layer reads)")
        raise UnsupportedModelError(
            f"prune_blocks.blocks: cannot drop {name!r}: {why}; droppable blocks of this model: "
            f"{', '.join(droppable) or 'none'}")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise UnsupportedModelError(f"prune_blocks.blocks: {nested[0][1]!r} lies inside {nested[0][0]!r}, "
                                    "which is dropped whole; list only one of them")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(getattr(parent, child, None), nn.Module):
        raise AttributeError(repr(name))
    setattr(parent, child, new)


def drop_blocks(model: nn.Module, names: list[str], example_inputs=None) -> nn.Module:
    """Replace each named block with nn.Identity, in place (checked first when `example_inputs`
    is given); returns the model."""
    if example_inputs is not None:
        check_droppable(model, example_inputs, names)
    for name in names:
        _set_module(model, name, nn.Identity())
    return model


def allocation_base(model: nn.Module, recipe_data: dict, example_inputs) -> nn.Module:
    """The model a target is allocated for (latency widths, size budgets): a copy without the
    blocks the recipe's prune_blocks removes (their layers are not in the artifact) and with the
    stride its raise_stride sets (the maps every later layer will run on), else the model itself."""
    from .recipe import RaiseStride
    from .strides import raise_stride

    techniques = recipe_data.get("techniques", [])
    blocks = [b for t in techniques if t.get("type") == "prune_blocks" for b in t.get("blocks", [])]
    strides = [RaiseStride.model_validate(t) for t in techniques if t.get("type") == "raise_stride"]  # its defaults
    if not blocks and not strides:
        return model
    base = drop_blocks(copy.deepcopy(model), blocks, example_inputs) if blocks else copy.deepcopy(model)
    for t in strides:
        raise_stride(base, example_inputs, t.layer, t.stride)
    return base


class BlockFade:
    """A forward hook that blends a block's output into its input: y = x + (1 - fade) (f(x) - x).

    fade = 0 leaves the block as it is; fade = 1 makes it exactly the identity, which is when
    finalize may replace it by nn.Identity without changing the logits. A hook, not a wrapper
    module, so every parameter keeps its name (recipes, state dicts and artifacts use them)."""

    def __init__(self, name: str):
        self.name = name
        self.fade = 0.0

    def __call__(self, module, inputs, output):
        if self.fade <= 0.0:
            return output
        x = inputs[0]
        if self.fade >= 1.0:
            return x
        return x + (1.0 - self.fade) * (output - x)


def faded(model: nn.Module) -> dict[str, BlockFade]:
    """Every block carrying a BlockFade hook: name -> hook."""
    return {name: hook for name, m in model.named_modules() for hook in m._forward_hooks.values()
            if isinstance(hook, BlockFade)}


@contextlib.contextmanager
def traced_whole(model: nn.Module):
    """Inside: every fading block passes its own output on (fade 0), each fade restored on leaving.

    For tracing the channel graph (graph.build_graph). A block keeps running while it fades, even at
    fade 1, where the hook only discards its output: its layers still read the channels the layers
    before it make, so removing those channels must slice their inputs too. A trace at fade 1 never
    reaches the block (the output no longer depends on it), so the group feeding it missed the
    block's first conv, failed its removal check and went unpruned (a prune_blocks window that ends
    at step 0: `end: 0`, or a one-step run)."""
    hooks = list(faded(model).values())
    saved = [h.fade for h in hooks]
    for h in hooks:
        h.fade = 0.0
    try:
        yield
    finally:
        for h, fade in zip(hooks, saved):
            h.fade = fade


def inside_faded(model: nn.Module) -> set[str]:
    """Names of every module inside a block that carries a BlockFade hook (the block included):
    the layers that will not be in the artifact."""
    blocks = faded(model)
    return {name for name, _ in model.named_modules()
            if any(name == b or name.startswith(b + ".") for b in blocks)}


def as_dropped(model: nn.Module) -> nn.Module:
    """`model` (a copy: it is changed) with every fading block set to its end, fade 1, so that
    finalize removes it: what the artifact will hold once the blocks are gone. For measuring the
    file during training (the size budget's calibration), when the fade is still under way."""
    for hook in faded(model).values():
        hook.fade = 1.0
    return model


def collapse_faded(model: nn.Module) -> list[str]:
    """Replace every fully faded block with nn.Identity (exact); returns their names. A block
    only partly faded is an error: removing it would change the logits, keeping it would leave
    a hook that no artifact records."""
    blocks = faded(model)
    partial = {n: h.fade for n, h in blocks.items() if h.fade < 1.0}
    if partial:
        shown = ", ".join(f"{n} at {f:.2f}" for n, f in partial.items())
        raise UnsupportedModelError(
            f"finalize: prune_blocks has only partly faded {shown} (1.0 = removed); finalize after the "
            "technique's window ends (its `end`), or lower `end` so the run reaches it")
    for name in blocks:
        _set_module(model, name, nn.Identity())
    return list(blocks)


def groups_that_stay(model: nn.Module, example_inputs, groups: list) -> tuple[list, list[tuple[str, str]]]:
    """The channel groups of `model` (graph.discover_groups) as they are once its fading blocks are
    gone: (groups, skipped layers with the reason). Without fading blocks, `groups` as they are.

    A group whose producing layers all lie inside a dropped block stays as it is: masked while the
    block fades, it leaves with the block at finalize. A group that runs through a block (the trunk of a residual stage, whose channels the
    block's last conv adds into) may have been traced with a layer of the block as its root; such a
    name would name no layer once finalize has removed the block, and would differ from the name the
    allocators give the group, on the model without the block (`allocation_base`), so per-group
    sparsities keyed by that name would miss it. Every group touching a dropped block is therefore
    named and rooted as the model without the block names it (traced once here), its channels
    re-indexed to that root's; the members inside the block stay, masked while the block fades."""
    from .graph import PRUNABLE_ROOTS, discover_groups
    from .model_copy import plain_copy

    blocks = list(faded(model))
    if not blocks:
        return groups, []
    gone = inside_faded(model)
    touching = [g for g in groups if any(m.module in gone for m in g.members)]
    if not touching:
        return groups, []
    base = plain_copy(model)
    for name in blocks:
        _set_module(base, name, nn.Identity())
    # as the allocators trace it (default targets: the name a group gets depends on which layers are ignored)
    base_names = {g.name for g in discover_groups(base, example_inputs, verify=False)[0]}
    modules = dict(model.named_modules())
    kept, skipped = [], []
    for g in groups:
        if not any(m.module in gone for m in g.members):
            kept.append(g)
            continue
        inner = g.name if g.name in gone else next(m.module for m in g.members if m.module in gone)
        block = next(b for b in blocks if inner == b or inner.startswith(b + "."))
        outside = [m for m in g.out_members() if m.module not in gone]
        if not outside:  # leaves with the block; its masks shape the block's output while it fades
            kept.append(g)
            continue
        # a root must carry every channel of the group once (finalize removes the channels through it)
        roots = [m for m in outside if isinstance(modules[m.module], PRUNABLE_ROOTS)
                 and sorted(m.root_idxs) == list(range(g.channels)) and len(set(m.idxs)) == g.channels]
        root = next((m for m in roots if m.module in base_names), roots[0] if roots else None)
        if root is None:
            skipped.append((g.name, f"its channels run through block {block!r}, which prune_blocks removes whole, "
                                    "and no layer outside it carries all of them"))
            continue
        to_root = dict(zip(root.root_idxs, root.idxs))
        for m in g.members:
            m.root_idxs = [to_root[c] for c in m.root_idxs]
        g.name = root.module
        kept.append(g)
    return kept, skipped

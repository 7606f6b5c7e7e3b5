"""Coupled channel groups, found by tracing the model with Torch-Pruning's DependencyGraph.

Structured pruning must remove a channel from every layer that shares it: the producing
conv/linear, its BatchNorm, every layer added to it through a residual connection, and the
input side of every consumer. Hand-written lists of layer names break on the first ResNet,
so the groups come from a traced dependency graph. The graph is built on the *plain* model
(before any reparametrization) and groups are recorded by module name, so they stay valid
after masks and quantizers are attached and can be replayed on a freshly built model.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn

PRUNABLE_ROOTS = (nn.Linear, nn.Conv2d)


@dataclass
class Member:
    """One tensor dimension that belongs to a group: `module`'s out- or in-channels at `idxs`."""

    module: str
    kind: str  # "out" (rows of the weight, bias, BN affine) or "in" (columns of the weight)
    idxs: list[int]
    root_idxs: list[int]  # the group channel each of `idxs` corresponds to


@dataclass
class ChannelGroup:
    """A set of channels that must be kept or removed together; `name` is the root layer."""

    name: str
    channels: int
    members: list[Member] = field(default_factory=list)

    def out_members(self) -> list[Member]:
        return [m for m in self.members if m.kind == "out"]

    def layers(self) -> list[str]:
        return sorted({m.module for m in self.members})


def output_layers(model: nn.Module, example_inputs) -> list[str]:
    """Names of the layers whose output tensor *is* the model output (e.g. the classifier).

    Their out-channels are the classes, so they are never structurally pruned.
    """
    seen: dict[int, str] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(id(out), n))
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE_ROOTS)
    ]
    try:
        with torch.no_grad():
            out = model(*_as_tuple(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [seen[id(o)] for o in outs if id(o) in seen]


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def build_graph(model: nn.Module, example_inputs, ignored: list[nn.Module] | None = None):
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, ignored_layers=ignored or [], verbose=False
            )
    finally:
        model.train(was_training)
    return dg


def discover_groups(
    model: nn.Module,
    example_inputs,
    targets: list[str] = ("*",),
    exclude: list[str] = (),
) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """Return the prunable channel groups and, for every skipped layer, why it was skipped."""
    names = {m: n for n, m in model.named_modules()}
    outputs = set(output_layers(model, example_inputs))
    skipped: list[tuple[str, str]] = []
    ignored = []
    for n, m in model.named_modules():
        if not isinstance(m, PRUNABLE_ROOTS):
            continue
        if n in outputs:
            skipped.append((n, "its output is the model output (classes are never removed)"))
            ignored.append(m)
        elif not matches(n, list(targets)):
            skipped.append((n, f"not matched by targets {list(targets)}"))
            ignored.append(m)
        elif matches(n, list(exclude)):
            skipped.append((n, f"matched by exclude {list(exclude)}"))
            ignored.append(m)
    dg = build_graph(model, example_inputs)
    groups: list[ChannelGroup] = []
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_ROOTS):
        root = g[0].dep.target.module
        group = ChannelGroup(name=names[root], channels=len(g[0].idxs))
        for item in g:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Module) or mod not in names:
                continue  # functional ops (add, cat, ...) carry no parameters
            if isinstance(mod, (nn.ReLU, nn.Identity, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                continue
            kind = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                kind = "out"
            group.members.append(
                Member(names[mod], kind, [int(i) for i in item.idxs], [int(i) for i in item.root_idxs])
            )
        groups.append(group)
    grouped = {m.module for g in groups for m in g.out_members()}
    for n, m in model.named_modules():
        if isinstance(m, PRUNABLE_ROOTS) and n not in grouped and n not in {s for s, _ in skipped}:
            skipped.append((n, "coupled with a layer that is not pruned (e.g. the output layer)"))
    return groups, skipped


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)

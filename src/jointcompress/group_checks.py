"""Which traced channel groups structured pruning may touch without changing the logits.

Structured pruning trains with a mask (a removed channel is zeroed in every layer that
produces it) and finalize then removes the channel physically. The two models agree only
when a zeroed channel and an absent channel are the same thing for every operation the
channel passes through. That holds for convolutions, linear layers, BatchNorm (per-channel
statistics) and element-wise activations, but not for

- a normalization whose statistics mix channels (LayerNorm over the channel axis as in
  ConvNeXt / ViT / BERT blocks, GroupNorm, RMSNorm): a zeroed channel still counts in the
  mean and variance, a removed one does not;
- a module with parameters on those channels that the mask does not reach (embeddings,
  position embeddings, class tokens, layer scales, custom modules);
- a reshape that splits the channel axis (e.g. into attention heads), where the traced
  channel indices do not even map onto the layers.

Such groups are left out, each with the reason, and every group that is kept is checked
once on the example input: its channels are zeroed (the masked model) and removed (the
finalized model) and the two outputs must agree. Only groups that pass are pruned.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .layer_types import BATCH_NORMS, CONVOLUTIONS
from .model_call import call_model

PARITY_RTOL = 1e-4  # |masked - removed| <= PARITY_RTOL * max|masked| (+ a float32 floor)


def _is_channel_mixing_norm(mod: nn.Module) -> bool:
    if isinstance(mod, BATCH_NORMS):
        return False
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(mod).__name__.lower()


def _channel_sizes(mod: nn.Module) -> tuple[int, int] | None:
    """(out, in) channel counts of a channel-wise layer, as its weight stores them."""
    if isinstance(mod, BATCH_NORMS):
        return mod.num_features, mod.num_features
    if isinstance(mod, CONVOLUTIONS):
        return mod.out_channels, mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    return None


def parameter_owners(model: nn.Module) -> dict[int, tuple[str, str, nn.Module]]:
    """id(parameter) -> (parameter name, owning module name, owning module)."""
    out = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            out.setdefault(id(p), (f"{mname}.{pname}" if mname else pname, mname, mod))
    return out


def _norm_reason(mod: nn.Module, name: str) -> str:
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):  # each channel normalized on its own
        return (f"its channels pass through {type(mod).__name__} '{name}', which is not sliced with them: a masked "
                "channel's zeros come out of it as its shift (or its running statistics' offset), which the next "
                "layer reads, where a removed channel gives nothing")
    return (f"its channels pass through {type(mod).__name__} '{name}', whose statistics mix channels: a masked "
            "channel still counts in its mean and variance, a removed one does not")


def tied_layers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """layer name -> (the other place its weight or bias is reachable under, which of the two) (both ways: `head.weight =
    emb.weight` names head and emb). Removing channels slices one of the two and unties them: the
    logits stay, but the file stores both tables (a probe: 9.9 KB against 6.7 KB unpruned)."""
    from .session.checks import tied_both_ways

    tied: dict[str, tuple[str, str]] = {}
    for attr in ("weight", "bias"):
        for name, other in tied_both_ways(model, attr).items():
            tied.setdefault(name, (other, attr))
    return tied


def tied_reason(name: str | None, kind: str, tied: dict[str, tuple[str, str]]) -> str | None:
    """Why a member with a tied weight (either way) or a tied bias (its output channels only: a bias has
    no input channels) makes its group unsafe."""
    if name is None or name not in tied or (tied[name][1] == "bias" and kind != "out"):
        return None
    other, attr = tied[name]
    return (f"layer '{name}' shares its {attr} with '{other}' (a tied tensor): removing these channels would slice "
            "one of them and untie the two")


def member_reason(mod: Any, name: str | None, kind: str, idxs: list[int], owners: dict[int, tuple]) -> str | None:
    """Why one traced member makes its group unsafe to prune, or None if it is fine.

    `owners` is parameter_owners(model): a bare parameter in the trace is named by its module.
    """
    if isinstance(mod, nn.Parameter):
        pname, owner_name, owner = owners.get(id(mod), ("an unnamed parameter", "", None))
        if owner is not None and _is_channel_mixing_norm(owner):
            return _norm_reason(owner, owner_name)
        return (f"parameter '{pname}' acts on these channels outside any layer (e.g. a class token, position "
                "embedding or layer scale) and is not masked")
    if type(mod).__name__ == "_OutputOp":  # Torch-Pruning's marker of a model output
        return "these channels are the model output (classes are never removed)"
    if not isinstance(mod, nn.Module) or name is None:
        return None  # a traced function (add, view, cat, ...): checked by verify_groups
    if _is_channel_mixing_norm(mod):
        return _norm_reason(mod, name)
    if isinstance(mod, BATCH_NORMS) and not mod.affine and mod.track_running_stats:
        return (f"{type(mod).__name__} '{name}' has no weight and bias (affine=False): a removed channel still gives "
                "minus its running mean over its deviation, not 0, and the next layer reads it; give it affine=True "
                "to prune these channels")
    if isinstance(mod, nn.Embedding):
        return f"Embedding '{name}' produces these channels (embedding dimensions are not masked)"
    if _is_grouped(mod):  # refused here, not by the trial removal alone, which one lucky draw of channels passed
        return _grouped_reason(name, mod)
    sizes = _channel_sizes(mod)
    if sizes is None:
        if any(True for _ in mod.parameters(recurse=False)):
            from .recurrent import RECURRENT

            fix = (" (convert it first: recurrent.rnn_to_linear(model) gives it Linear layers, whose channels are pruned)"
                   if isinstance(mod, RECURRENT) else "")
            return (f"module '{name}' ({type(mod).__name__}) has parameters on these channels that structured pruning "
                    f"does not handle{fix}")
        return None
    size = sizes[0] if kind == "out" else sizes[1]
    if idxs and max(idxs) >= size:
        return (f"the traced channels do not map onto '{name}' ({type(mod).__name__}, {size} {kind}-channels): "
                "they are reshaped on the way (e.g. split into attention heads; use prune_heads for heads)")
    return None


def _shapes(grad_fn) -> tuple[list[int], list[int]] | None:
    """(input shape, output shape) of the traced operation behind `grad_fn`, when autograd recorded them."""
    try:
        out = list(grad_fn._input_metadata[0].shape)
        producer = grad_fn.next_functions[0][0]
        return list(producer._input_metadata[0].shape), out
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def reshape_reason(node) -> str | None:
    """A reshape that splits the channel axis into more axes ([B, T, C] -> [B, T, heads, C / heads]).

    Removing channels there regroups the survivors into different heads, so the masked and
    the shrunk model differ. A flatten ([B, C, H, W] -> [B, C*H*W]) and a reshape that keeps
    the channel axis last ([B*T, C] -> [B, T, C]) are fine, as is one that only adds axes of size 1
    ([B, C] -> [B, C, 1, 1], a squeeze-and-excitation gate written with view: refused as a head split,
    its trunk's channels stayed unpruned).
    """
    if type(node.module).__name__ != "_ReshapeOp":
        return None
    shapes = _shapes(node.grad_fn)
    if shapes is None:
        return None
    before, after = shapes
    if len(before) == 1 and sorted(after) == [1] * (len(after) - 1) + before and before[0] > 1:
        return (f"a per-channel tensor of {before[0]} values is broadcast over the channels as {after} (a per-channel "
                "parameter such as a learned scale): the pruner does not slice it, so this layer's "
                "channels cannot be removed (prune_structured skips it; exclude it to say so)")
    if [d for d in before if d != 1] == [d for d in after if d != 1]:  # axes of size 1 added: [B, C] -> [B, C, 1, 1]
        return None  # (a squeeze-and-excitation gate broadcast over the map): the channel axis stays whole
    if len(after) > len(before) and before and after and after[-1] != before[-1]:
        return (f"the channels are reshaped from {before} to {after} (split into attention heads): removing some "
                "would regroup the rest into other heads; prune_heads removes whole heads of transformers' BERT-family "
                "models")
    return None


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Every floating tensor of a model output (tensor, tuple, list, dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    return []


def output_gap(reference: Any, other: Any) -> float:
    """max |reference - other| relative to max |reference| over all output tensors (inf if shapes differ).
    Outputs of a forward with gradients on are read detached (a float() of them warned on every finalize)."""
    a, b = ([t.detach() for t in flat_outputs(out)] for out in (reference, other))
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    if not a:
        return 0.0
    diff = max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))
    scale = max(float(x.abs().max()) if x.numel() else 0.0 for x in a)
    return diff / max(scale, 1e-6)


def tolerance(outputs: Any) -> float:
    """PARITY_RTOL for float32 outputs; wider for half precision, where summing fewer terms rounds differently,
    and for float32 on a GPU that may compute in TF32 (10 mantissa bits, as float16: the default for cuDNN
    convolutions), where the shrunk model's kernels round differently from the masked one's."""
    eps = max((_eps(t) for t in flat_outputs(outputs)), default=0.0)
    return max(PARITY_RTOL, 16 * eps)


TF32_EPS = 2.0 ** -10  # TensorFloat-32 keeps float16's 10 mantissa bits


def _eps(t: torch.Tensor) -> float:
    eps = torch.finfo(t.dtype).eps
    return max(eps, TF32_EPS) if t.dtype == torch.float32 and t.is_cuda and _tf32_allowed() else eps


def _tf32_allowed() -> bool:
    """Whether CUDA convolutions or matrix products may run in TF32 (read from the public flags; where they
    cannot be read, as after a mix of PyTorch's old and new precision settings, it is taken as allowed)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return True


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parametrization baked into plain tensors."""
    plain = copy.deepcopy(model).eval()
    for m in plain.modules():
        for pname in list(getattr(m, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(m, pname, leave_parametrized=True)
    return plain


def _drop_sets(groups: list, seed: int = 0) -> dict[str, list[int]]:
    """Half the channels of every group (at least one kept), chosen at random but reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        n_drop = g.channels // 2
        out[g.name] = sorted(torch.randperm(g.channels, generator=gen, device="cpu")[:n_drop].tolist())
    return out


def _run(model: nn.Module, example_inputs):
    with torch.no_grad():
        return call_model(model, example_inputs)


@torch.no_grad()
def zero_channels(model: nn.Module, groups: list, drops: dict[str, list[int]]) -> None:
    """What the structured masks do in training: the dropped channels' rows are zero in every producer."""
    modules = dict(model.named_modules())
    for g in groups:
        dropped = set(drops[g.name])
        for m in g.out_members():
            rows = [i for i, r in zip(m.idxs, m.root_idxs) if r in dropped]
            layer = modules[m.module]
            for pname in ("weight", "bias"):
                t = getattr(layer, pname, None)
                if t is not None and rows:
                    t[rows] = 0


def remove_channels(model: nn.Module, example_inputs, drops: dict[str, list[int]]):
    """What finalize does: remove the dropped channels from every coupled layer; the pruning history."""
    from .graph import build_graph

    modules = dict(model.named_modules())
    dg = build_graph(model, example_inputs)
    for name, drop in drops.items():
        if drop:
            root = modules[name]
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, drop).prune()
    return dg.pruning_history()


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Fresh random weights (fan-in scaled), so the check does not depend on the trained ones.

    Whether zeroing a channel equals removing it is a property of the architecture, not of
    the weights; but freshly initialised or trained weights can hide a difference (e.g. near
    uniform attention makes the grouping of channels into heads invisible).
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu").to(device=p.device, dtype=p.dtype)
        if p.dim() >= 2:
            p.copy_(noise / max(1, p[0].numel()) ** 0.5)
        else:
            p.add_(0.1 * noise)
    # floating buffers too, up only (a running variance stays positive): a buffer that is 0 when the check runs
    # (a centering offset that training updates) hid that a removed channel's output is not zero after it
    for b in model.buffers():
        if b.is_floating_point() and b.numel():
            noise = torch.randn(b.shape, generator=gen, dtype=torch.float32, device="cpu").to(device=b.device, dtype=b.dtype)
            b.add_(0.1 * noise.abs())


def removal_gap(model: nn.Module, example_inputs, groups: list) -> tuple[float, str]:
    """(relative output gap, failure text) between zeroing and removing half of every group's channels.

    The gap is scaled to float32 terms: it is compared with PARITY_RTOL whatever the dtype.
    """
    trial = plain_copy(model)
    randomize(trial)
    drops = _drop_sets(groups)
    zero_channels(trial, groups, drops)
    masked = _run(trial, example_inputs)
    try:
        remove_channels(trial, example_inputs, drops)
        removed = _run(trial, example_inputs)
    except Exception as exc:  # removal or the shrunk forward fails: the group cannot be removed
        return float("inf"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    before, after = flat_outputs(masked), flat_outputs(removed)
    for i, (x, y) in enumerate(zip(before, after)):
        if x.shape != y.shape:  # the channels are (part of) what the model returns
            return float("inf"), (f"the model's output {i} changes shape, {list(x.shape)} -> {list(y.shape)}: these "
                                   "channels are returned by the model, which keeps all of them, so the group is left "
                                   "out (nothing to exclude)")
    return output_gap(masked, removed) * PARITY_RTOL / tolerance(masked), ""


def _is_grouped(mod) -> bool:
    """A grouped convolution that is not depthwise (1 < groups < input channels)."""
    return isinstance(mod, CONVOLUTIONS) and 1 < mod.groups < mod.in_channels


def _grouped_reason(name: str, mod) -> str:
    """Said of its input channels (the layers feeding it) and of its own output channels alike: "they feed" was
    said of the grouped convolution itself."""
    return (f"the grouped convolution '{name}' (groups={mod.groups}) reads or writes these channels in {mod.groups} "
            "groups, which removing some of them would shift (channels are not removed in whole groups, and excluding "
            "it leaves these channels as they are); for them to be pruned, use groups=1 or a depthwise convolution")


def _multiplier(mod) -> int:
    """A depthwise convolution's channel multiplier (outputs per input channel) above 1, else 0."""
    if not isinstance(mod, CONVOLUTIONS) or mod.groups != mod.in_channels or mod.groups == 1:
        return 0
    return mod.out_channels // mod.in_channels if mod.out_channels != mod.in_channels else 0


def _multiplier_reason(name: str, mod) -> str:
    return (f"the depthwise convolution '{name}' (groups={mod.groups}, {mod.in_channels} inputs, {mod.out_channels} "
            f"outputs) has a channel multiplier of {_multiplier(mod)}: each input channel makes {_multiplier(mod)} "
            "outputs, which removing channels one for one misaligns; exclude it, or give it as many outputs as inputs")


def _cause(model: nn.Module, group) -> str:
    """The likely reason a group's removal changes the outputs: a grouped convolution among its members
    (not depthwise: removing channels of one group shifts the others' split) or a depthwise one with a
    channel multiplier, else the general one."""
    modules = dict(model.named_modules())
    for member in group.members:
        mod = modules.get(member.module)
        if _is_grouped(mod):
            return _grouped_reason(member.module, mod)
        if _multiplier(mod):
            return _multiplier_reason(member.module, mod)
    return ("between them an operation mixes the channels or gives a zeroed channel a non-zero output (e.g. a "
            "normalization written as functions, a reshape into heads, an offset or sigmoid applied after the layer, "
            "a concatenation with the model's input)")


def verify_groups(model: nn.Module, example_inputs, groups: list) -> dict[str, str]:
    """Root name -> reason, for every group whose removal changes the output on `example_inputs`.

    All groups are tried at once; only when that fails are they bisected, so a model whose
    groups are all fine costs one copy, one trace and two forward passes.
    """
    groups = [g for g in groups if g.channels > 1 and g.out_members()]
    if not groups:
        return {}
    gap, failure = removal_gap(model, example_inputs, groups)
    if gap <= PARITY_RTOL:
        return {}
    if len(groups) == 1:
        if failure.startswith("the model's output"):
            return {groups[0].name: failure}
        what = f"removing them fails ({failure})" if failure else f"removing them changes the outputs by {gap:.2g} (relative)"
        return {groups[0].name: f"zeroed and removed channels disagree on the example input: {what}; {_cause(model, groups[0])}"}
    half = len(groups) // 2
    bad = {**verify_groups(model, example_inputs, groups[:half]), **verify_groups(model, example_inputs, groups[half:])}
    if not bad:  # each half is fine alone but not together: keep none of them
        bad = {g.name: "removing it together with other groups changes the outputs on the example input" for g in groups}
    return bad

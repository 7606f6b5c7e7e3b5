"""Coupled channel groups, found by tracing the model with Torch-Pruning's DependencyGraph.

Structured pruning must remove a channel from every layer that shares it: the producing
conv/linear, its BatchNorm, every layer added to it through a residual connection, and the
input side of every consumer. Hand-written lists of layer names break on the first ResNet,
so the groups come from a traced dependency graph. The graph is built on the *plain* model
(before any reparametrization) and groups are recorded by module name, so they stay valid
after masks and quantizers are attached and can be replayed on a freshly built model.
"""
from __future__ import annotations

import contextlib
import fnmatch
import signal
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .block_drop import traced_whole
from .errors import UnsupportedModelError
from .group_checks import member_reason, parameter_owners, reshape_reason, tied_layers, tied_reason, verify_groups
from .layer_types import BATCH_NORMS, COMPRESSIBLE
from .model_call import call_model, evaluating, model_device, to_device

PRUNABLE_ROOTS = COMPRESSIBLE


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


def group_device(group: ChannelGroup, modules: dict[str, nn.Module]) -> torch.device:
    """Where the group's layers keep their weights: its channel norms and masks are made there."""
    for m in group.out_members():
        weight = getattr(modules[m.module], "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    return torch.device("cpu")


def channel_norms(group: ChannelGroup, modules: dict[str, nn.Module], weight_of=None) -> torch.Tensor:
    """The L2 norm of each of the group's channels over its producing layers' weights, `weight_of(layer)`
    (default: the layer's weight; None leaves the layer out), a 1-d weight (a norm's scale) counted per
    channel: the magnitude criterion of structured pruning and of the sensitivity scan."""
    weight_of = weight_of or (lambda layer: getattr(layer, "weight", None))
    sq = torch.zeros(group.channels, device=group_device(group, modules))
    for m in group.out_members():
        weight = weight_of(modules[m.module])
        if not isinstance(weight, torch.Tensor):
            continue
        w = weight.detach()
        rows = w.flatten(1).pow(2).sum(1) if w.dim() > 1 else w.pow(2)
        sq.index_add_(0, torch.as_tensor(m.root_idxs, device=sq.device), rows[torch.as_tensor(m.idxs, device=sq.device)])
    return sq.sqrt()


def root_weight(layer: nn.Module):
    """The weight of a prunable root layer (conv, linear), else None: `channel_norms` over the layers
    whose channels the group removes, norms and others left out."""
    return layer.weight if isinstance(layer, PRUNABLE_ROOTS) else None


def output_layers(model: nn.Module, example_inputs) -> list[str]:
    """Names of the layers whose output tensor *is* the model output (e.g. the classifier).

    Their out-channels are the classes, so they are never structurally pruned. The outputs
    are held until the comparison: a freed tensor's id can be reused by the model output.
    """
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, out)))
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE_ROOTS)
    ]
    try:
        with torch.no_grad(), evaluating(model):
            out = call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [n for o in outs for n, t in seen if t is o]


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@contextlib.contextmanager
def frozen_stay_frozen(model: nn.Module):
    """Around tracing the channel graph (which needs every parameter to want a gradient) and
    Torch-Pruning's pruning (which rebuilds a pruned layer's tensors as new nn.Parameters that
    want one): the parameters frozen before (requires_grad False) are frozen again after, by name."""
    frozen = [(mn, pn) for mn, m in model.named_modules() for pn, p in m.named_parameters(recurse=False)
              if not p.requires_grad]
    try:
        yield
    finally:
        modules = dict(model.named_modules())
        for mn, pn in frozen:
            p = getattr(modules.get(mn), pn, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)


def build_graph(model: nn.Module, example_inputs, ignored: list[nn.Module] | None = None):
    """Torch-Pruning's DependencyGraph of `model`; a model it cannot trace raises UnsupportedModelError.
    Example inputs of one sample are traced as two (where the model takes them): at batch 1 torch runs a
    Linear layer through views of [C] as [1, C], which read as a per-channel tensor broadcast over the
    channels, and every layer of an MLP was skipped (prepare with x[:1], or dry-run --input-shape 1,20)."""
    doubled = _two_samples(example_inputs)
    if doubled is not None:
        try:
            return _build_graph(model, doubled, ignored)
        except UnsupportedModelError:  # a model made for one sample: traced as given
            pass
    return _build_graph(model, example_inputs, ignored)


def _two_samples(example_inputs):
    """Batch-first example inputs of one sample as two copies of it (None where they are not of one sample)."""
    def double(x):
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() >= 2 and len(x) == 1 else None

    if isinstance(example_inputs, dict):
        tensors = {k: double(v) for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
        return {**example_inputs, **tensors} if tensors and all(v is not None for v in tensors.values()) else None
    if isinstance(example_inputs, (tuple, list)):
        doubled = [double(x) for x in example_inputs]
        return type(example_inputs)(doubled) if doubled and all(d is not None for d in doubled) else None
    return double(example_inputs)


def _build_graph(model: nn.Module, example_inputs, ignored: list[nn.Module] | None = None):
    try:
        # the graph is traced through autograd, which records nothing of a frozen layer fed by inputs
        # that need no gradient (a frozen backbone would have no channel groups): freezing is about
        # training, not structure, so every parameter needs a gradient while the graph is traced
        # a fading block is traced whole (block_drop.traced_whole): it still runs, and reads its input's channels
        with evaluating(model), traced_whole(model), frozen_stay_frozen(model), torch.enable_grad(), \
                warnings.catch_warnings():
            for p in model.parameters():
                p.requires_grad_(True)
            # its channel-count inference gives up on long chains of concatenations (a recurrent loop
            # unrolled over time) with this warning; groups through them are checked by verify_groups
            warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
            dg = _graph_class()().build_dependency(  # it calls the model itself: the inputs go where it is
                model, example_inputs=to_device(example_inputs, model_device(model)), ignored_layers=ignored or [],
                verbose=False)
    except Exception as exc:
        raise UnsupportedModelError(
            f"structured pruning cannot trace {type(model).__name__}: the channel dependency graph fails "
            f"{_failing_node(model, exc)}({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). "
            + _cache_hint(model, exc) +
            "Use prune_unstructured / quant_lsq for this model; a Hugging Face transformer takes prune_heads / "
            "prune_ffn / prune_layers instead (BERT-family classifiers), or prune_ffn (Llama, Mistral, GPT-2 causal LMs)"
        ) from exc
    return dg


def _cache_hint(model: nn.Module, exc: Exception) -> str:
    """A transformers model that returns its cache of keys and values beside the logits: the trace fails on that
    cache ('tuple' object has no attribute 'grad_fn'), and with `use_cache` off the same model traced."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False) or "grad_fn" not in str(exc):
        return ""
    return ("It returns its cache of keys and values beside the logits (config.use_cache), which the trace cannot "
            "follow: set model.config.use_cache = False before prepare() / compress(). Else: ")


def _graph_class():
    """Torch-Pruning's DependencyGraph, which takes the sizes of a concatenation's inputs from the traced
    tensors themselves (autograd records each one's shape) instead of inferring them back through the
    graph: its inference gives up on long chains (a recurrent loop unrolled over time, e.g. a
    bidirectional LSTM's final states concatenated), and a concatenation with an unknown input then
    failed the whole trace, so a model that had prunable groups elsewhere had none."""
    import torch_pruning as tp

    class Graph(tp.DependencyGraph):
        def _build_dependency(self, module2node):
            super()._build_dependency(module2node)
            for node in module2node.values():
                if node.type == tp.ops.OPTYPE.CONCAT and node.module.concat_sizes is None:
                    node.module.concat_sizes = _channel_concat_sizes(self, node)

    return Graph


def _channel_concat_sizes(graph, node) -> list[int] | None:
    """The traced input sizes of a concatenation whose output's channels are known downstream and are their
    sum: a concatenation of channels. Dim 1 is not always channels (a transformer's [batch, tokens, width]
    joins a class token on it); there the sizes are left to Torch-Pruning, which skips the index mapping of
    a concatenation it cannot size, as before."""
    from torch_pruning.dependency import shape_infer

    sizes = _traced_concat_sizes(node)
    if sizes is None:
        return None
    try:
        joined = shape_infer.infer_in_channels_recursively(graph, node, [0])
    except Exception:  # noqa: BLE001 - its inference failing on this graph: no sizes from here either
        return None
    return sizes if joined == sum(sizes) else None


def _traced_concat_sizes(node) -> list[int] | None:
    """The channels (dim 1) of each input of a traced torch.cat, in the order of the node's inputs, or None
    where the node's inputs are not its grad_fn's inputs one for one (a leaf, an input that needs no
    gradient, one tensor twice: the graph leaves those out or merges them)."""
    grad_fn = node.grad_fn
    if getattr(grad_fn, "_saved_dim", None) != 1:
        return None  # not the channels: Torch-Pruning maps no index through it
    inputs = [fn for fn, _ in grad_fn.next_functions]
    if any(fn is None or "accumulategrad" in fn.name().lower() for fn in inputs) or len(set(inputs)) != len(inputs) \
            or [n.grad_fn for n in node.inputs] != inputs:
        return None
    try:
        return [int(fn._input_metadata[nr].shape[1]) for fn, nr in grad_fn.next_functions]
    except (AttributeError, IndexError, RuntimeError):  # a torch without the metadata: inferred as before
        return None


def _failing_node(model: nn.Module, exc: BaseException) -> str:
    """'at OP after MODULE ' for the innermost Torch-Pruning graph node the failure happened on."""
    from torch_pruning.dependency.node import Node

    node, tb = None, exc.__traceback__
    while tb is not None:
        node = next((v for v in tb.tb_frame.f_locals.values() if isinstance(v, Node)), node)
        tb = tb.tb_next
    if node is None:
        return ""
    names = {m: n for n, m in model.named_modules()}
    if node.module in names:
        return f"at module '{names[node.module]}' ({type(node.module).__name__}) "
    op = type(node.module).__name__.strip("_").removesuffix("Op").lower() or "an"
    seen, todo = set(), list(node.inputs)
    while todo and len(seen) < 200:  # the nearest named module upstream of the op
        n = todo.pop(0)
        if n.module in names:
            return f"at a {op} operation after module '{names[n.module]}' ({type(n.module).__name__}) "
        if id(n) not in seen:
            seen.add(id(n))
            todo.extend(n.inputs)
    return f"at a {op} operation "


def discover_groups(
    model: nn.Module,
    example_inputs,
    targets: list[str] = ("*",),
    exclude: list[str] = (),
    verify: bool = True,
) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """Return the prunable channel groups and, for every skipped layer, why it was skipped.

    A group is prunable only if removing its channels at finalize gives exactly what the
    mask gave in training (group_checks.py); with `verify` every such group is also checked
    on `example_inputs` (zeroed vs removed channels).
    """
    skipped, ignored = _selection(model, example_inputs, list(targets), list(exclude))
    dg = build_graph(model, example_inputs)
    groups, unsafe = _traced_groups(model, dg, ignored)
    if verify and groups:
        unsafe.update({name: (g, reason) for name, reason in verify_groups(model, example_inputs, groups).items()
                       for g in groups if g.name == name})
        groups = [g for g in groups if g.name not in unsafe]
    for name, (g, reason) in unsafe.items():
        skipped.append((name, reason))
        for m in g.out_members():
            if m.module != name and m.module not in {s for s, _ in skipped}:
                skipped.append((m.module, f"shares its channels with {name}, which is not pruned: {reason}"))
    grouped = {m.module for g in groups for m in g.out_members()}
    done = {s for s, _ in skipped}
    tied_in_groups = _grouped_convolutions(model)
    for n, m in model.named_modules():
        if isinstance(m, PRUNABLE_ROOTS) and n not in grouped and n not in done:
            skipped.append((n, _not_grouped_reason(n, tied_in_groups)))
    return groups, skipped


def _grouped_convolutions(model: nn.Module) -> dict[str, int]:
    """Convolutions of groups that are neither 1 nor one per input channel (depthwise): their channels are tied
    in blocks, which the graph does not remove channel by channel, so they and the layers coupled with them stay."""
    return {n: m.groups for n, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels}


def _not_grouped_reason(name: str, tied_in_groups: dict[str, int]) -> str:
    """Why a layer in no channel group stays whole: it is a grouped convolution, or coupled with one or with the
    output layer (a grouped convolution far from the output was said to be "e.g. the output layer")."""
    if name in tied_in_groups:
        return (f"a grouped convolution (groups={tied_in_groups[name]}): its channels are tied in blocks the pruning "
                "does not remove channel by channel, so it and the layers coupled with it stay whole")
    if tied_in_groups:
        shown = ", ".join(f"'{n}'" for n in list(tied_in_groups)[:3])
        return f"coupled with a layer that is not pruned (the output layer, or a grouped convolution: {shown})"
    return "coupled with a layer that is not pruned (e.g. the output layer)"


def _selection(model: nn.Module, example_inputs, targets: list[str], exclude: list[str]):
    """(skipped layers with the reason, modules the graph must ignore): outputs, targets, exclude."""
    outputs = set(output_layers(model, example_inputs))
    recurrent = recurrent_layers(model)
    skipped: list[tuple[str, str]] = []
    ignored = []
    from .recurrent import RECURRENT

    for n, m in model.named_modules():
        if isinstance(m, RECURRENT):  # not a layer the graph prunes, and dry-run listed it nowhere
            skipped.append((n, f"an nn.{type(m).__name__}: structured pruning does not prune its packed gates; "
                               "jointcompress.recurrent.rnn_to_linear(model) gives it Linear layers, whose channels "
                               "are pruned"))
            continue
        if not isinstance(m, PRUNABLE_ROOTS):
            continue
        if n in recurrent:
            is_input = n.rsplit(".", 1)[-1].startswith("ih_")  # an input projection, not the recurrent one
            follows = " (its input channels follow the layer before it)" if is_input else ""
            skipped.append((n, f"a layer of the recurrent module '{recurrent[n]}': its outputs are split into gates "
                               f"and fed back at every step{follows}"))
        elif n in outputs:
            skipped.append((n, "its output is the model output (classes are never removed)"))
        elif not matches(n, targets):
            skipped.append((n, f"not matched by targets {targets}"))
        elif matches(n, exclude):
            skipped.append((n, f"matched by exclude {exclude}"))
        else:
            continue
        ignored.append(m)
    return skipped, ignored


def recurrent_layers(model: nn.Module) -> dict[str, str]:
    """Layer name -> the name of the `recurrent.LinearRNN` it belongs to."""
    from .recurrent import LinearRNN

    return {f"{n}.{c}" if n else c: n for n, m in model.named_modules() if isinstance(m, LinearRNN)
            for c, _ in m.named_children()}


def _traced_groups(model: nn.Module, dg, ignored) -> tuple[list[ChannelGroup], dict[str, tuple]]:
    """The dependency graph's groups as ChannelGroups: (safe ones, root -> (group, reason) for unsafe ones)."""
    names = {m: n for n, m in model.named_modules()}
    owners, tied = parameter_owners(model), tied_layers(model)
    groups, unsafe = [], {}
    searched = _time_limited(dg.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_ROOTS), names)
    for g in _search_failures_named(searched, model):
        root = g[0].dep.target.module
        group, reasons = ChannelGroup(name=names[root], channels=len(g[0].idxs)), []
        for item in g:
            mod = item.dep.target.module
            kind = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if isinstance(mod, BATCH_NORMS):
                kind = "out"
            idxs = [int(i) for i in item.idxs]
            name = names.get(mod) if isinstance(mod, nn.Module) else None
            reason = (reshape_reason(item.dep.target) or tied_reason(name, kind, tied)
                      or member_reason(mod, name, kind, idxs, owners))
            if reason:
                reasons.append(reason)
            if reason or not isinstance(mod, nn.Module) or mod not in names or not _has_parameters(mod):
                continue  # functional ops (add, cat, ...) and parameter-free modules carry nothing to mask
            group.members.append(Member(names[mod], kind, idxs, [int(i) for i in item.root_idxs]))
        if reasons:  # a normalization, then a split into heads, are the reasons most worth naming
            best = [r for r in reasons if "statistics" in r] + [r for r in reasons if "heads" in r] + reasons
            unsafe[group.name] = (group, best[0])
        else:
            groups.append(group)
    return groups, unsafe


GROUP_SECONDS = 60.0  # one channel group taking longer than this to trace means the tracer is looping
# after the first alarm, again every this many seconds: a raise that lands in code which swallows
# exceptions (a finalizer run by the garbage collector mid-search) is repeated until one gets out
ALARM_REPEAT_SECONDS = 0.5


class _Timeout(Exception):
    pass


def _search_failures_named(groups, model: nn.Module):
    """Yield Torch-Pruning's groups; its search failing inside (an IndexError on an unconverted nn.GRU)
    becomes an UnsupportedModelError that names what to convert or exclude."""
    from .recurrent import packed_recurrent

    try:
        yield from groups
    except (IndexError, KeyError, ValueError, RuntimeError, AttributeError, TypeError) as exc:
        rnn = packed_recurrent(model)
        fix = (f"its recurrent layers ({', '.join(rnn)}) must be converted first: "
               "jointcompress.recurrent.rnn_to_linear(model) gives them Linear layers, whose channels are pruned"
               if rnn else "exclude the layers around the failing operation from prune_structured, or use "
               "prune_unstructured / quant_lsq for them (`jointcompress dry-run` lists the groups)")
        raise UnsupportedModelError(f"structured pruning cannot trace this model's channel groups: the dependency "
                                    f"search failed ({type(exc).__name__}: {str(exc)[:120]}); {fix}") from exc


def _time_limited(groups, names: dict):
    """Yield from Torch-Pruning's group generator, giving up on one group after GROUP_SECONDS.

    Its search can loop without end on some index mappings (seen on Llama attention, whose
    key/value heads are repeated for grouped-query attention); then the root module being traced is
    named in an UnsupportedModelError instead of hanging. The alarm repeats until its exception
    reaches here: one raised inside a finalizer is swallowed (a CI run hung that way). Off the main
    thread (no SIGALRM) it yields without a limit.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield from groups
        return
    root = {}

    def on_alarm(signum, frame):
        while frame is not None and frame.f_code.co_name != "get_all_groups":
            frame = frame.f_back
        if frame is not None:
            root.setdefault("module", frame.f_locals.get("m"))
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        while True:
            signal.setitimer(signal.ITIMER_REAL, GROUP_SECONDS, ALARM_REPEAT_SECONDS)
            try:
                group = next(groups)
            except StopIteration:
                return
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            yield group
    except _Timeout:
        name = names.get(root.get("module"), "a layer")
        raise UnsupportedModelError(
            f"structured pruning cannot trace the channel group of '{name}': the dependency search did not finish in "
            f"{GROUP_SECONDS:.0f} s (it loops on channels that are repeated, sliced or concatenated, e.g. grouped-query "
            "attention or rotary position embeddings). Exclude the attention layers from prune_structured "
            "(e.g. exclude: ['*self_attn*']) or use prune_unstructured / quant_lsq for them"
        ) from None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _has_parameters(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters(recurse=False))

"""Layers a technique cannot compress correctly, found before training (no transformers import:
a model holding a transformers layer has imported transformers already)."""
from __future__ import annotations

import sys

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2's projections: x @ W + b with W stored [in, out])."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (hooks, children, flags)


def _held_tensors(module: nn.Module):
    """(attribute, tensor) for every tensor `module` holds itself: its parameters and buffers, and plain
    attributes (also in a list, tuple or dict), so that a weight referenced anywhere else is seen."""
    for attr, value in vars(module).items():
        if attr in ("_parameters", "_buffers"):
            yield from ((k, t) for k, t in value.items() if t is not None)
        elif attr in _MODULE_INTERNALS:
            continue
        elif isinstance(value, torch.Tensor):
            yield attr, value
        elif isinstance(value, (list, tuple, dict)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            yield from ((f"{attr}[{k!r}]", t) for k, t in items if isinstance(t, torch.Tensor))


def _tensor_slots(model: nn.Module) -> dict[int, dict[tuple[int, str], str]]:
    """id(tensor) -> {(id(owner module), attribute): name}, in model order. One module registered under
    two names is one owner, so one slot; a module's `weight` is named by the module (lm_head)."""
    slots: dict[int, dict[tuple[int, str], str]] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for attr, t in _held_tensors(mod):
            name = prefix if attr == "weight" and prefix else f"{prefix}.{attr}".lstrip(".")
            slots.setdefault(id(t), {}).setdefault((id(mod), attr), name)
    return slots


def nonfinite_tensors(named) -> list[str]:
    """Names of the floating tensors among (name, tensor) pairs that hold a NaN or an infinity: a model's
    parameters (not its buffers, which may hold -inf masks on purpose) or a loaded state dict."""
    return [name for name, t in named
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def tied_weights(model: nn.Module, attr: str = "weight") -> dict[str, str]:
    """module name -> another name its weight Parameter is reachable under: another module's weight
    (lm_head -> wte: of two modules the later one is named) or a loose parameter or attribute
    (enc -> dec_w, a decoder used as `h @ self.dec_w`). Training sees the float original through the
    other name, and finalize bakes the compressed weight into that same Parameter: the logits change.
    The same module under two names (`self.b = self.a`) is one layer, not a tie. `attr="bias"`: the
    same for biases (`b.bias = a.bias`), which structured pruning masks and quant_lsq rounds."""
    all_slots = _tensor_slots(model)
    tied: dict[str, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = mod._parameters.get(attr)
        if w is None:
            continue
        own, slots = (id(mod), attr), all_slots[id(w)]
        others = [s for s in slots if s != own]
        if not others or (next(iter(slots)) == own and others[0][1] == attr):
            continue  # untied, or the first of two tied layers (the later one names it)
        tied[name] = slots[others[0]]
    return tied


def tied_both_ways(model: nn.Module, attr: str = "weight") -> dict[str, str]:
    """tied_weights read both ways: whichever of two tied layers comes first, compressing either changes
    the other at finalize. The later layer -> where its tensor is also reachable; that place's layer (for a
    bias, the module holding it) -> the later layer's name (with `.bias` for a bias)."""
    pairs = tied_weights(model, attr)
    suffix = "" if attr == "weight" else f".{attr}"
    both = {(other.rsplit(".", 1)[0] if suffix else other): later + suffix for later, other in pairs.items()}
    return {**both, **pairs}


def attached_layers(model: nn.Module) -> list[str]:
    """Layers that still carry this package's masks or quantizers: a model given to compress() or
    prepare() before, and not finalized (a notebook cell run twice). Compressing it again would
    stack a second mask and quantizer on each weight."""
    from torch.nn.utils import parametrize

    found = []
    for name, m in model.named_modules():
        ours = parametrize.is_parametrized(m) and any(
            type(p).__module__.startswith("jointcompress") for plist in m.parametrizations.values() for p in plist)
        if ours or type(getattr(m, "input_quant", None)).__name__ == "LSQActivation":  # a finalized one is frozen
            found.append(name)
    return found


def unsized_lazy(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of lazy layers (nn.LazyLinear, ...) not sized yet: they get their
    shapes on the model's first call, and nothing can be masked, quantized or loaded into them before it."""
    from torch.nn.parameter import is_lazy

    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if is_lazy(t)]


def refuse_scripted(model: nn.Module) -> None:
    """A TorchScript module (torch.jit.script or trace) has no eager forward to hook nor layers to parametrize:
    the checks failed on its wrapped attributes ("'OrderedDictWrapper' object has no attribute 'get'")."""
    if isinstance(model, torch.jit.ScriptModule):
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script or torch.jit.trace): "
            "the techniques parametrize an eager nn.Module's layers. Pass the nn.Module it was made from, and "
            "script or trace the compressed model after finalize")


def check_model_tensors(model: nn.Module) -> None:
    """Tensors no run can carry, named before training. A buffer or parameter registered as an expanded view
    (stride 0 over several elements, `t.expand(n)`) trained to the end, and then restoring the best epoch's
    state failed in load_state_dict ("more than one element ... refers to a single memory location"): the run
    was lost."""
    from torch.nn.parameter import is_lazy

    from ..errors import RecipeError

    expanded = [(n, t.numel()) for n, t in model.state_dict(keep_vars=True).items()  # a non-persistent one is never loaded
                if isinstance(t, torch.Tensor) and not is_lazy(t)
                and any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape))]
    if expanded:
        name, count = expanded[0]
        raise RecipeError(f"the model's tensor '{name}' is an expanded view (stride 0: its {count} elements share one "
                          "memory location), into which no state can be loaded, as the run does to restore its best "
                          "epoch; register a copy of it instead (`.expand(...).clone()`)")


def non_tensor_state(model: nn.Module) -> tuple[str, object] | None:
    """The first entry of the model's state dict that is no tensor (a module's get_extra_state(), a quantized
    module's settings), or None."""
    return next(((k, v) for k, v in model.state_dict(keep_vars=True).items() if not isinstance(v, torch.Tensor)), None)


def non_tensor_message(key: str, value, holds: str) -> str:
    """Why `key`'s value cannot be kept where `holds` says (the artifact; the built-in loop's snapshots)."""
    return (f"{key}: the model's state dict holds a {type(value).__name__} there, not a tensor (a module's "
            f"get_extra_state(), or a setting of a quantized module); {holds}: keep what it holds in a buffer "
            "(register_buffer) instead")


def check_teacher(model: nn.Module, teacher: nn.Module | None) -> None:
    """The teacher must stay as it is: `teacher=model` (the same object) or a teacher built from the
    model's own layers would be masked, quantized and trained with it, and distillation would pull
    the model toward itself (and put it in eval mode, where the teacher runs)."""
    if teacher is None:
        return
    from ..errors import RecipeError

    mine = {id(p) for p in model.parameters()}
    shared = [n for n, p in teacher.named_parameters() if id(p) in mine]
    if shared:
        what = ("is the model being compressed" if teacher is model else
                f"shares {len(shared)} parameters with the model being compressed (e.g. '{shared[0]}')")
        raise RecipeError(f"the teacher {what}; the teacher must stay as it is while the model is compressed: pass a copy "
                          "made before compressing, teacher = copy.deepcopy(model)")


def weight_problem(module: nn.Module) -> str | None:
    """Why a selected layer's weight cannot carry the techniques' parametrizations, or None.

    Another library's parametrization on it (weight_norm, spectral_norm) would be baked in with
    ours by finalize while the techniques read and store only their own input; the old hook-based
    weight_norm and spectral_norm recompute the weight every forward, so it is no Parameter to
    parametrize; an Embedding's max_norm rescales its stored rows in place on every forward, off the
    grid finalize put them on; and the step sizes, masks and estimates the techniques train are
    float32, which parametrize refuses to put on a weight of another dtype. Each is fixed in one call
    before compressing (or by excluding the layer)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        foreign = [type(p).__name__ for p in module.parametrizations.weight
                   if not type(p).__module__.startswith("jointcompress")]
        if foreign:
            return (f"its weight already has a parametrization ({', '.join(foreign)}), which the techniques would "
                    "stack on and finalize would bake in; make it permanent first with "
                    "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') (the layer computes the same), "
                    "before any deep copy of the model (a teacher): a copy of a parametrized layer shares its class "
                    "with the original, and removing the parametrization from one breaks the other")
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter):
        return _hooked_weight(module)
    if getattr(module, "max_norm", None) is not None and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return (f"its max_norm={module.max_norm} rescales the table's rows in place on every forward, so the finalized "
                "weights would drift off the quantization grid the artifact stores them on; exclude the layer, or build "
                "it with max_norm=None")
    if w.dtype != torch.float32:
        return (f"its weight is {w.dtype}, and the techniques train float32 weights (their step sizes, masks and "
                "estimates are float32); call model.float() (and teacher.float()) before compressing: the artifact "
                "stores the low-bit weights either way")
    return None


def _hooked_weight(module: nn.Module) -> str | None:
    """Why a weight that is no Parameter cannot be compressed: the old hook-based weight_norm and
    spectral_norm recompute it from weight_g / weight_v or weight_orig / weight_u / weight_v on every
    forward, so there is no Parameter to parametrize (torch raised a bare ValueError)."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
        return ("its weight is recomputed every forward by torch.nn.utils.weight_norm's hook; remove it first with "
                "torch.nn.utils.remove_weight_norm(layer) (the layer computes the same)")
    hooked = any(isinstance(h, SpectralNorm) for h in module._forward_pre_hooks.values())
    if hooked or all(hasattr(module, n) for n in ("weight_orig", "weight_u", "weight_v")):
        return ("its weight is recomputed every forward from weight_orig by torch.nn.utils.spectral_norm's hook; remove "
                "it first with torch.nn.utils.remove_spectral_norm(layer) (the layer keeps the normalised weight it "
                "computes in eval mode)")
    return None

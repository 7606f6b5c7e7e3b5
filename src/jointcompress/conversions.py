"""Modules whose weights belong to no Linear layer, and the exact conversions that make them so.

The techniques compress the weights of `nn.Linear` and the convolutions. torch's `nn.MultiheadAttention`
(its packed query / key / value projection) and its recurrent modules (`nn.LSTM`, `nn.GRU`, `nn.RNN`:
loose per-layer parameters) hold theirs elsewhere; `attention.mha_to_linear` and
`recurrent.rnn_to_linear` swap them for modules computing the same function over Linear layers.
Here: the in-place swap both use, and the hint that names what a model still holds unconverted.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch.nn.utils import parametrize

from .errors import JointCompressError


def swap_modules(model: nn.Module, kinds, convert: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """Replace every submodule of type `kinds` (a type or a tuple of types) by `convert(module, name)`,
    in place; returns the model (the converted module itself if `model` is one).
    A module reachable under several names (a siamese encoder, `self.b = self.a`) is converted once and
    every name points at the one converted module, so the weights stay tied through the run."""
    if isinstance(model, kinds):
        return convert(model, "")
    converted: dict[int, nn.Module] = {}
    for name, module in [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, kinds)]:
        if id(module) not in converted:
            converted[id(module)] = convert(module, name)
        model.set_submodule(name, converted[id(module)])
    return model


def require_plain(owner: str, layers) -> None:
    """Refuse to hand the Linear `layers` of the converted module `owner` back to torch's module while a
    technique's parametrization is still on one of them (torch's module would drop it)."""
    layers = list(layers)  # read twice
    if any(parametrize.is_parametrized(layer) for layer in layers):
        raise JointCompressError(f"'{owner}': its Linear layers are still parametrized; call finalize(model) first")
    from .techniques.quant_lsq import FrozenInputQuant

    # torch's module has no place for the rounding: its logits would change without a word
    if any(isinstance(getattr(layer, "input_quant", None), FrozenInputQuant) for layer in layers):
        raise JointCompressError(f"'{owner}': its Linear layers round their inputs (quant_lsq activations: true, kept "
                                 "by finalize), which torch's module cannot do; keep the converted module, which "
                                 "computes the same function, or compress without activation quantization")


def named_hint(names: list[str], holds: str, conversion: str) -> str:
    """'; <holds> ('first' and N more): <conversion>' for size errors and warnings; empty without names."""
    if not names:
        return ""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"; {holds} ('{names[0]}'{more}): {conversion}"


def conversion_hint(model: nn.Module) -> str:
    """Every kind of unconverted module in `model`, each with the conversion that compresses it,
    and the layer types no technique compresses (left in fp32, their bytes in the file's rest)."""
    from .attention import packed_attention_hint
    from .layer_types import TRANSPOSED_CONVOLUTIONS
    from .recurrent import packed_recurrent_hint

    transposed = [n for n, m in model.named_modules() if isinstance(m, TRANSPOSED_CONVOLUTIONS)]
    other, share = other_weights(model)
    return packed_attention_hint(model) + packed_recurrent_hint(model) + named_hint(
        transposed, "transposed convolutions store their weight as [in, out / groups, *kernel], which no technique "
        "compresses", "they are stored in fp32, whole") + named_hint(
        other, "modules of other types hold weight matrices no technique acts on (nn.Bilinear, a layer's own "
        "nn.Parameter)", f"they are stored in fp32, whole ({100 * share:.0f}% of the model's parameters); build them "
        "from nn.Linear / convolutions to compress them")


# the share of a model's parameters in weight matrices of other modules from which they are named (a ViT's position
# embedding and class token, a few percent, are not)
OTHER_WEIGHTS_SHARE = 0.1


def other_weights(model: nn.Module) -> tuple[list[str], float]:
    """(modules holding weight matrices (2-D or more) of their own that no technique selects and no other hint
    names, largest first; their share of the model's parameters), the names only from OTHER_WEIGHTS_SHARE up. A
    custom layer's own nn.Parameter and an nn.Bilinear held 99.9% of a probe's model: prune_unstructured at 0.9
    reported 0.901 on the small head it did select, and the file was 0.05% under fp32, without a word."""
    from .layer_types import COMPRESSIBLE, TRANSPOSED_CONVOLUTIONS
    from .session.checks import is_conv1d

    named_elsewhere = (*COMPRESSIBLE, *TRANSPOSED_CONVOLUTIONS, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
                       nn.RNNBase)
    seen, sizes, total = set(), {}, 0
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)
               if id(p) not in seen and not isinstance(p, nn.parameter.UninitializedParameter)]  # a lazy layer's
        seen.update(id(p) for p in own)
        total += sum(p.numel() for p in own)
        if isinstance(module, named_elsewhere) or is_conv1d(module) or ".parametrizations" in name:  # a technique's
            continue
        matrices = sum(p.numel() for p in own if p.dim() >= 2)
        if matrices:
            sizes[name or type(module).__name__] = matrices
    share = sum(sizes.values()) / max(1, total)
    return (sorted(sizes, key=sizes.get, reverse=True) if share >= OTHER_WEIGHTS_SHARE else []), share

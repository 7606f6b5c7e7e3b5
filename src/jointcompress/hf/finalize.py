"""Make a jointly compressed HF classifier permanent: bake, then remove units physically.

After `api.compress` the HF model still carries the training machinery: forward pre-hooks
multiplying head / FFN-neuron masks in, and LSQ fake-quant parametrizations on its Linear
weights. finalize_hf
  1. removes the mask hooks (prune_heads / prune_ffn techniques),
  2. removes every parametrization with leave_parametrized=True, so each weight becomes its
     fake-quantized value (on the LSQ grid: at most 2^b distinct values per row),
  3. physically removes the masked heads and neurons (prune_heads / prune_ffn in
     jointcompress.hf), which switches the model to its `jointcompress_<type>` class
     (hf.modeling_pruned.PRUNED_CLASSES) that saves and loads per-layer widths,
  4. drops the layers whose learned gate ended at 0 (prune_layers), which were exact
     identities, and renumbers the rest.
The result is a plain HF model whose eval-mode logits equal the masked model's.

What the plain weights cannot say -- each LSQ layer's bit-width and per-row step sizes -- is
returned by `finalize_hf_with_spec` as a CompressionSpec, with the step sizes of removed rows
(query/key/value rows of dropped heads, first-FFN rows of dropped neurons) dropped too, so the
packed artifact (jointcompress.hf.artifact) and the int8 ONNX export use the trained grid.
"""

from __future__ import annotations

import torch
from torch import nn

from jointcompress.errors import RecipeError
from jointcompress.hf.int8 import bake_parametrizations
from jointcompress.hf.modeling_pruned import ARCH, has_sub, family, head_dim, layers
from jointcompress.hf.wrapper import unwrap
from jointcompress.spec import CompressionSpec


@torch.no_grad()
def finalize_hf(model: nn.Module, techniques: list) -> nn.Module:
    """Finalize in place (model: a SequenceClassifier or the HF model); returns the HF model.

    `techniques`: `Result.techniques` from api.compress (the prune_heads / prune_ffn ones are
    read; others are ignored).
    """
    return finalize_hf_with_spec(model, techniques)[0]


@torch.no_grad()
def finalize_hf_with_spec(model: nn.Module, techniques: list) -> tuple[nn.Module, CompressionSpec]:
    """finalize_hf, plus the CompressionSpec (LSQ bits and step sizes of the kept rows)."""
    units = {t.kind: t for t in techniques
             if t.kind in ("prune_heads", "prune_ffn", "prune_layers") and getattr(t, "mask", None) is not None}
    kept = {kind: t.kept() for kind, t in units.items()}
    for t in units.values():
        t.detach()
    return remove_units(model, kept)


@torch.no_grad()
def finalize_copy_with_units(model: nn.Module) -> tuple[nn.Module, CompressionSpec]:
    """Finalize in place a copy of a model that still carries unit-mask hooks (the size budget's and the
    latency verdict's measuring copies): the hooks of a copy still point at the run's masks, which say
    which units the exact top-k keeps now; they are taken off the copy only, the run's model keeps its
    own. Returns the HF model (unwrapped, the one the spec's names are relative to, as the HF artifact
    writes it) and the spec finalize_hf_with_spec would return for the run's model at this step."""
    return remove_units(model, detach_unit_hooks(model))


def detach_unit_hooks(model: nn.Module) -> dict[str, list[list[int]]]:
    """Take every prune_heads / prune_ffn / prune_layers hook off `model`; per kind, the units kept."""
    kept = {}
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, hook in list(hooks.items()):
                kind = getattr(hook, "unit_mask", None)
                if not isinstance(kind, str):
                    continue
                if kind not in kept:
                    if getattr(hook, "unit_kept", None) is None:
                        raise RecipeError(f"{kind}: a mask attached by hand (no kept() to read) cannot be finalized on a "
                                          "copy; attach it through the prune_heads / prune_ffn / prune_layers technique")
                    kept[kind] = hook.unit_kept()
                del hooks[key]
                for extra in (m._forward_pre_hooks_with_kwargs, m._forward_hooks_with_kwargs,
                              m._forward_hooks_always_called):
                    extra.pop(key, None)
    return kept


def remove_units(model: nn.Module, kept: dict[str, list[list[int]]]) -> tuple[nn.Module, CompressionSpec]:
    """Bake `model` (its mask hooks already off) and remove the units not in `kept` physically."""
    from jointcompress.finalize import freeze_input_quant, quant_specs
    from jointcompress.hf.ffn import prune_ffn
    from jointcompress.hf.heads import prune_heads

    hf = unwrap(model)
    specs = {name: ls for name, ls in quant_specs(hf).items() if ls.bits is not None}
    rows = kept_rows(hf, kept.get("prune_heads"), kept.get("prune_ffn"))
    freeze_input_quant(hf)  # the layers keep their trained input rounding: the logits stay as they were
    bake_parametrizations(hf)
    if "prune_heads" in kept:
        prune_heads(hf, kept["prune_heads"])
    if "prune_ffn" in kept:
        prune_ffn(hf, kept["prune_ffn"])
    for name, idx in rows.items():
        ls = specs.get(name)
        if ls is not None and ls.scale is not None and ls.scale.numel() > 1:
            ls.scale = ls.scale[idx].clone()
    if "prune_layers" in kept:
        specs = _drop_gated_layers(hf, kept["prune_layers"][0], specs)
    return hf, CompressionSpec(layers=specs)


def _drop_gated_layers(hf: nn.Module, keep: list[int], specs: dict) -> dict:
    """Remove the layers whose gate ended at 0 (exact identities) and renumber the spec's names."""
    from jointcompress.hf.layers import drop_layers

    keep = sorted(keep)
    names = {id(m): n for n, m in hf.named_modules()}
    before = [names[id(layer)] + "." for layer in layers(hf)]
    drop_layers(hf, keep)
    names = {id(m): n for n, m in hf.named_modules()}
    after = [names[id(layer)] + "." for layer in layers(hf)]
    renamed = {before[old]: after[new] for new, old in enumerate(keep)}
    out = {}
    for name, ls in specs.items():
        prefix = next((p for p in before if name.startswith(p)), None)
        if prefix is None:
            out[name] = ls  # not inside a transformer layer
        elif prefix in renamed:
            out[renamed[prefix] + name[len(prefix):]] = ls
    return out


def kept_rows(hf: nn.Module, heads: list[list[int]] | None, neurons: list[list[int]] | None) -> dict[str, torch.Tensor]:
    """Module name -> output rows that survive physical head / FFN-neuron removal.

    Query, key and value (and DeBERTa's own relative-position projections) keep the rows of the
    kept heads (head h owns rows h*d .. h*d+d-1);
    the first FFN Linear keeps the rows of the kept neurons. Attention-output and second-FFN
    Linears lose input columns only, so their per-row step sizes are unchanged.
    """
    fam = family(hf.config)
    a, names = ARCH[fam], {id(m): n for n, m in hf.named_modules()}
    out = {}
    for i, layer in enumerate(layers(hf)):
        prefix = names[id(layer)]
        if heads is not None:
            hd = head_dim(hf.config)
            idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in sorted(set(heads[i]))])
            for path in [a[part] for part in ("q", "k", "v")] + [p for p in a.get("per_head", ()) if has_sub(layer, p)]:
                out[f"{prefix}.{path}"] = idx
        if neurons is not None:
            for part in ("ffn_in", "ffn_gate"):
                if part in a:
                    out[f"{prefix}.{a[part]}"] = torch.tensor(sorted(set(neurons[i])), dtype=torch.long)
    return out



"""Whole-layer removal (also how DistilBERT-style students are initialised).

Dropping a layer is exact bookkeeping: filter the ModuleList, update the layer count in
the config and filter any per-layer width lists so they stay aligned with the layers.
"""

from __future__ import annotations

from torch import nn

from jointcompress.errors import RecipeError
from jointcompress.hf.modeling_pruned import ARCH, family, get_sub, set_sub
from jointcompress.hf.pruned import n_layers


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the transformer layers at indices keep (in the given order); in place."""
    cfg = model.config
    fam = family(cfg)
    total = n_layers(cfg)
    if not keep:
        raise RecipeError("keep_layers is empty; keep at least one layer")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise RecipeError(f"keep_layers has {bad}, outside 0..{total - 1}")
    if len(set(keep)) != len(keep):
        raise RecipeError(f"keep_layers {keep} repeats a layer; list each layer once")
    path = ARCH[fam]["layers"]
    old = get_sub(model.base_model, path)
    set_sub(model.base_model, path, nn.ModuleList([old[i] for i in keep]))
    for new_idx, layer in enumerate(get_sub(model.base_model, path)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    setattr(cfg, ARCH[fam]["n_layers"], len(keep))
    for field in ("heads_per_layer", "intermediate_per_layer"):
        widths = getattr(cfg, field, None)
        if widths is not None:
            setattr(cfg, field, [widths[i] for i in keep])
    return model


def every_other(total: int, target: int) -> list[int]:
    """target layer indices spread evenly over total, always including the last one
    (e.g. 6 -> 3 gives [1, 3, 5]), the DistilBERT 'every other layer' rule generalised."""
    if not 1 <= target <= total:
        raise RecipeError(f"student_layers={target} must be in 1..{total}")
    step = total / target
    return [int(round((k + 1) * step)) - 1 for k in range(target)]

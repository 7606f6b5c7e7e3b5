"""Whole-layer removal (also how DistilBERT-style students are initialised), and the learned
layer gate that decides which layers to remove.

Dropping a layer is exact bookkeeping: filter the ModuleList, update the layer count in
the config and filter any per-layer width lists so they stay aligned with the layers.

The gate (`attach_layer_gate`) makes layer i compute g_i * layer(h) + (1 - g_i) * h: a
residual bypass. At g_i = 0 the layer is exactly the identity, so removing it physically
changes nothing, which is what lets prune_layers train soft gates and end at an exact
number of layers.
"""

from __future__ import annotations

import torch
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
        raise RecipeError("the layers to keep are none; keep at least one layer")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise RecipeError(f"the layers to keep include {bad}, outside the model's 0..{total - 1}")
    if len(set(keep)) != len(keep):
        raise RecipeError(f"the layers to keep, {keep}, repeat a layer; list each layer once")
    if list(keep) != sorted(keep):  # [2, 0] ran the kept layers in reverse, without a word
        raise RecipeError(f"the layers to keep, {keep}: give them in increasing order, as the teacher runs them: "
                          f"{sorted(keep)}")
    path = ARCH[fam]["layers"]
    old = get_sub(model.base_model, path)
    set_sub(model.base_model, path, nn.ModuleList([old[i] for i in keep]))
    for new_idx, layer in enumerate(get_sub(model.base_model, path)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    setattr(cfg, ARCH[fam]["n_layers"], len(keep))
    for field in ("heads_per_layer", "intermediate_per_layer", "layer_types"):  # layer_types: Qwen2's attention kinds
        per_layer = getattr(cfg, field, None)
        if isinstance(per_layer, (list, tuple)) and len(per_layer) == total:
            setattr(cfg, field, [per_layer[i] for i in keep])
    return model


def _require_layers(config) -> None:
    from jointcompress.hf.modeling_pruned import require_units

    try:
        require_units(config, "layers")
    except ValueError as err:
        raise RecipeError(f"prune_layers: {err}; use prune_ffn or prune_unstructured") from None


def attach_layer_gate(model: nn.Module, mask) -> list:
    """Blend each layer's output with its input by mask()[0][i]; returns hook handles."""
    _require_layers(model.config)
    mods = get_sub(model.base_model, ARCH[family(model.config)]["layers"])
    if tuple(mask.scores.shape) != (1, len(mods)):
        raise RecipeError(
            f"layer gate is {tuple(mask.scores.shape)} but the model has {len(mods)} layers; build it for this model"
        )
    handles = []
    for i, layer in enumerate(mods):
        def hook(module, args, kwargs, output, i=i):
            h_in, h_out = _layer_input(args, kwargs), output[0] if isinstance(output, tuple) else output
            g = mask()[0, i].to(h_out.dtype)
            return _as_output(g * h_out + (1 - g) * h_in, output)

        hook.unit_mask = "prune_layers"  # core finalize refuses a model that still carries one
        hook.unit_kept = getattr(mask, "kept", None)  # what a measuring copy keeps (hf.finalize.finalize_copy_with_units)
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return handles


def _layer_input(args, kwargs) -> torch.Tensor:
    """The hidden states a transformer layer was called with."""
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))


def _as_output(hidden: torch.Tensor, output):
    """`hidden` in the place of the layer's output hidden states (a tuple keeps its other parts)."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def _skipped(module, args, kwargs, output):
    return _as_output(_layer_input(args, kwargs), output)


@torch.no_grad()
def layer_output_change(model: nn.Module, hf: nn.Module, example_inputs) -> torch.Tensor:
    """How far `model`'s predictions move when each layer of `hf` (the transformer inside it) is skipped, its
    output replaced by its input, on `example_inputs` (the first training batch): the mean KL divergence of
    the skipped model's class distribution from the full one's, shape [1, layers]. Why: a weight norm ranks
    layers by how much they could move the residual stream, not by what the prediction needs (it can rank a
    classifier's last layer, the one its head reads, least: a short run that drops it ends near chance)."""
    from ..model_call import call_model
    from ..session.outputs import logits_of

    _require_layers(hf.config)
    mods = get_sub(hf.base_model, ARCH[family(hf.config)]["layers"])
    was = model.training
    model.eval()
    try:
        full = torch.log_softmax(logits_of(call_model(model, example_inputs)).float(), -1)
        change = []
        for layer in mods:
            handle = layer.register_forward_hook(_skipped, with_kwargs=True)
            try:
                skipped = torch.log_softmax(logits_of(call_model(model, example_inputs)).float(), -1)
            finally:
                handle.remove()
            change.append(torch.nn.functional.kl_div(skipped, full, log_target=True, reduction="batchmean"))
    finally:
        model.train(was)
    return torch.stack(change)[None]


def layer_magnitude(model: nn.Module) -> torch.Tensor:
    """A weight-only guess of how much each layer changes the residual stream, shape [1, layers]:
    ||W_v|| * ||W_o|| (attention) + ||W_in|| * ||W_out|| (FFN), Frobenius norms."""
    _require_layers(model.config)
    a = ARCH[family(model.config)]
    norm = lambda layer, part: get_sub(layer, a[part]).weight.detach().float().norm()  # noqa: E731
    mods = get_sub(model.base_model, a["layers"])
    return torch.stack([norm(m, "v") * norm(m, "o") + norm(m, "ffn_in") * norm(m, "ffn_out") for m in mods])[None]


def every_other(total: int, target: int) -> list[int]:
    """target layer indices spread evenly over total, always including the last one
    (e.g. 6 -> 3 gives [1, 3, 5]), the DistilBERT 'every other layer' rule generalised."""
    if not 1 <= target <= total:
        raise RecipeError(f"student_layers={target} must be in 1..{total}")
    step = total / target
    return [int(round((k + 1) * step)) - 1 for k in range(target)]

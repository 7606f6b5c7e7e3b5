"""Switch a physically pruned model to the registered pruned classes.

Why in place: modules hold references to the model's config object, so we update that
object (fields + class) instead of building a new one. The pruned classes are subclasses
that add no state, so changing `__class__` is safe and keeps every existing reference
(optimizer param groups, hooks, parametrizations) valid.
"""

from __future__ import annotations

from torch import nn

from jointcompress.hf.modeling_pruned import ARCH, PRUNED_CLASSES, family


def mark_pruned(model: nn.Module, *, heads_per_layer: list[int] | None = None,
                intermediate_per_layer: list[int] | None = None) -> nn.Module:
    """Record per-layer widths in model.config and switch to the pruned classes."""
    cfg = model.config
    family(cfg)  # a ValueError naming the supported types
    if heads_per_layer is not None:
        cfg.heads_per_layer = list(heads_per_layer)
    if intermediate_per_layer is not None:
        cfg.intermediate_per_layer = list(intermediate_per_layer)
    for field in ("heads_per_layer", "intermediate_per_layer"):
        if not hasattr(cfg, field):
            setattr(cfg, field, None)
    cfg_cls, model_cls = PRUNED_CLASSES.get(cfg.model_type.removeprefix("jointcompress_"), (None, None))
    if cfg_cls is None:
        return model  # forward still works; export refuses with a clear message
    if not isinstance(cfg, cfg_cls):
        cfg.__class__ = cfg_cls
    stock = model_cls.__bases__[-1]  # the stock class (SavesItsCode comes first)
    if type(model) is stock:
        model.__class__ = model_cls
    return model


def is_pruned_class(model: nn.Module) -> bool:
    """True when the model (and config) use the registered pruned classes."""
    return any(isinstance(model, m) for _, m in PRUNED_CLASSES.values())


def n_layers(config) -> int:
    """Number of transformer layers from the config."""
    return getattr(config, ARCH[family(config)]["n_layers"])

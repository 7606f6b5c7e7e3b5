"""Techniques: one file each, built from their recipe config by `build`."""
from .base import RunContext, Technique
from .distill_kd import DistillKD, hinton_loss, kd_loss
from .prune_blocks import PruneBlocks
from .prune_structured import PruneStructured
from .prune_units import PruneFFN, PruneHeads, PruneLayers
from .prune_unstructured import PruneUnstructured
from .quant_lsq import LSQWeight, QuantLSQ
from .raise_stride import RaiseStride
from .size_budget import SizeBudget

REGISTRY = {
    "prune_unstructured": PruneUnstructured,
    "prune_structured": PruneStructured,
    "quant_lsq": QuantLSQ,
    "distill_kd": DistillKD,
    "prune_heads": PruneHeads,
    "prune_layers": PruneLayers,
    "prune_blocks": PruneBlocks,
    "prune_ffn": PruneFFN,
    "size_budget": SizeBudget,
    "raise_stride": RaiseStride,
}


def build(config) -> Technique:
    return REGISTRY[config.type](config)


__all__ = ["RunContext", "Technique", "build", "kd_loss", "hinton_loss", "LSQWeight", *REGISTRY]

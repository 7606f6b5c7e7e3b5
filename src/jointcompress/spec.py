"""What a finalized model carries besides its plain weights.

After `finalize`, every layer is an ordinary nn.Module with ordinary tensors. What cannot be
read off those tensors (the bit-width and per-channel step size the weights sit on, the
activation quantizer, which channels were physically removed) is kept here, so the artifact
writer can pack the weights into real low-bit storage and `load` can rebuild the shrunken
architecture from a freshly built dense model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def qmax_of(bits, nonzero: bool = False):
    """The largest level of a kept weight at `bits`: 2**(bits-1) - 1, or 2**(bits-1) on the nonzero grid
    (quant_lsq.nonzero_grid: every code is a non-zero level, zero is stored by position). `bits` may be a
    number or a tensor."""
    return 2 ** (bits - 1) - (0 if nonzero else 1)


@dataclass
class LayerSpec:
    """Per-layer quantization: weight == round(weight / scale) * scale, with |int| <= 2**(bits-1)-1, or with
    nonzero_levels |int| <= 2**(bits-1) (quant_lsq.nonzero_grid: zero is stored by position, every code of
    `bits` is a non-zero level)."""

    bits: int | None = None  # None: weights stay fp32
    scale: torch.Tensor | None = None  # shape [out_features/out_channels], fp32 step sizes
    act_bits: int | None = None  # input activation quantization, if trained with it
    act_scale: float | None = None
    act_signed: bool = True  # False: the inputs were never negative, the grid is [0, 2^act_bits - 1]
    nonzero_levels: bool = False

    @property
    def qmax(self) -> int:
        """The largest |integer| a weight of this layer may hold."""
        return qmax_of(self.bits, self.nonzero_levels)


@dataclass
class CompressionSpec:
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    # Torch-Pruning pruning history: [(root_module_name, is_out_channel_pruning, [idxs])].
    # Replaying it on a freshly built dense model reproduces the shrunken architecture.
    pruning_history: list[tuple[str, bool, list[int]]] = field(default_factory=list)
    # residual blocks replaced by nn.Identity (prune_blocks), replayed before the pruning history
    dropped_blocks: list[str] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    # blocks a later run dropped from a model whose channels an earlier run had removed: [(n, [names])],
    # each replayed after the first n entries of the pruning history (the history can name their layers)
    later_dropped_blocks: list[tuple[int, list[str]]] = field(default_factory=list)
    # convolutions whose stride raise_stride raised: {name: stride per dim}, set after the replay
    strides: dict[str, list[int]] = field(default_factory=dict)
    # BatchNorm layers stored as their inference affine (quant_lsq.norm_format: fp16_folded): exact in
    # evaluation, but without the training state another run would start from
    folded_norms: list[str] = field(default_factory=list)
    # the batch finalize traced the model with (not stored): save() records its shapes where it is given none, so
    # a loop that gave prepare() its example_inputs need not give them to save() again
    example_inputs: Any = field(default=None, repr=False, compare=False)

    def structure(self) -> dict:
        """What rebuilds the architecture from the builder's model: PRIOR_STRUCTURE's dict, the
        manifest's fields of the same names."""
        return {"pruning_history": [list(h) for h in self.pruning_history], "dropped_blocks": list(self.dropped_blocks),
                "later_dropped_blocks": [[int(n), list(names)] for n, names in self.later_dropped_blocks],
                "strides": {str(k): [int(s) for s in v] for k, v in self.strides.items()}}


# the attribute a finalized model (or one loaded from an artifact) carries its structure in
# (CompressionSpec.structure(): the pruning history, dropped blocks and raised strides that rebuild it from the builder's
# model). A later run's finalize starts its spec from it, so that run's artifact rebuilds from the same
# builder (a second run on a model whose channels a first one removed)
PRIOR_STRUCTURE = "_jointcompress_prior_structure"


def prior_structure(model) -> CompressionSpec:
    """A spec holding only the structure the model was finalized or loaded with (empty if none)."""
    prior = getattr(model, PRIOR_STRUCTURE, None) or {}
    return CompressionSpec(pruning_history=[list(h) for h in prior.get("pruning_history", [])],
                           dropped_blocks=list(prior.get("dropped_blocks", [])),
                           later_dropped_blocks=[(int(n), list(b)) for n, b in prior.get("later_dropped_blocks", [])],
                           strides={k: list(v) for k, v in prior.get("strides", {}).items()})

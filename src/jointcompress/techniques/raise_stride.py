"""A convolution's stride raised (the stem's, by default), so the layers after it run on smaller maps.

The speed channel pruning cannot reach where a network keeps its input's resolution for long:
see strides.py for why, and for which models allow it. The stride is set when the technique
attaches, at the run's first step in joint and sequential runs alike, so every step trains (and
distils from the full-resolution teacher) the model that will be deployed; there is nothing to
ramp: a half-raised stride does not exist. `finalize` records the layer in the spec
(spec.strides), the artifact stores it, and `load` sets it again on the builder's model.
"""
from __future__ import annotations

from ..strides import raise_stride
from .base import RunContext, Technique


class RaiseStride(Technique):
    kind = "raise_stride"
    order = 3  # before the block fades and channel masks: their checks run on the downsampled model

    def __init__(self, config):
        super().__init__(config)
        self.strides: dict[str, list[int]] = {}

    def setup(self, ctx: RunContext) -> None:
        self.strides = raise_stride(ctx.model, ctx.example_inputs, self.config.layer, self.config.stride)
        for name, stride in self.strides.items():
            ctx.log(f"raise_stride: {name} now runs at stride {stride}")
        self.attached = True

    def metrics(self) -> dict[str, float]:
        return {"raised_stride": float(max((s for v in self.strides.values() for s in v), default=1))}

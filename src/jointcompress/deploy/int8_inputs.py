"""The trained input steps of a model that rounds its layers' inputs (quant_lsq activations: true), in
the int8 graph.

A finalized layer rounds its input on its trained grid (FrozenInputQuant: round(clamp(x / s)) * s),
exported as four fp32 operators (Div, Clip, Round, Mul). Left to itself, ONNX Runtime's quantizer put
min/max uint8 grids of its own around and inside them: the input was rounded on a min/max grid, then on
the trained one (inputs near a step's edge moved to the next level), and the rounded integers were
re-rounded on a third grid. Here:

- the rounding operators stay fp32 and unquantized (`nodes_to_exclude`): they round exactly as training did;
- the tensor they read gets the trained step as its int8 scale wherever the rounding is its only reader,
  up through max pooling and reshapes (operators that keep their input's int8 grid and commute with
  rounding): the input then arrives on the trained grid and is rounded once;
- the rounded input, which the layer reads, gets the scale step / m with the largest m that still holds
  every trained level in uint8: exact, and the int32 grid ONNX Runtime rounds the layer's bias to (input
  scale x weight scale) is m times finer than at the trained step (rounded at the trained step, a 4-bit
  input's bias moved some of the next layer's inputs by a whole step).

What it buys, measured: on random MLPs the hidden layers' int8 inputs are training's integers
(tests/test_deploy.py; the export before failed that check, a step off on a share of them). On a trained LeNet-5 (benchmarks/int8_input_steps.py, 4-bit
inputs) the logits came no closer to the fp32 model's (mean |difference| 0.072 against 0.062 before; top-1
agreement 99.82% against 99.72%): about 3% of its layers' inputs lie within 0.005 of a step's edge (the
constant background of MNIST images, whose value straight-through training leaves oscillating on a
rounding edge), and the int32 rounding of a bias moves them across, before as now.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..techniques.quant_lsq import FrozenInputQuant

# operators ONNX Runtime's int8 graph runs on its input's uint8 grid, and that commute with rounding
_SAME_GRID = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")
_ROUNDING = ("Mul", "Round", "Clip", "Div")  # FrozenInputQuant's operators, from its output back


def _grid(rounding: FrozenInputQuant, split: int) -> list[dict]:
    """A TensorQuantOverrides entry: scale step / split, zero point 0 for an unsigned grid ([0, 2^b - 1]) and
    128 for a signed one (symmetric), which puts the trained integers at their places in uint8."""
    zero_point = 128 if rounding.signed else 0
    return [{"scale": np.array(float(rounding.step) / split, np.float32), "zero_point": np.array(zero_point, np.uint8)}]


def _finest_split(rounding: FrozenInputQuant) -> int:
    """The largest m whose grid step / m holds every trained level in uint8 (1 at 8 bits)."""
    room = 127 if rounding.signed else 255  # levels on one side of the zero point
    return max(1, room // max(abs(rounding.low), rounding.high))


class _Graph:
    """Who produces and how many nodes read each tensor of an ONNX graph."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.inputs = {i.name for i in graph.input}

    def rounding_nodes(self, rounded: str) -> list | None:
        """The Mul, Round, Clip and Div that produce `rounded` (FrozenInputQuant's graph), else None."""
        nodes, tensor = [], rounded
        for op in _ROUNDING:
            node = self.producer.get(tensor)
            if node is None or node.op_type != op:
                return None
            nodes.append(node)
            tensor = node.input[0]
        return nodes

    def sources(self, tensor: str) -> list[str]:
        """`tensor` and the tensors before it through _SAME_GRID operators, while each has one reader and is
        no graph input."""
        chain = []
        while self.readers.get(tensor) == 1 and tensor not in self.inputs:
            chain.append(tensor)
            node = self.producer.get(tensor)
            if node is None or node.op_type not in _SAME_GRID:
                break
            tensor = node.input[0]
        return chain


def input_overrides(onnx_path: Path, weights: dict[str, tuple], roundings: dict[str, FrozenInputQuant]):
    """(TensorQuantOverrides, node names to leave fp32) for the input rounding of every node that reads a
    rounding layer's weight (`weights`: initializer -> (layer, ...), deploy.int8.matched_weights). A layer
    none of whose nodes was found is warned about: its rounding is then quantized as any fp32 operator."""
    import onnx

    graph = _Graph(onnx.load(str(onnx_path), load_external_data=False).graph)
    layer_of = {init: entry[0] for init, entry in weights.items() if entry[0] in roundings}
    layer_of.update({node.output[0]: layer_of[node.input[0]] for node in graph.graph.node  # a weight read through
                     if node.op_type == "Transpose" and node.input[0] in layer_of})  # a Transpose (MatMul)
    overrides, fp32_nodes, found = {}, [], set()
    for node in graph.graph.node:
        layer = next((layer_of[i] for i in node.input if i in layer_of), None)
        if layer is None or node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            continue
        rounded = next(i for i in node.input if i not in layer_of)
        nodes = graph.rounding_nodes(rounded)
        if nodes is None:
            continue
        rounding = roundings[layer]
        overrides.update({tensor: _grid(rounding, 1) for tensor in graph.sources(nodes[-1].input[0])})
        overrides[rounded] = _grid(rounding, _finest_split(rounding))
        fp32_nodes += [n.name for n in nodes]
        found.add(layer)
    missed = sorted(set(roundings) - found)
    if missed:
        warnings.warn(f"int8: {len(missed)} of {len(roundings)} layers that round their inputs ({', '.join(missed[:3])}) "
                      "were not found in the exported graph: their rounding is quantized on min/max int8 grids, off "
                      "the trained one", stacklevel=3)
    return overrides, fp32_nodes

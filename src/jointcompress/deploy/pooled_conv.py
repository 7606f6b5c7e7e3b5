"""An exact ONNX rewrite of Conv -> Relu -> MaxPool(2x2, stride 2) for ONNX Runtime's CPU kernels.

Why: on AVX-512 CPUs ONNX Runtime runs convolutions in its NCHWc layout, in blocks of 16
output channels, and pads a narrower convolution up to 16. A pruned LeNet-5 stem (1 input
channel, 4-8 output channels at 24x24) is therefore computed as if it had 16 channels, and
its 16-channel 24x24 output (2.4 MB at batch 64) is written, reordered and pooled: at batch
64 that stem was the largest single cost of the model (0.30 of 0.48 ms, 1 thread), and most
of that work is for padding.

The same function, computed differently: a 2x2 max-pool after a stride-1 convolution takes,
for each pooled pixel, the maximum over the four "phases" (even/odd row, even/odd column) of
the convolution's output. Each phase is a stride-2 convolution, and a stride-2 convolution
over an image equals a stride-1 convolution over the image folded 2x2 into channels
(SpaceToDepth): a KxK kernel over C channels becomes a ceil((K+1)/2)^2 kernel over 4C
channels. So

    Conv(C -> F, KxK) -> Relu -> MaxPool(2)
 == SpaceToDepth(2) -> Conv(4C -> 4F, k') -> Relu -> Reshape(N, 4, F, h, w) -> ReduceMax(axis 1)

(ReLU and max commute.) With F = 4 the new convolution has exactly 16 output channels, one
NCHWc block with no padding, on a quarter of the pixels; its output is a quarter the size of
the padded one. The rewrite is only made where it is exact and where ORT gains from it
(stride 1, no dilation or groups, no padding, even input and output sides, few input channels,
the pooling unpadded with kernel and stride 2) and where measured to pay off; the result is
checked against the original by the caller's parity check.
"""
from __future__ import annotations

import numpy as np

MAX_INPUT_CHANNELS = 4  # folded 2x2 they become <= 16, what ORT's NCHWc kernels take as plain NCHW input


def nchwc_block() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 with AVX-512, else 8."""
    try:
        with open("/proc/cpuinfo") as f:
            return 16 if " avx512f" in f.read() else 8
    except OSError:
        return 8


def _padded(channels: int, block: int) -> int:
    return -(-channels // block) * block


def folding_pays(filters: int, kernel: tuple[int, int], block: int) -> bool:
    """Whether the folded convolution does less padded work than the original: output
    channels padded to the block times kernel taps, per input pixel (the folded kernel covers
    a quarter of the pixels with 4x the input channels). LeNet-5's 5x5 stem: 4 or 8 filters
    fold (0.36x, 0.72x of the work at block 16), 12 or more do not (1.08x, 1.44x); measured
    at batch 64, 1 thread: 4/16/64 0.49 -> 0.31 ms, 8/16/64 0.66 -> 0.59 ms, while folding
    conv2 at 16 filters made 4/16/64 slower (0.44 ms)."""
    kh2, kw2 = (kernel[0] + 2) // 2, (kernel[1] + 2) // 2
    return _padded(4 * filters, block) * kh2 * kw2 < _padded(filters, block) * kernel[0] * kernel[1]


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def folded_kernel(weight: np.ndarray) -> np.ndarray:
    """The (4F, 4C, k', k') kernel over the 2x2-folded input whose output channel p*F + f is
    phase p = 2a + b (output row parity a, column parity b) of the original filter f."""
    f, c, kh, kw = weight.shape
    kh2, kw2 = (kh + 2) // 2, (kw + 2) // 2
    out = np.zeros((4, f, 4, c, kh2, kw2), dtype=weight.dtype)  # (phase, f, fold, c, i, j)
    for a in (0, 1):
        for b in (0, 1):
            for dh in (0, 1):
                for dw in (0, 1):
                    for i in range(kh2):
                        for j in range(kw2):
                            u, v = 2 * i + dh - a, 2 * j + dw - b
                            if 0 <= u < kh and 0 <= v < kw:
                                out[2 * a + b, :, 2 * dh + dw, :, i, j] = weight[:, :, u, v]
    # SpaceToDepth's channel order is (dh, dw, c): fold-major, as laid out above
    return out.reshape(4 * f, 4 * c, kh2, kw2)


def _single_consumer(graph, name: str):
    users = [n for n in graph.node if name in n.input]
    outputs = {o.name for o in graph.output}
    return users[0] if len(users) == 1 and name not in outputs else None


def _static_shapes(model) -> dict[str, list]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _pool_is_2x2(pool) -> bool:
    a = _attrs(pool)
    return (pool.op_type == "MaxPool" and len(pool.output) == 1 and list(a.get("kernel_shape", [])) == [2, 2]
            and list(a.get("strides", [1, 1])) == [2, 2] and not any(a.get("pads", [0])) and not a.get("ceil_mode", 0)
            and list(a.get("dilations", [1, 1])) == [1, 1] and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))


def _conv_fits(conv, weights: dict, shape) -> bool:
    a = _attrs(conv)
    if conv.input[1] not in weights or (len(conv.input) > 2 and conv.input[2] not in weights):
        return False
    w = weights[conv.input[1]]
    if w.ndim != 4 or shape is None or len(shape) != 4 or None in shape[1:]:
        return False
    _, c, h, wd = shape
    ho, wo = h - w.shape[2] + 1, wd - w.shape[3] + 1
    return (a.get("group", 1) == 1 and list(a.get("strides", [1, 1])) == [1, 1] and not any(a.get("pads", [0]))
            and list(a.get("dilations", [1, 1])) == [1, 1] and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            and c <= MAX_INPUT_CHANNELS and h % 2 == 0 and wd % 2 == 0 and ho % 2 == 0 and wo % 2 == 0
            and w.shape[2] % 2 == 1 and w.shape[3] % 2 == 1)


def rewrite_pooled_convs(model, block: int | None = None) -> list[str]:
    """Every Conv -> Relu -> MaxPool(2x2) chain that fits (module docstring) and where folding
    pays at ORT's NCHWc `block` (default: this CPU's) replaced by its folded form, in place;
    returns the names of the convolutions folded."""
    from onnx import numpy_helper

    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes = _static_shapes(model)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    block = block or nchwc_block()
    done = []
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        relu = _single_consumer(graph, conv.output[0])
        pool = _single_consumer(graph, relu.output[0]) if relu is not None and relu.op_type == "Relu" else None
        if pool is None or not _pool_is_2x2(pool) or not _conv_fits(conv, weights, shapes.get(conv.input[0])):
            continue
        w = weights[conv.input[1]]
        if not folding_pays(w.shape[0], w.shape[2:], block):
            continue
        bias = weights[conv.input[2]] if len(conv.input) > 2 else np.zeros(w.shape[0], w.dtype)
        nodes, tensors = _folded(conv, pool.output[0], w, bias, shapes[conv.input[0]], opset)
        graph.initializer.extend(tensors)
        at = list(graph.node).index(conv)
        for old in (conv, relu, pool):
            graph.node.remove(old)
        for k, node in enumerate(nodes):
            graph.node.insert(at + k, node)
        done.append(conv.name or conv.output[0])
    _drop_unused_initializers(graph)
    return done


def _folded(conv, output: str, weight: np.ndarray, bias: np.ndarray, shape, opset: int):
    """The nodes and initializers that compute `output` (the pooled map) from the conv's input:
    SpaceToDepth(2) -> Conv(folded kernel) -> Relu -> Reshape(N, 4, F, h, w) -> ReduceMax(1)."""
    from onnx import helper, numpy_helper

    f, (h, wd) = weight.shape[0], shape[2:]
    tag = f"{conv.name or conv.output[0]}_pooled"
    kernel = folded_kernel(weight)
    pooled = [0, 4, f, (h - weight.shape[2] + 1) // 2, (wd - weight.shape[3] + 1) // 2]
    tensors = [numpy_helper.from_array(kernel, f"{tag}.weight"), numpy_helper.from_array(np.tile(bias, 4), f"{tag}.bias"),
               numpy_helper.from_array(np.array(pooled, np.int64), f"{tag}.shape")]
    if opset < 18:  # ReduceMax's axes: an attribute up to opset 17, an input from 18
        reduce = helper.make_node("ReduceMax", [f"{tag}.phases"], [output], f"{tag}.max", axes=[1], keepdims=0)
    else:
        tensors.append(numpy_helper.from_array(np.array([1], np.int64), f"{tag}.axes"))
        reduce = helper.make_node("ReduceMax", [f"{tag}.phases", f"{tag}.axes"], [output], f"{tag}.max", keepdims=0)
    nodes = [helper.make_node("SpaceToDepth", [conv.input[0]], [f"{tag}.folded"], f"{tag}.fold", blocksize=2),
             helper.make_node("Conv", [f"{tag}.folded", f"{tag}.weight", f"{tag}.bias"], [f"{tag}.conv"], f"{tag}.conv",
                              kernel_shape=list(kernel.shape[2:])),
             helper.make_node("Relu", [f"{tag}.conv"], [f"{tag}.relu"], f"{tag}.relu"),
             helper.make_node("Reshape", [f"{tag}.relu", f"{tag}.shape"], [f"{tag}.phases"], f"{tag}.split"),
             reduce]
    return nodes, tensors


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)

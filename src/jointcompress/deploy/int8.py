"""Real int8 CPU inference for a finalized model.

Int8 back ends measured on this machine (2 cores shared with other jobs, load average 6-8,
Xeon with AVX512-VNNI/AMX, torch 2.13.0+cpu, onnxruntime 1.32), batch 64, 1 thread for every
back end (ORT: one intra-op thread, spinning off), random weights on an 8-bit grid, 50% of
channels physically removed, medians of 30 interleaved rounds, alone in brackets
(benchmarks/int8_speed.py --threads 1; results/int8_speed.json and int8_speed_lenet5.json):

                                     resnet (models.SmallResNet)   lenet5
    torch fp32 dense (baseline)          45 ms  (48)               28 ms  (32)
    onnxruntime fp32 dense               32 ms  (32)               14 ms  (15)
    torch fp32 pruned                    21 ms  (25)               13 ms  (11)
    onnxruntime fp32 pruned             9.4 ms  (13)  4.8x         1.6 ms (1.5)  17.7x
    onnxruntime int8 pruned (QDQ)        25 ms  (25)  1.8x         3.2 ms (2.6)   8.6x
    torch int8 pruned, FX x86            12 ms  (10)  3.8x         6.2 ms (1.2)   4.5x
    torch int8 pruned, FX qnnpack        30 ms  (32)               15 ms  (13)

(An earlier version of this table, timed with ORT's default spinning threads stealing the cores
from PyTorch, had torch FX x86 at 132 ms and 162 ms, slower than fp32: that was the timing.)
ONNX Runtime QDQ stays the default int8 back end because it runs the *trained* scales exactly
(below) and ships as one portable file; torch FX x86 is faster on the ResNet and, alone, on
LeNet-5 (`backend="torch-x86"`). Honest caveat: at these tiny channel counts int8 is *slower*
than fp32 in the same runtime (the quantize/dequantize work outweighs the cheaper GEMMs); the
speed-up over the PyTorch fp32 baseline comes from pruning plus ONNX Runtime fp32, and int8 is
worth it for size here, not speed.

Why the weights stay exact: BatchNorm is folded into the preceding conv first (FX `fuse`),
which multiplies every output channel by one factor, so the folded weight still sits on a
per-channel grid with scale' = scale * |factor|. Those trained scales are handed to the ONNX
Runtime quantizer as TensorQuantOverrides, so its int8 weights are exactly the trained
integers (any b <= 8 fits int8) instead of a min/max re-quantization. Where FX cannot trace the
model (Hugging Face's ResNet) the exporter folds BatchNorm instead, and a weight is matched by
its channels being the trained ones times a factor; a quantized layer nothing matches is warned
about (it gets min/max scales). Activation scales are calibrated (MinMax) on the given
calibration batches, except where a layer rounds its input as training did (quant_lsq
activations: true): there the trained step sets them (int8_inputs.py). The graph's outputs (the
logits) stay fp32: rounded to uint8 they cost the demo's structured model 0.45 points and no time was saved
(benchmarks/int8_logits.py).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import JointCompressError, UnsupportedModelError
from ..layer_types import COMPRESSIBLE
from ..model_call import to_device
from ..model_copy import on_cpu
from ..session.outputs import logits_of
from ..spec import CompressionSpec
from ..techniques.quant_lsq import input_roundings
from .int8_inputs import input_overrides
from .onnx_export import export_onnx, ort_input, ort_predict, ort_session
from .parity import ParityReport, batches, compare
from .timing import DEFAULT_THREADS

DEFAULT_BACKEND = "onnxruntime"
PARITY_AGREEMENT = 0.98  # quantize_int8 warns when fewer calibration samples keep the fp32 model's top-1 class


@dataclass
class Int8Model:
    """A callable int8 model: torch tensor in, fp32 logits (torch tensor) out."""

    backend: str
    predict: Callable[[torch.Tensor], torch.Tensor]
    path: str | None = None
    trained_scales: int = 0  # layers whose int8 weights use the trained scales exactly
    # the temporary directory that holds `path` when the caller gave no workdir: removed once no
    # model made from it (with_threads' copies included) is left
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    # against the fp32 model on the calibration inputs (quantize_int8): top-1 agreement, max |logit diff|
    parity: dict | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)

    def with_threads(self, threads: int) -> "Int8Model":
        """The same model on an ONNX Runtime session with `threads` intra-op threads (for fair
        timing); torch back ends follow torch.set_num_threads and are returned as they are."""
        if self.backend != "onnxruntime" or self.path is None:
            return self
        return Int8Model(self.backend, ort_predict(ort_session(self.path, threads)), self.path, self.trained_scales,
                         self.scratch, self.parity)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Copy of `model` with Conv+BN pairs folded (FX); the unchanged copy if it cannot be traced."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval(), inplace=True)
    except Exception:
        return copy.deepcopy(model).eval()


def folded_scales(model: nn.Module, folded: nn.Module, spec: CompressionSpec | None) -> dict[str, np.ndarray]:
    """Per-channel scales of the folded weights: scale * (max|W'_c| / max|W_c|)."""
    if spec is None:
        return {}
    before, after = dict(model.named_modules()), dict(folded.named_modules())
    out = {}
    for name, ls in spec.layers.items():
        if ls.bits is None or ls.bits > 8 or ls.scale is None or name not in before or name not in after:
            continue
        # an embedding table: ONNX Runtime quantizes Gather's table with a scale of its own (it requantizes the
        # gathered rows with the table's scale, which a scale per row does not fit)
        if not isinstance(before[name], COMPRESSIBLE):
            continue
        w0 = before[name].weight.detach().float().flatten(1).abs().amax(1)
        w1 = after[name].weight.detach().float().flatten(1).abs().amax(1)
        ratio = torch.where(w0 > 0, w1 / torch.where(w0 > 0, w0, torch.ones_like(w0)), torch.ones_like(w0))
        scale = (torch.as_tensor(ls.scale).float().reshape(-1) * ratio).clamp_min(1e-12)
        out[name] = scale.numpy().astype(np.float32)
    return out


def weight_overrides(onnx_path: Path, folded: nn.Module, scales: dict[str, np.ndarray],
                     trained: tuple[nn.Module, dict[str, np.ndarray]] | None = None) -> dict:
    """TensorQuantOverrides for every ONNX weight initializer equal to a trained layer's weight
    (matched_weights): per-channel scales, zero points 0."""
    return _per_channel(matched_weights(onnx_path, folded, scales, trained))


def _per_channel(matched: dict[str, tuple]) -> dict:
    """TensorQuantOverrides of matched weights (matched_weights): the trained scale per channel, zero points 0."""
    overrides = {}
    for init_name, (_, axis, channel_scales) in matched.items():
        overrides[init_name] = [{"axis": axis, "scale": np.float32(channel_scales[0]), "zero_point": np.int8(0)}] + [
            {"scale": np.float32(s), "zero_point": np.int8(0)} for s in channel_scales[1:]
        ]
    return overrides


def matched_weights(onnx_path: Path, folded: nn.Module, scales: dict[str, np.ndarray],
                    trained: tuple[nn.Module, dict[str, np.ndarray]] | None = None) -> dict[str, tuple]:
    """ONNX weight initializer -> (layer name, channel axis, per-channel scales) for every initializer
    equal to a trained layer's weight.

    A weight exported as is (Conv, Gemm with transB) gets its per-channel scales on axis 0; a
    Linear exported as MatMul stores W^T, whose output channels are axis 1. `trained`: the model
    before folding and its trained scales, matched where FX could not fold BatchNorm (a model FX
    cannot trace) and the exporter folded it instead: each channel of the initializer is then the
    trained weight's channel times one factor, and its scale the trained one times |factor|.
    """
    import onnx
    from onnx import numpy_helper

    modules = dict(folded.named_modules())
    wanted = {name: modules[name].weight.detach().float().cpu().numpy() for name in scales}
    unfolded = {}
    if trained is not None:
        before = dict(trained[0].named_modules())
        unfolded = {name: (before[name].weight.detach().double().cpu().numpy(), scale) for name, scale in trained[1].items()}
    matched = {}
    for init in onnx.load(str(onnx_path)).graph.initializer:
        arr = numpy_helper.to_array(init)
        match = _exact_match(arr, wanted, scales) or _scaled_match(arr, unfolded)
        if match:
            matched[init.name] = match
    return matched


def _exact_match(arr: np.ndarray, wanted: dict[str, np.ndarray], scales: dict[str, np.ndarray]):
    """(layer, axis, scales) of the layer whose weight `arr` is (as is, or transposed), else None."""
    for name, w in wanted.items():
        if arr.shape == w.shape and np.array_equal(arr, w):
            return name, 0, scales[name]
        if w.ndim == 2 and arr.shape == w.T.shape and np.array_equal(arr, w.T):
            return name, 1, scales[name]
    return None


def _scaled_match(arr: np.ndarray, unfolded: dict[str, tuple[np.ndarray, np.ndarray]]):
    """(layer, 0, scales) where each output channel of `arr` is a trained layer's channel times a factor
    (BatchNorm folded by the exporter; the factor to float rounding), else None. `unfolded`: layer
    -> (its weight before folding, its trained scales)."""
    for name, (w, scale) in unfolded.items():
        if arr.ndim < 2 or arr.shape != w.shape:
            continue
        flat, ref = arr.reshape(len(arr), -1).astype(np.float64), w.reshape(len(w), -1)
        norm = (ref * ref).sum(1)
        factor = np.where(norm > 0, (flat * ref).sum(1) / np.where(norm > 0, norm, 1.0), 1.0)
        if np.allclose(flat, factor[:, None] * ref, rtol=1e-5, atol=1e-7 * np.abs(flat).max(initial=0.0)):
            return name, 0, (scale.astype(np.float64) * np.where(np.abs(factor) > 0, np.abs(factor), 1.0)).astype(np.float32)
    return None


def _warn_unmatched(spec: CompressionSpec | None, model: nn.Module, matched: int) -> None:
    """Say how many quantized layers fall back to min/max weight scales (nothing matched them)."""
    modules = dict(model.named_modules())
    quantized = [n for n, ls in (spec.layers.items() if spec else ()) if ls.bits is not None and ls.bits <= 8
                 and (n not in modules or isinstance(modules[n], COMPRESSIBLE))]
    if matched >= len(quantized):
        return
    absent = [n for n in quantized if n not in modules]
    gates = [n for n in absent if isinstance(modules.get(n.rpartition(".")[0]), nn.RNNBase)]
    if gates:  # the spec's LinearRNN gates, put back into torch's module by linear_to_rnn
        owners = sorted({n.rpartition(".")[0] for n in gates})
        warnings.warn(f"int8: {len(gates)} of {len(quantized)} quantized layers stay fp32: {', '.join(owners)} "
                      f"{'is' if len(owners) == 1 else 'are'} torch's recurrent module again (recurrent.linear_to_rnn), "
                      "whose LSTM / GRU / RNN operator ONNX Runtime's quantizer leaves in fp32; quantize the model before "
                      "linear_to_rnn, whose gates are Linear layers that take the trained scales (the time loop is then "
                      "unrolled at the example input's length)", stacklevel=3)
    others = [n for n in absent if n not in gates]
    rest = len(quantized) - matched - len(gates)
    if rest <= 0:
        return
    why = (f"{len(others)} are no layer of this model (e.g. {', '.join(others[:3])}): the spec was made on another "
           "module tree (the bare model, then wrapped?); quantize the model the spec was made on" if others
           else "their exported weights matched no trained layer's")
    warnings.warn(f"int8: {rest} of {len(quantized)} quantized layers get min/max weight scales, not the trained ones, "
                  f"and their int8 weights are re-rounded: {why}", stacklevel=3)


class _Reader:
    """onnxruntime CalibrationDataReader over a few batches of calibration inputs, as `dtype` (the
    exported graph's input type)."""

    def __init__(self, name: str, data, max_batches: int, dtype: torch.dtype):
        self.items = []
        for i, (x, _) in enumerate(batches(data, 64)):
            if i >= max_batches:
                break
            self.items.append({name: ort_input(x, dtype).numpy()})
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)


def quantize_onnxruntime(model: nn.Module, spec: CompressionSpec | None, calibration, workdir: str | os.PathLike,
                         example_input: torch.Tensor, max_batches: int = 8, threads: int = DEFAULT_THREADS,
                         fp32_outputs: bool = True) -> Int8Model:
    """`fp32_outputs=False` rounds the logits to uint8 too (what this export did before;
    benchmarks/int8_logits.py measures the two side by side)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    workdir = Path(workdir)
    folded = fold_batchnorm(model)
    fp32 = export_onnx(folded, workdir / "model_fp32.onnx", example_input)
    weights = matched_weights(fp32, folded, folded_scales(model, folded, spec),
                              trained=(model, folded_scales(model, model, spec)))
    _warn_unmatched(spec, model, len(weights))
    inputs, rounding_nodes = input_overrides(fp32, weights, input_roundings(folded))  # the trained input steps
    overrides = {**_per_channel(weights), **inputs}
    reader = _Reader("input", calibration, max_batches, ort_input(example_input[:1]).dtype)
    CalibrationDataReader.register(_Reader)
    out = workdir / "model_int8.onnx"
    with quiet_quantizer_logs():  # quantize_static logs a generic "consider pre-processing" warning on every call
        quantize_static(
            str(fp32), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            nodes_to_exclude=fp32_only_nodes(fp32) + rounding_nodes,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            extra_options={"TensorQuantOverrides": overrides, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": output_op_types(fp32) if fp32_outputs else []},
        )
    return Int8Model("onnxruntime", ort_predict(ort_session(out, threads)), str(out), trained_scales=len(weights))


def fp32_only_nodes(onnx_path: Path) -> list[str]:
    """The nodes ONNX Runtime's per-channel quantizer cannot take, left in fp32 (and named in a warning): a
    grouped ConvTranspose, whose weight [in, out / groups, ...] gets out / groups scales against `out` biases
    (its quantizer failed with "operands could not be broadcast together"), and a LayerNormalization over more
    than one axis (nn.LayerNorm([C, H, W]) in a CNN), whose scale of several dimensions its per-channel path
    cannot take (it failed with numpy's "truth value of an array ... is ambiguous")."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    kinds = {
        "grouped ConvTranspose": [node.name for node in graph.node if node.op_type == "ConvTranspose"
                                  and any(a.name == "group" and a.i > 1 for a in node.attribute)],
        "LayerNormalization over several axes": [node.name for node in graph.node
                                                 if node.op_type == "LayerNormalization" and len(node.input) > 1
                                                 and ranks.get(node.input[1], 1) > 1],
    }
    for kind, names in kinds.items():
        if names:
            warnings.warn(f"int8: {len(names)} {kind} node(s) stay fp32 ({', '.join(names[:3])}): ONNX Runtime's "
                          "per-channel int8 does not handle their weight layout; the rest of the model is int8",
                          stacklevel=4)
    return [name for names in kinds.values() for name in names]


def output_op_types(onnx_path: Path) -> list[str]:
    """The op types of the nodes that produce the graph's outputs. Their outputs stay fp32: the
    quantizer would otherwise round the logits themselves to a uint8 grid calibrated on a few
    batches (one step of 0.1-0.2 between logits flipped close predictions), a rounding no user
    asked for and the trained model never had. Every node of those types keeps its fp32 output;
    the next quantized node rounds its input as before."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return sorted({node.op_type for node in graph.node if outputs.intersection(node.output)})


@contextlib.contextmanager
def quiet_quantizer_logs():
    """The quantizer's Python warnings, and the C++ ones of the sessions it makes to calibrate (a line per
    constant its graph clean-up drops: about 70 for a MobileNetV2, burying the parity warning), errors only."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)  # ONNX Runtime's own default (it has no getter)


@contextlib.contextmanager
def _torch_ao_deprecations_quiet():
    """PyTorch's FX int8 warns, inside its own default recipe, that its observers' reduce_range and its quantized
    tensors are deprecated: four lines of its internals per model on a command line, nothing the user can change
    (this backend is kept for comparisons with PyTorch int8; the ONNX Runtime backend is the default)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max", category=UserWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel",
                                category=UserWarning)
        yield


def quantize_torch(model: nn.Module, calibration, example_input: torch.Tensor, engine: str | None = None,
                   max_batches: int = 8) -> Int8Model:
    """PyTorch FX static int8 (slower here, see module docstring); min/max weight scales."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from ..techniques.quant_lsq import rounded_inputs

    rounding = rounded_inputs(model)
    if rounding:  # FX rebuilds the layers as a graph of its own: their input rounding (a forward pre-hook) is lost
        raise UnsupportedModelError(
            f"int8 backend torch: {len(rounding)} layers ({_first_names(rounding)}) round their inputs as training did "
            "(quant_lsq activations: true), which PyTorch's FX int8 drops; use backend='onnxruntime', which keeps it")
    engine = engine or ("x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack")
    torch.backends.quantized.engine = engine
    try:
        with _torch_ao_deprecations_quiet():
            prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), (example_input,))
    except torch.fx.proxy.TraceError as exc:  # control flow on the input: a loop over steps, a shape test
        from ..recurrent import LinearRNN

        loops = [n for n, m in model.named_modules() if isinstance(m, LinearRNN)]
        fix = (f"call recurrent.linear_to_rnn(model) first ({', '.join(loops[:3])} step through time in Python), or "
               if loops else "")
        raise UnsupportedModelError(f"int8 backend torch: PyTorch's FX cannot trace this model ({exc}); {fix}use "
                                    "backend='onnxruntime', which exports it through torch.onnx") from None
    except Exception as exc:  # FX fused or swapped a module the model's code still reads (a weight used in F.linear)
        raise _fx_refusal(exc, model, example_input) from exc
    x = example_input
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(batches(calibration, 64)):
                if i >= max_batches:
                    break
                prepared(x)
        with _torch_ao_deprecations_quiet():
            q = convert_fx(prepared)
        x = example_input
        q(x)
    except Exception as exc:  # e.g. "'padding_mode' circular is not supported by quantized convolution"
        raise _fx_refusal(exc, model, x) from exc
    return Int8Model(f"torch-{engine}", lambda x: logits_of(q(x)))  # fp32 logits, as the onnxruntime model's


def _fx_refusal(exc: Exception, model: nn.Module, x) -> JointCompressError:
    """What PyTorch's FX int8 raised, said as the back end's limit with the way out, unless the fp32 model fails
    on the same batch too: then the inputs are at fault (calibration images of another size), which another
    back end would not fix."""
    from ..errors import DataError
    from ..session.outputs import describe

    try:
        with torch.no_grad():
            model(x)
    except Exception as own:
        return DataError(f"int8: the model cannot run on the batch {describe(x)} ({type(own).__name__}: "
                         f"{_first_line(own)}); give calibration and example inputs of the shape and dtype it takes")
    return UnsupportedModelError(f"int8 backend torch: PyTorch's FX int8 cannot quantize this model ({type(exc).__name__}: "
                                 f"{_first_line(exc)}); use backend='onnxruntime', which exports it through torch.onnx")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def quantize_int8(model: nn.Module, spec: CompressionSpec | None, calibration, example_input: torch.Tensor,
                  backend: str = DEFAULT_BACKEND, workdir: str | os.PathLike | None = None,
                  threads: int = DEFAULT_THREADS) -> Int8Model:
    """An int8 model for CPU inference. `calibration`: inputs (tensor, (X, Y) or batches).
    `threads`: intra-op threads of the ONNX Runtime session (re-made by `with_threads`). A model on a GPU
    is deployed from a CPU copy; the parity check below still runs it where it is."""
    reference = model
    model, spec = on_cpu(model, spec)
    example_input = to_device(example_input, torch.device("cpu"))
    calibration = checked_calibration(calibration, example_input, fixed_shape=backend == "onnxruntime")
    if backend == "onnxruntime":
        if workdir is not None:
            int8 = quantize_onnxruntime(model, spec, calibration, Path(workdir), example_input, threads=threads)
        else:
            scratch = tempfile.TemporaryDirectory(prefix="jointcompress-int8-")  # it left a directory per call behind
            int8 = quantize_onnxruntime(model, spec, calibration, Path(scratch.name), example_input, threads=threads)
            int8.scratch = scratch
    elif backend.startswith("torch"):
        engine = backend.split("-", 1)[1] if "-" in backend else None
        int8 = quantize_torch(model, calibration, example_input, engine)
    else:
        raise JointCompressError(f"int8 backend {backend!r} is unknown; use 'onnxruntime' or 'torch[-x86|-qnnpack|...]'")
    int8.parity = calibration_parity(reference, int8, calibration)
    return int8


def checked_calibration(calibration, example_input, fixed_shape: bool = True):
    """The calibration inputs as tensors, checked before the export: numpy arrays (an .npz's) failed inside the
    export's reader ("'numpy.ndarray' object has no attribute 'detach'"), no inputs inside onnxruntime's
    calibrator ("No data is collected"), and inputs of another shape than the exported graph's (`fixed_shape`:
    all but the batch axis) in an onnxruntime INVALID_ARGUMENT."""
    import numpy as np

    as_tensor = (lambda a: torch.from_numpy(a) if isinstance(a, np.ndarray) else a)
    if isinstance(calibration, np.ndarray):
        calibration = as_tensor(calibration)
    elif isinstance(calibration, (tuple, list)) and len(calibration) == 2 and any(isinstance(a, np.ndarray) for a in calibration):
        calibration = tuple(as_tensor(a) for a in calibration)
    if iter(calibration) is calibration:  # a generator: reading its first batch here would take it from the export
        return calibration
    first = next(iter(batches(calibration, 64)), None)
    inputs = first[0] if first is not None else None
    if inputs is None or (isinstance(inputs, torch.Tensor) and len(inputs) == 0):
        raise JointCompressError("quantize_int8: the calibration data holds no inputs; give a few hundred of the "
                                 "model's training inputs (a tensor, (X, Y) tensors or a DataLoader)")
    if fixed_shape and isinstance(inputs, torch.Tensor) and isinstance(example_input, torch.Tensor) \
            and tuple(inputs.shape[1:]) != tuple(example_input.shape[1:]):
        raise JointCompressError(f"quantize_int8: the calibration inputs are {list(inputs.shape[1:])} per sample and "
                                 f"example_input {list(example_input.shape[1:])}; give calibration inputs of the shape "
                                 "the model takes")
    return calibration


def calibration_parity(model: nn.Module, int8: Int8Model, calibration, max_batches: int = 8) -> dict:
    """The int8 model against the fp32 one on the first calibration batches (parity.compare): the share of
    outputs whose top-1 class is the same, and the largest |logit difference| (with the largest |logit| for
    its scale). Warned under PARITY_AGREEMENT: int8 of a model whose activations have outliers (a
    transformer's attention and LayerNorm inputs) loses accuracy silently, and a user deploying it should
    know before measuring; `int8_parity` measures accuracy on held-out data."""
    first = list(zip(range(max_batches), batches(calibration, 64)))
    unlabelled = all(y is None for _, (_, y) in first)  # calibrated with inputs alone: read from the outputs
    regression = any(_regression_targets(y) for _, (_, y) in first) or (unlabelled and _reconstructs(model, first[0][1][0]))
    was_training = model.training
    try:
        rep = compare(model.eval(), int8, [(x, None) for _, (x, _) in first], f"int8 {int8.backend}", path=int8.path,
                      classes=not regression)
    finally:
        model.train(was_training)
    parity = {"samples_compared": rep.samples, "top1_agreement": rep.top1_agreement,
              "outputs_compared": rep.outputs_compared,
              "max_abs_logit_diff": rep.max_abs_logit_diff, "max_abs_logit": rep.max_abs_reference}
    if rep.top1_agreement is not None and rep.top1_agreement < PARITY_AGREEMENT:
        outputs = f" ({rep.outputs_compared} outputs)" if rep.outputs_compared != rep.samples else ""
        warnings.warn(f"int8 {int8.backend}: the top-1 class differs from the fp32 model's on {1 - rep.top1_agreement:.1%} "
                      f"of {rep.samples} calibration samples{outputs} (largest logit difference {rep.max_abs_logit_diff:.3g}, "
                      f"largest logit {rep.max_abs_reference:.3g}); measure it on held-out data (deploy.int8_parity) "
                      f"before deploying. {_parity_advice(int8)}; the fp32 ONNX model (deploy.export_and_check) keeps "
                      "the accuracy", stacklevel=3)
    return parity


def _parity_advice(int8: Int8Model) -> str:
    """What may close an int8 model's gap: trained 8-bit scales, which only the onnxruntime backend uses."""
    if int8.backend != "onnxruntime":
        return ("backend='onnxruntime' uses the scales quant_lsq (bits: 8) trained for the weights; this backend "
                "calibrates its own")
    if int8.trained_scales:
        return f"{int8.trained_scales} layers already use their trained scales"
    return "training with quant_lsq (bits: 8) gives the int8 weights their trained scales"


def _regression_targets(y) -> bool:
    """Float targets that are not soft labels ([batch, classes] summing to one): a regression's, whose
    outputs have no top-1 class to agree on."""
    if not isinstance(y, torch.Tensor) or not torch.is_floating_point(y):
        return False
    soft = y.dim() == 2 and y.shape[1] > 1 and bool(torch.allclose(y.sum(1), torch.ones(len(y), device=y.device), atol=1e-3))
    return not soft


def _reconstructs(model: nn.Module, x) -> bool:
    """Outputs of the inputs' own shape (an autoencoder, calibrated with its inputs alone): a regression, not
    classes. (A dense map of as many classes as the input has channels reads so too: its agreement is not checked.)"""
    from ..model_call import call_model, evaluating, model_device, to_device
    from ..session.outputs import logits_of

    if not isinstance(x, torch.Tensor):
        return False
    with evaluating(model), torch.no_grad():
        out = logits_of(call_model(model, to_device(x[:1], model_device(model))))
    return tuple(out.shape[1:]) == tuple(x.shape[1:])


def int8_parity(model: nn.Module, int8: Int8Model, eval_data) -> ParityReport:
    """The int8 model against `model` (read in eval mode, each module's mode put back) on `eval_data`."""
    from ..model_call import evaluating

    with evaluating(model):
        return compare(model, int8, eval_data, f"int8 {int8.backend}", path=int8.path)


def _first_names(names: list[str], shown: int = 3) -> str:
    """The first `shown` names, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

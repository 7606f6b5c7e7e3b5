"""ONNX export of a finalized model, followed by an automatic parity check in ONNX Runtime.

The legacy TorchScript exporter (`dynamo=False`) is the default: on the plain Conv/Linear/BN
models jointcompress produces it is exact, takes well under a second and keeps parameter
names, which `deploy.int8` relies on to attach the trained scales. The torch.export-based
exporter (`exporter="dynamo"`) takes ~3 s even for tiny models (torch 2.13) and prints
progress; it is used as a fallback when the legacy exporter fails.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DataError, JointCompressError, UnsupportedModelError
from ..model_call import evaluating
from ..model_copy import on_cpu
from . import timing
from .parity import ParityReport, compare
from .timing import DEFAULT_THREADS

OPSET = 17


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                exporter: str = "auto") -> Path:
    """Write `model` (eval mode, dynamic batch) to `path`; input "input", output "logits".

    The exporters' own deprecation chatter is dropped; the tracer's warnings are not: one says the
    graph fixed a Python branch or loop on the input's values, which export_and_check's parity
    check then shows on real data."""
    if not isinstance(example_input, torch.Tensor):
        raise UnsupportedModelError(
            f"ONNX export takes a model of one input tensor (the exported graph's input \"input\"); got "
            f"{type(example_input).__name__} example inputs. Wrap the model in a module whose forward takes one tensor")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model, example_input = copy.deepcopy(on_cpu(model)[0]).eval(), example_input.cpu()  # ONNX Runtime runs on the CPU
    if getattr(getattr(model, "config", None), "use_cache", False):  # a transformers LM's copy: logits only
        model.config.use_cache = False  # its key/value cache (a DynamicCache output) stopped both exporters
    model = _logits_first(model, example_input)
    tmp = path.with_name(f".{path.name}.tmp")
    errors = []
    for kind in (["legacy", "dynamo"] if exporter == "auto" else [exporter]):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _export(kind, model, example_input, tmp)
            os.replace(tmp, path)
            _pass_on_tracer_warnings(caught, type(model).__name__)
            return path
        except Exception as exc:  # try the next exporter, report all if none works
            errors.append(f"{kind}: {type(exc).__name__}: {_plain(str(exc))[:400]}")
    raise JointCompressError(f"ONNX export to {path} failed: " + " | ".join(errors))


class _LogitsOnly(nn.Module):
    """The model's logits alone, read from the dict it returns (outputs.logits_of)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        from ..session.outputs import logits_of

        return logits_of(self.model(x))


def _logits_first(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """The graph's first output is named "logits" and read as them (ort_predict, the parity check, int8). A
    model returning a dict led by another entry ({"features": h, "logits": y}) exported its features under
    that name, and the parity check then blamed a Python loop; such a model is exported through _LogitsOnly.
    A dict with no "logits" is refused here, by name, not inside the exporter."""
    from ..session.outputs import logits_of

    with torch.no_grad():
        outputs = model(example_input)
    if isinstance(outputs, dict) and next(iter(outputs), None) != "logits":
        logits_of(outputs)  # a DataError naming the dict's keys when it holds no logits
        return _LogitsOnly(model)
    return model


def _export(kind: str, model: nn.Module, example_input: torch.Tensor, tmp: Path) -> None:
    if kind == "legacy":
        with onnx_log_quiet():
            torch.onnx.export(model, (example_input,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    else:
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (example_input,), str(tmp), dynamo=True, opset_version=18,
                          input_names=["input"], output_names=["logits"], verbose=False,
                          dynamic_shapes=({0: batch},), external_data=False)


@contextlib.contextmanager
def onnx_log_quiet():
    """The legacy exporter turns its ONNX log on whatever the caller asked (torch 2.13 reads the flag's getter,
    not its value), and a graph it cannot export is printed whole to stdout ("Torch IR graph at exception")
    before the dynamo exporter, tried next, succeeds: a user read a failure of a model that exported fine.
    The log's switch is left as it was found."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils as legacy
    except ImportError:
        legacy = None
    setup = getattr(legacy, "setup_onnx_logging", None)
    if setup is None:  # another torch: its own logging as it is
        yield
        return
    enabled = torch._C._jit_is_onnx_log_enabled()

    @contextlib.contextmanager
    def as_asked(verbose: bool):
        torch._C._jit_set_onnx_log_enabled(bool(verbose) or enabled)
        yield

    legacy.setup_onnx_logging = as_asked
    try:
        yield
    finally:
        legacy.setup_onnx_logging = setup
        torch._C._jit_set_onnx_log_enabled(enabled)


def _pass_on_tracer_warnings(caught, model_name: str) -> None:
    """One warning naming where the tracer fixed a value in the model's own code. Those raised inside
    torch (nn.LSTM's checks of its input) and the exporters' deprecation notes are dropped."""
    torch_dir = os.path.dirname(torch.__file__)
    places = sorted({f"{w.filename}:{w.lineno}" for w in caught
                     if issubclass(w.category, torch.jit.TracerWarning) and not w.filename.startswith(torch_dir)})
    if places:
        warnings.warn(f"ONNX export of {model_name}: the tracer fixed a value computed from the input at "
                      f"{', '.join(places[:5])} (a Python branch, loop or number), so the graph may not match the "
                      "model on other inputs", stacklevel=3)


def _plain(text: str) -> str:
    """An exporter's message without its terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def ort_session(path: str | os.PathLike, threads: int = DEFAULT_THREADS):
    """An ONNX Runtime CPU session from the package's one factory (threads set, spinning off)."""
    return timing.ort_session(path, threads)


ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(uint8)": torch.uint8}


def session_input_dtype(session) -> torch.dtype:
    """The dtype the session's first input declares (float32 where it is not one of ORT_DTYPES)."""
    return ORT_DTYPES.get(session.get_inputs()[0].type, torch.float32)


def ort_input(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A model input as ONNX Runtime takes it: on the CPU, contiguous, of `dtype` (the graph's
    input type); by default float32 if it is floating, and integer inputs (token ids) as they are."""
    x = x.detach().cpu()
    if dtype is None:
        dtype = torch.float32 if x.is_floating_point() else x.dtype
    return x.to(dtype).contiguous()


def ort_predict(session):
    """Wrap an ONNX Runtime session as a torch -> torch function."""
    name, dtype = session.get_inputs()[0].name, session_input_dtype(session)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: ort_input(x, dtype).numpy()})[0])

    predict.session = session  # so a timing can check (or rebuild) the session's threads
    return predict


def bound_predict(session):
    """Like `ort_predict`, but with input and output buffers bound once per input (IOBinding).

    Why: at batch 1 a small model computes in ~10 us, and `session.run` adds a few more per
    call (it converts the input dict, allocates and wraps the outputs; torch -> numpy -> torch
    adds more). A deployment that reuses its input and output buffers binds them once, as
    here: the binding is rebuilt only when a call passes another tensor (address, shape). The
    returned logits tensor is that binding's output buffer: the next call with the same input
    overwrites it (clone it to keep it). A call with the bound tensor checks only its identity,
    address and shape, and runs through `bound_runner`: 15.5 -> 13.3 us per batch-1 call
    (LeNet-5 at 4/16/64 channels, 1 thread; ORT's own work is ~12.5 us of it).
    """
    import numpy as np
    import onnxruntime as ort

    name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    dtype = session_input_dtype(session)
    state = {"key": None, "input": None}

    def bind(x: torch.Tensor) -> None:
        probe = session.io_binding()  # one run to learn the output's shape
        probe.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x.numpy()))
        probe.bind_output(out_name)
        session.run_with_iobinding(probe)
        out = np.empty(probe.get_outputs()[0].shape(), dtype=np.float32)
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x.numpy()))
        binding.bind_ortvalue_output(out_name, ort.OrtValue.ortvalue_from_numpy(out))
        # the input tensor and output array stay referenced while bound
        state.update(key=(x.data_ptr(), x.shape), binding=binding, input=x, out=torch.from_numpy(out),
                     run=bound_runner(session, binding))

    def predict(x: torch.Tensor) -> torch.Tensor:
        # the bound tensor again, its buffer unchanged: run (checks cost ~1.5 us of a 15 us call at batch 1)
        if x is state["input"] and (x.data_ptr(), x.shape) == state["key"]:
            state["run"]()
            return state["out"]
        if x.dtype != dtype or x.device.type != "cpu" or x.requires_grad or not x.is_contiguous():
            x = ort_input(x, dtype)
        if (x.data_ptr(), x.shape) != state["key"]:
            bind(x)
        state["run"]()
        return state["out"]

    predict.session = session
    return predict


def bound_runner(session, binding):
    """A zero-argument call that runs `session` on `binding`, without the Python wrapper's
    per-call work where that is safe. `InferenceSession.run_with_iobinding` checks the binding's
    session and looks up a WebGPU graph-capture id on every call before it calls the compiled
    session: ~1 us of a 14 us batch-1 call (LeNet-5, 4/16/64 channels, 1 thread), and passing a
    RunOptions to it costs ~30 us more (the id lookup raises and catches). The compiled call with
    the same binding and a RunOptions made once does the same work; it is used when the session
    is the binding's and no graph capture is on, else the public call."""
    import onnxruntime as ort

    compiled, inner = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    capture = getattr(compiled, "is_webgpu_graph_capture_enabled", None)
    if (compiled is None or inner is None or getattr(binding, "_session", None) is not compiled
            or not hasattr(compiled, "run_with_iobinding") or (capture is not None and capture())):
        return lambda: session.run_with_iobinding(binding)
    options = ort.RunOptions()
    return lambda: compiled.run_with_iobinding(inner, options)


def _runnable(path: Path, example_input: torch.Tensor):
    """`ort_predict` on the exported file, once run on the example: an export that ONNX Runtime's CPU kernels
    refuse (a convolution with padding='same' and dilation, in one) raised onnxruntime's own error."""
    try:
        predict = ort_predict(ort_session(path))
        predict(example_input)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise UnsupportedModelError(
            f"{path}: ONNX Runtime cannot run the exported graph ({str(exc)[:300]}): an operation exported in a form "
            "its CPU kernels do not take; the node named there comes from one of the model's layers. Change that "
            "layer's settings (e.g. explicit padding instead of padding='same') or try exporter='dynamo'") from exc
    return predict


ROUNDED_TOP1 = 0.99  # a model that rounds its activations: the share of top-1 classes the graph must keep


def _rounding_flips(model: nn.Module, report: ParityReport, path) -> bool:
    """A model whose layers round their inputs (quant_lsq activations: true) turns a float difference
    between two runtimes into a whole rounding step wherever a value sits on a step's edge: a few outputs
    move by far more than float rounding while the graph computes the same thing (MobileNetV2: 31 of
    32 samples exact, top-1 kept on all). Such a gap is said, not raised, while the top-1 classes agree
    on at least ROUNDED_TOP1 of the outputs (an output without classes keeps the strict check)."""
    from ..techniques.quant_lsq import rounded_inputs

    rounding = rounded_inputs(model)
    if not rounding or report.top1_agreement is None or report.top1_agreement < ROUNDED_TOP1:
        return False
    warnings.warn(f"{path}: {report}, top-1 agreement {report.top1_agreement:.2%}: {len(rounding)} layer(s) round their "
                  "inputs (quant_lsq activations), and a float difference between ONNX Runtime and PyTorch moves an "
                  "input across a rounding step on a few outputs", stacklevel=3)
    return True


def export_and_check(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                     eval_data=None, exporter: str = "auto", tolerance: float | None = 1e-3) -> ParityReport:
    """Export, then compare ONNX Runtime with PyTorch on `eval_data` (or the example input).

    An fp32 graph that computes what the model computes differs by float rounding only (1e-6 of the
    logits' scale on the built-in models); a gap over `tolerance` times the largest reference logit
    means the graph computes something else, and raises. `tolerance=None` only reports."""
    path = export_onnx(model, path, example_input, exporter)
    model = on_cpu(model)[0]  # the float32 model it was exported from (a GPU's TF32 convolutions would differ)
    with evaluating(model):  # read in eval mode, each module's mode put back: a caller may go on training it
        return _checked_parity(model, path, example_input, eval_data, tolerance)


def _checked_parity(model: nn.Module, path, example_input, eval_data, tolerance: float | None) -> ParityReport:
    predict = _runnable(path, example_input)
    try:
        report = compare(model, predict, eval_data if eval_data is not None else example_input, "onnxruntime fp32",
                         path=str(path))
    except Exception as exc:  # the example ran (_runnable): what ONNX Runtime refuses here is eval_data's shape
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else "the example's"
        said = " ".join(str(exc).split())[:200]
        raise DataError(f"eval_data: ONNX Runtime cannot run {path} on it ({said}): the graph was exported "
                        f"on example_input of shape {shape}, and only its batch dimension varies; give eval_data of "
                        "that shape past the batch, or export on an example of eval_data's shape") from exc
    allowed = None if tolerance is None else tolerance * max(1.0, report.max_abs_reference or 0.0)
    if allowed is not None and report.max_abs_logit_diff > allowed and _rounding_flips(model, report, path):
        return report
    if allowed is not None and report.max_abs_logit_diff > allowed:
        raise UnsupportedModelError(
            f"{path}: the ONNX graph disagrees with {type(model).__name__} ({report}; allowed {allowed:.3g}): the "
            "export fixed a Python branch or value on the input (see the tracer's warning) or an operation exports "
            "differently. Write the forward with tensor operations (torch.where for a branch) or try exporter='dynamo'; "
            "the file stays there, and tolerance=None returns the report instead of raising")
    return report

"""Before/after measurements of a compressed model: parameters, MACs, bytes on disk, latency, accuracy.

Compression claims are only useful when measured the same way on both sides, in one run:
latency is timed by deploy.timing (same threads for both sides, ORT spinning off,
interleaved rounds so background load hits both equally, medians, each side also alone), bytes are real file sizes (the dense baseline is the fp32 state dict written with
safetensors; the compressed side's weights file, which `compress` reports too, and with its manifest), and MACs count only what the
physically smaller layers really compute (masked zeros inside a layer are *not* subtracted,
because dense kernels still multiply them).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn

from .artifact.size import dense_fp32_bytes
from .deploy.timing import DEFAULT_THREADS, Timing, time_contenders
from .errors import JointCompressError
from .model_call import call_model


def count_params(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "nonzero": sum(int((p != 0).sum()) for p in params)}


def count_macs(model: nn.Module, example_input) -> int:
    """Multiply-accumulates of one sample: every matrix product and convolution its forward runs
    (attention's QK^T and AV too), counted by torch's FlopCounterMode (halved). A recurrent layer
    counts by its formula (_recurrent_macs): its fused kernels are one operation the counter does not
    see, its plain ones a product per step it does. The example: the model's inputs (batch_of).
    Elementwise work (activations, normalization) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    recurrent, seen_before = 0, []

    def before(mod, args, kwargs):
        seen_before.append(counter.get_total_flops())

    def after(mod, args, kwargs, out):
        nonlocal recurrent  # the formula in place of whatever the counter saw inside the layer
        x = args[0] if args else kwargs.get("input")  # rnn(x) or rnn(input=x)
        recurrent += _recurrent_macs(mod, x) - (counter.get_total_flops() - seen_before.pop()) // 2

    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    hooks = [m.register_forward_pre_hook(before, with_kwargs=True) for m in rnns]
    hooks += [m.register_forward_hook(after, with_kwargs=True) for m in rnns]
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel is one op the counter does not see
    try:
        with torch.no_grad(), counter:
            call_model(model.eval(), batch_of(example_input, 1))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for h in hooks:
            h.remove()
    return int(counter.get_total_flops() // 2 + recurrent)


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


# scaled_dot_product_attention's CPU kernel, which the counter has no formula for (its QK^T and AV products)
_SDPA_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_ATTENTION = {} if _SDPA_CPU is None else {_SDPA_CPU: _cpu_attention_flops}
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _recurrent_macs(rnn: nn.RNNBase, x) -> int:
    """One sample's multiply-accumulates through an RNN / LSTM / GRU: at every time step, each layer and
    direction multiplies its input and its hidden state by every gate's weights (and an LSTM with
    proj_size its cell output by the projection)."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        steps = x.data.shape[0] / max(int(x.batch_sizes[0]), 1)  # mean length of the batch's sequences
    else:
        steps = x.shape[1] if rnn.batch_first and x.dim() == 3 else x.shape[0]  # [B, T, F] or [T, (B,) F]
    dirs = 2 if rnn.bidirectional else 1
    out = (rnn.proj_size or rnn.hidden_size) if isinstance(rnn, nn.LSTM) else rnn.hidden_size  # the state's width
    per_step = 0
    for layer in range(rnn.num_layers):
        width_in = rnn.input_size if layer == 0 else out * dirs
        per_step += dirs * GATES[rnn.mode] * rnn.hidden_size * (width_in + out)
        if isinstance(rnn, nn.LSTM) and rnn.proj_size:
            per_step += dirs * rnn.hidden_size * rnn.proj_size
    return int(steps * per_step)


def batch_of(example_input, n: int):
    """`n` samples: the first n of the example if it has them, else its first sample repeated.
    The example is a tensor, or a tuple / list / dict of them (a model with several inputs; see
    model_call.py): each tensor is cut along its first dimension, anything else kept as it is."""
    if isinstance(example_input, dict):
        return {k: batch_of(v, n) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(batch_of(v, n) for v in example_input)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        return example_input
    if example_input.shape[0] >= n:
        return example_input[:n].contiguous()
    return example_input[:1].expand(n, *example_input.shape[1:]).contiguous()


def interleaved_latency(fns: dict[str, Callable[[], object]], runs: int = 50, warmup: int = 5,
                        threads: int = DEFAULT_THREADS) -> dict[str, float]:
    """Median milliseconds per call of each fn (deploy.timing.time_contenders; medians only)."""
    return time_contenders(fns, threads=threads, rounds=runs, warmup=warmup).interleaved_ms


def timed_sides(sides: dict, example_input, batch_sizes, runs: int, threads: int) -> dict[int, Timing]:
    """One honest timing per batch size of every side (an ORT int8 side is re-made with `threads`)."""
    from .deploy.int8 import Int8Model

    sides = {k: (m.with_threads(threads) if isinstance(m, Int8Model) else m) for k, m in sides.items()}
    out = {}
    for bs in batch_sizes:
        x = batch_of(example_input, bs)
        out[bs] = time_contenders({s: _call(m, x) for s, m in sides.items()}, threads=threads, rounds=runs)
    return out


def _call(model, x) -> Callable[[], object]:
    """`model` on `x`, carrying the ONNX Runtime session the model runs (if any), whose threads time_contenders checks."""
    def call():
        return call_model(model, x)

    call.session = getattr(model, "session", None) or getattr(getattr(model, "predict", None), "session", None)
    return call


def bench(model_before: nn.Module, model_after, example_input,
          eval_fn: Callable[[object], float] | None = None, artifact_dir: str | os.PathLike | None = None,
          runs: int = 50, batch_sizes: tuple[int, ...] = (1, 64), threads: int = DEFAULT_THREADS,
          int8_model=None) -> dict:
    """Measure both models; returns a JSON-able dict {"before": {...}, "after": {...}, "ratios": {...}}.

    `model_after` may be an nn.Module or any callable (e.g. an int8 model); parameters and MACs
    are only counted for modules. `eval_fn(model) -> accuracy` is called on each side.
    `example_input`: the models' inputs, a tensor or a tuple / dict of them (batch_of).
    Latency: `threads` threads for both sides, timed by deploy.timing (recorded in "timing").
    `int8_model`: the artifact's deployable int8 model (deploy.int8.quantize_int8), timed in the same
    interleaved rounds as a third side ("int8", its latencies against "before" in "ratios_int8"); its
    accuracy is the caller's to measure (eval_fn takes modules).
    """
    for name, value in (("runs", runs), ("threads", threads)):  # else a StatisticsError or a torch RuntimeError
        if not isinstance(value, int) or value < 1:
            raise JointCompressError(f"bench: {name}={value!r}; give a whole number of at least 1")
    model_before.eval()
    if isinstance(model_after, nn.Module):
        model_after.eval()
    sides = {"before": model_before, "after": model_after}
    result: dict = {"before": {}, "after": {}, "runs": runs, "threads": threads}
    if int8_model is not None:
        sides["int8"], result["int8"] = int8_model, {}
        if getattr(int8_model, "path", None) and os.path.isfile(int8_model.path):  # what an int8 deployment ships
            result["int8"]["bytes_on_disk"] = os.path.getsize(int8_model.path)
    for side, m in sides.items():
        if isinstance(m, nn.Module):
            result[side]["params"] = count_params(m)
            result[side]["macs"] = count_macs(m, example_input)
    result["before"]["weights_file_bytes"] = result["before"]["bytes_on_disk"] = dense_fp32_bytes(model_before)
    if artifact_dir is not None:  # its own two files, not whatever else the folder holds
        from .artifact import file_sizes

        sizes = file_sizes(artifact_dir)
        result["after"]["weights_file_bytes"] = sizes["weights_file"]
        result["after"]["bytes_on_disk"] = sizes["weights_file"] + sizes["manifest"]
    elif isinstance(model_after, nn.Module):
        result["after"]["weights_file_bytes"] = result["after"]["bytes_on_disk"] = dense_fp32_bytes(model_after)
    timings = timed_sides(sides, example_input, batch_sizes, runs, threads)
    for bs, timing in timings.items():
        for side in sides:
            result[side][f"latency_ms_b{bs}"] = timing.interleaved_ms[side]
            result[side][f"latency_alone_ms_b{bs}"] = timing.alone_ms[side]
    result["timing"] = {f"b{bs}": t.to_dict() for bs, t in timings.items()}
    result["latency_flagged"] = sorted({f"{s} (batch {bs})" for bs, t in timings.items() for s in t.flagged})
    if eval_fn is not None:
        for side, m in sides.items():
            if side != "int8":
                result[side]["accuracy"] = float(eval_fn(m))
    result["ratios"] = _ratios(result["before"], result["after"])
    if int8_model is not None:
        result["ratios_int8"] = _ratios(result["before"], result["int8"])
    return result


def _ratios(before: dict, after: dict) -> dict:
    out = {}
    if "params" in before and "params" in after:
        out["params_nonzero"] = before["params"]["nonzero"] / max(after["params"]["nonzero"], 1)
    for key in ["macs", "weights_file_bytes", "bytes_on_disk"] + [k for k in before if k.startswith("latency_")]:
        if key in before and key in after and after[key]:
            out[key] = before[key] / after[key]
    if "accuracy" in before and "accuracy" in after:
        out["accuracy_delta"] = after["accuracy"] - before["accuracy"]
    return out


def render_table(result: dict):
    """A rich Table: one row per measurement, before / after / before÷after."""
    from rich.table import Table

    table = Table(title="jointcompress bench (medians; ratio = before / after; on accuracy rows, after − before)")
    for col in ("metric", "before", "after", "ratio"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    b, a, r = result["before"], result["after"], result.get("ratios", {})

    def fmt(v, unit=""):
        if v is None:
            return "-"
        return f"{v:,.3f}{unit}" if isinstance(v, float) else f"{v:,}{unit}"

    def row(label, bv, av, ratio):
        table.add_row(label, fmt(bv), fmt(av), "-" if ratio is None else f"{ratio:.2f}x")

    total = b.get("params", {}).get("total"), a.get("params", {}).get("total")  # channels removed shrink the total
    row("params (total)", *total, total[0] / total[1] if all(total) else None)
    row("params (nonzero)", b.get("params", {}).get("nonzero"), a.get("params", {}).get("nonzero"), r.get("params_nonzero"))
    row("MACs / sample", b.get("macs"), a.get("macs"), r.get("macs"))
    row("weights file bytes", b.get("weights_file_bytes"), a.get("weights_file_bytes"), r.get("weights_file_bytes"))
    row("bytes on disk (+ manifest)", b.get("bytes_on_disk"), a.get("bytes_on_disk"), r.get("bytes_on_disk"))
    for key in sorted(k for k in b if k.startswith("latency_ms")):  # interleaved, then alone: tables show both
        bs = key.rsplit("b", 1)[1]
        row(f"latency ms (batch {bs}, interleaved)", b[key], a.get(key), r.get(key))
        alone = f"latency_alone_ms_b{bs}"
        if alone in b:
            row(f"latency ms (batch {bs}, alone)", b[alone], a.get(alone), r.get(alone))
    if "accuracy" in b or "accuracy" in a:
        table.add_row("accuracy", fmt(b.get("accuracy")), fmt(a.get("accuracy")),
                      "-" if "accuracy_delta" not in r else f"{r['accuracy_delta']:+.4f}")
    _int8_rows(result, row, fmt, table)
    return table


def _int8_rows(result: dict, row, fmt, table) -> None:
    """The deployable int8 ONNX Runtime model's latencies and accuracy beside the dense fp32 PyTorch model's
    (bench --int8): the speed a user deploys, which the artifact in PyTorch (its weights dequantized) does not show."""
    b, i8, r = result["before"], result.get("int8"), result.get("ratios_int8", {})
    if not i8:
        return
    if "bytes_on_disk" in i8:  # the ONNX file itself: graph and int8 weights, all a deployment needs
        row("int8 ONNX Runtime: model file bytes", b.get("bytes_on_disk"), i8["bytes_on_disk"], r.get("bytes_on_disk"))
    for key in sorted(k for k in b if k.startswith("latency_ms")):
        bs = key.rsplit("b", 1)[1]
        row(f"int8 ONNX Runtime: latency ms (batch {bs}, interleaved)", b[key], i8.get(key), r.get(key))
        alone = f"latency_alone_ms_b{bs}"
        if alone in i8:
            row(f"int8 ONNX Runtime: latency ms (batch {bs}, alone)", b[alone], i8[alone], r.get(alone))
    if "accuracy" in i8:
        table.add_row("int8 ONNX Runtime: accuracy", fmt(b.get("accuracy")), fmt(i8["accuracy"]),
                      "-" if "accuracy_delta" not in r else f"{r['accuracy_delta']:+.4f}")
    if i8.get("top1_agreement") is not None:  # with the artifact in PyTorch: what int8 deployment changes
        table.add_row("int8 ONNX Runtime: top-1 agreement with after", "-", fmt(i8["top1_agreement"]), "-")


def render_breakdown(breakdown: dict):
    """A rich Table: where the weights file's bytes go, per layer and per part (sums to the file)."""
    from rich.table import Table

    from .artifact.size import format_breakdown

    rows = format_breakdown(breakdown)
    table = Table(title=f"weights file: {breakdown['file']:,} B by part")
    for i, col in enumerate(rows[0]):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows[1:]:
        table.add_row(*r, style="bold" if r[0] == "all" else None)
    return table

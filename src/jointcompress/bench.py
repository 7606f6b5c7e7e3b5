"""Before/after measurements of a compressed model: parameters, MACs, bytes on disk, latency, accuracy.

Compression claims are only useful when measured the same way on both sides, in one run:
latency is timed by deploy.timing (same threads for both sides, ORT spinning off,
interleaved rounds so background load hits both equally, medians, each side also alone), bytes are real file sizes (the dense baseline is the fp32 state dict written with
safetensors, the compressed side is the artifact directory), and MACs count only what the
physically smaller layers really compute (masked zeros inside a layer are *not* subtracted,
because dense kernels still multiply them).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .artifact.size import dense_fp32_bytes
from .deploy.timing import DEFAULT_THREADS, Timing, time_contenders
from .layer_types import COMPRESSIBLE
from .model_call import call_model


def count_params(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "nonzero": sum(int((p != 0).sum()) for p in params)}


def count_macs(model: nn.Module, example_input) -> int:
    """Multiply-accumulates of one sample through every Linear and convolution (forward hooks);
    the example: the model's inputs (batch_of)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        per_out = mod.in_features if isinstance(mod, nn.Linear) else \
            (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        total += out.numel() // max(out.shape[0], 1) * per_out if out.dim() > 1 else out.numel() * per_out

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COMPRESSIBLE)]
    try:
        with torch.inference_mode():
            call_model(model.eval(), batch_of(example_input, 1))
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def dir_bytes(path: str | os.PathLike) -> int:
    """Sum of real file sizes under `path` (a file or a directory)."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


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
        out[bs] = time_contenders({s: (lambda m=m: call_model(m, x)) for s, m in sides.items()}, threads=threads,
                                  rounds=runs)
    return out


def bench(model_before: nn.Module, model_after, example_input,
          eval_fn: Callable[[object], float] | None = None, artifact_dir: str | os.PathLike | None = None,
          runs: int = 50, batch_sizes: tuple[int, ...] = (1, 64), threads: int = DEFAULT_THREADS) -> dict:
    """Measure both models; returns a JSON-able dict {"before": {...}, "after": {...}, "ratios": {...}}.

    `model_after` may be an nn.Module or any callable (e.g. an int8 model); parameters and MACs
    are only counted for modules. `eval_fn(model) -> accuracy` is called on each side.
    `example_input`: the models' inputs, a tensor or a tuple / dict of them (batch_of).
    Latency: `threads` threads for both sides, timed by deploy.timing (recorded in "timing").
    """
    model_before.eval()
    if isinstance(model_after, nn.Module):
        model_after.eval()
    sides = {"before": model_before, "after": model_after}
    result: dict = {"before": {}, "after": {}, "runs": runs, "threads": threads}
    for side, m in sides.items():
        if isinstance(m, nn.Module):
            result[side]["params"] = count_params(m)
            result[side]["macs"] = count_macs(m, example_input)
    result["before"]["bytes_on_disk"] = dense_fp32_bytes(model_before)
    if artifact_dir is not None:
        result["after"]["bytes_on_disk"] = dir_bytes(artifact_dir)
    elif isinstance(model_after, nn.Module):
        result["after"]["bytes_on_disk"] = dense_fp32_bytes(model_after)
    timings = timed_sides(sides, example_input, batch_sizes, runs, threads)
    for bs, timing in timings.items():
        for side in sides:
            result[side][f"latency_ms_b{bs}"] = timing.interleaved_ms[side]
            result[side][f"latency_alone_ms_b{bs}"] = timing.alone_ms[side]
    result["timing"] = {f"b{bs}": t.to_dict() for bs, t in timings.items()}
    result["latency_flagged"] = sorted({f"{s} (batch {bs})" for bs, t in timings.items() for s in t.flagged})
    if eval_fn is not None:
        for side, m in sides.items():
            result[side]["accuracy"] = float(eval_fn(m))
    result["ratios"] = _ratios(result["before"], result["after"])
    return result


def _ratios(before: dict, after: dict) -> dict:
    out = {}
    if "params" in before and "params" in after:
        out["params_nonzero"] = before["params"]["nonzero"] / max(after["params"]["nonzero"], 1)
    for key in ["macs", "bytes_on_disk"] + [k for k in before if k.startswith("latency_ms")]:
        if key in before and key in after and after[key]:
            out[key] = before[key] / after[key]
    if "accuracy" in before and "accuracy" in after:
        out["accuracy_delta"] = after["accuracy"] - before["accuracy"]
    return out


def render_table(result: dict):
    """A rich Table: one row per measurement, before / after / before÷after."""
    from rich.table import Table

    table = Table(title="jointcompress bench (medians; ratio = before / after)")
    for col in ("metric", "before", "after", "ratio"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    b, a, r = result["before"], result["after"], result.get("ratios", {})

    def fmt(v, unit=""):
        if v is None:
            return "-"
        return f"{v:,.3f}{unit}" if isinstance(v, float) else f"{v:,}{unit}"

    def row(label, bv, av, ratio):
        table.add_row(label, fmt(bv), fmt(av), "-" if ratio is None else f"{ratio:.2f}x")

    row("params (total)", b.get("params", {}).get("total"), a.get("params", {}).get("total"), None)
    row("params (nonzero)", b.get("params", {}).get("nonzero"), a.get("params", {}).get("nonzero"), r.get("params_nonzero"))
    row("MACs / sample", b.get("macs"), a.get("macs"), r.get("macs"))
    row("bytes on disk", b.get("bytes_on_disk"), a.get("bytes_on_disk"), r.get("bytes_on_disk"))
    for key in sorted(k for k in b if k.startswith("latency_ms")):
        row(f"latency ms (batch {key.rsplit('b', 1)[1]})", b[key], a.get(key), r.get(key))
    if "accuracy" in b or "accuracy" in a:
        table.add_row("accuracy", fmt(b.get("accuracy")), fmt(a.get("accuracy")),
                      "-" if "accuracy_delta" not in r else f"{r['accuracy_delta']:+.4f}")
    return table


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

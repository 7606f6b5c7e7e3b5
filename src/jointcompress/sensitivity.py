"""Sensitivity scan: how much the metric drops when one layer (or one coupled channel group)
is pruned or quantized on its own, everything else left untouched.

Why: a size budget spread uniformly over layers wastes bytes on layers that tolerate heavy
compression and starves the ones that do not. Measuring each layer's drop at a few
sparsities and bit-widths, before training, is cheap (one evaluation per point) and is what
the target allocator (`targets.py`) uses to decide who gets which share of the bytes.

Channel groups are scanned together (`graph.discover_groups`): removing channel c of a conv
also removes it from its BatchNorm, every residual partner and the consumer's inputs, so
testing one member alone would measure a network that can never be deployed.

The result is a plain JSON-able dict (see `scan`), so it can be saved, edited and handed
back to `targets.resolve_target(..., sensitivity=...)`.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .graph import PRUNABLE_ROOTS, ChannelGroup, channel_norms, discover_groups, root_weight
from .model_call import call_model
from .model_copy import load_model_state
from .session.norm_statistics import recalibrate_norms, trained_norms
from .techniques.quant_lsq import lsq_init_step

DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
DEFAULT_BITS = (8, 4, 3, 2)
DEFAULT_GROUP_SPARSITIES = (0.25, 0.5, 0.75)


def metric_of(evaluate: Callable, model: nn.Module, metric: str) -> float:
    """The one number the scan compares; `evaluate` may return a dict or a float."""
    out = evaluate(model)
    return float(out[metric] if isinstance(out, dict) else out)


@torch.no_grad()
def magnitude_prune_(weight: torch.Tensor, sparsity: float) -> None:
    """Zero the smallest |w| in place, keeping round(n * (1 - sparsity)) entries (as the technique does)."""
    flat = weight.view(-1)
    keep = max(0, min(flat.numel(), round(flat.numel() * (1 - sparsity))))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep:
        mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
    flat.mul_(mask)


@torch.no_grad()
def quantize_(weight: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Round `weight` in place onto the LSQ initial grid (where training starts); returns the scales."""
    qmax = 2 ** (bits - 1) - 1
    step = lsq_init_step(weight, qmax, per_channel)
    weight.copy_(torch.clamp(torch.round(weight / step), -qmax, qmax) * step)
    return step.flatten().expand(weight.shape[0]).clone() if step.numel() == 1 else step.flatten().clone()


@torch.no_grad()
def zero_channels_(model: nn.Module, group: ChannelGroup, sparsity: float) -> list[int]:
    """Zero the weakest channels of a group in every producing member (weight, bias, BN affine).

    A zeroed channel outputs exactly 0 through ReLU, which is what removing it does, so this
    measures the deployed network without rebuilding it. Returns the dropped root channels.
    """
    modules = dict(model.named_modules())
    norms = channel_norms(group, modules, root_weight)
    keep = round(group.channels * (1 - sparsity))
    order = torch.argsort(norms, descending=True)
    drop = set(order[keep:].tolist())
    for m in group.out_members():
        idxs = [i for i, r in zip(m.idxs, m.root_idxs) if r in drop]
        if not idxs:
            continue
        layer = modules[m.module]
        for pname in ("weight", "bias"):
            t = getattr(layer, pname, None)
            if isinstance(t, torch.Tensor):
                t[torch.as_tensor(idxs, device=t.device)] = 0
    return sorted(drop)


def scanned_layers(model: nn.Module) -> list[str]:
    """The layers a scan prunes and quantizes one at a time (Linear and Conv); none is an error that
    names the model, before any work (the heatmap of nothing failed only after the training)."""
    names = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_ROOTS)]
    if not names:
        from .errors import JointCompressError

        raise JointCompressError(f"sensitivity: {type(model).__name__} has no Linear or Conv layer to scan; the "
                                 "scan measures what pruning and quantizing each such layer costs")
    return names


def scan(
    model: nn.Module,
    evaluate: Callable,
    example_inputs,
    sparsities=DEFAULT_SPARSITIES,
    bits=DEFAULT_BITS,
    group_sparsities=DEFAULT_GROUP_SPARSITIES,
    metric: str = "accuracy",
    layers: list[str] | None = None,
    groups: bool = True,
    per_channel: bool = True,
    progress: Callable[[int, int], None] | None = None,
    greater_is_better: bool = True,
    norm_batches: Sequence | None = None,
) -> dict:
    """Measure the metric drop of each layer and each channel group at each setting.

    Returns {"metric", "baseline", "sparsities", "bits", "group_sparsities", "norm_batches",
    "layers": {name: {"numel", "shape", "sparsity": {"0.9": drop}, "bits": {"4": drop}}},
    "groups": {root: {"layers": [...], "channels", "sparsity": {"0.5": drop}}}}.
    Keys of the inner dicts are strings (JSON); drops are baseline - metric (higher = worse), or
    metric - baseline for a metric where lower is better (`greater_is_better=False`: a loss).

    `norm_batches` (a few batches of training inputs, as the model takes them): a model with BatchNorm
    re-estimates its statistics on them before every reading, the baseline's included, as training
    does before it evaluates (`training.recalibrate_norms`). With the running averages, a pruned or
    rounded layer is normalized by statistics of the layer it was, and its drop reads several times
    too high (benchmarks/sensitivity_norms.py); the layers the allocator then spares are the wrong ones.
    """
    model = copy.deepcopy(model).eval()
    sign = 1.0 if greater_is_better else -1.0

    batches = 0 if norm_batches is None else len(norm_batches)  # a list, or a stacked tensor (batches first)
    given = [(m, m.running_mean.clone(), m.running_var.clone()) for m in trained_norms(model)] if batches else []

    def read() -> float:
        if batches:
            for m, mean, var in given:  # a pass refused (non-finite) leaves the model's own, not the last reading's
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            recalibrate_norms(model, iter(norm_batches), lambda inputs: call_model(model, inputs), batches)
        return metric_of(evaluate, model, metric)

    baseline = read()

    def lost() -> float:
        return sign * (baseline - read())

    modules = dict(model.named_modules())
    names = layers or scanned_layers(model)
    found = discover_groups(model, example_inputs)[0] if groups else []
    total = len(names) * (len(sparsities) + len(bits)) + len(found) * len(group_sparsities)
    done = 0
    out = {"metric": metric, "baseline": baseline, "sparsities": list(sparsities), "bits": list(bits),
           "group_sparsities": list(group_sparsities), "layers": {}, "groups": {},
           "norm_batches": batches if trained_norms(model) else 0}  # what each reading's BatchNorm used

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    for name in names:
        w = modules[name].weight
        original = w.detach().clone()
        rec = {"numel": w.numel(), "shape": list(w.shape), "sparsity": {}, "bits": {}}
        for s in sparsities:
            magnitude_prune_(w.data, s)
            rec["sparsity"][str(s)] = lost()
            w.data.copy_(original)
            tick()
        for b in bits:
            quantize_(w.data, b, per_channel)
            rec["bits"][str(b)] = lost()
            w.data.copy_(original)
            tick()
        out["layers"][name] = rec
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for g in found:
        rec = {"layers": g.layers(), "channels": g.channels, "sparsity": {}}
        for s in group_sparsities:
            zero_channels_(model, g, s)
            rec["sparsity"][str(s)] = lost()
            load_model_state(model, state)
            tick()
        out["groups"][g.name] = rec
    return out


def shuffled_batches(x_train, count: int, size: int = 128) -> list:
    """`count` batches of training images in a fixed shuffled order (a file sorted by class would give
    every batch one class), for the scan's BatchNorm statistics (`scan(norm_batches=...)`)."""
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[: count * size]
    return [x_train[order[i:i + size]] for i in range(0, len(order), size)]


def drop_at(curve: dict[str, float], x: float) -> float:
    """Piecewise-linear interpolation of a scanned curve (drop 0 at the uncompressed end)."""
    pts = sorted((float(k), float(v)) for k, v in curve.items())
    if not pts:
        return 0.0
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    if x <= xs[0]:
        return ys[0] * x / xs[0] if xs[0] > 0 else ys[0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def tolerable_sparsity(curve: dict[str, float], tolerance: float) -> float:
    """The highest sparsity whose (interpolated) drop stays within `tolerance`."""
    best = 0.0
    for k in range(0, 1000):
        s = k / 1000
        if drop_at(curve, s) > tolerance:
            break
        best = s
    return best


def tolerable_bits(curve: dict[str, float], tolerance: float, default: int) -> int:
    """The fewest scanned bits whose drop stays within `tolerance` (`default` if none does)."""
    ok = [int(b) for b, d in curve.items() if float(d) <= tolerance]
    return min(ok) if ok else max([int(b) for b in curve] + [default])


def save_heatmap(result: dict, path) -> None:
    """Heatmap PNG: one row per layer (sparsity and bit-width columns) and per channel group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(result["layers"])
    cols = [f"s={s}" for s in result["sparsities"]] + [f"{b} bit" for b in result["bits"]]
    data = np.array([[result["layers"][n]["sparsity"][str(s)] for s in result["sparsities"]]
                     + [result["layers"][n]["bits"][str(b)] for b in result["bits"]] for n in layers]) * 100
    groups = list(result["groups"])
    nplots = 2 if groups else 1
    fig, axes = plt.subplots(nplots, 1, figsize=(1.1 * len(cols) + 3, 0.5 * (len(layers) + len(groups)) + 2.5 * nplots),
                             squeeze=False)
    _heat(axes[0][0], data, layers, cols, "per layer (others untouched)", result["metric"])
    if groups:
        gcols = [f"ch s={s}" for s in result["group_sparsities"]]
        gdata = np.array([[result["groups"][g]["sparsity"][str(s)] for s in result["group_sparsities"]] for g in groups]) * 100
        labels = [f"{g} ({len(result['groups'][g]['layers'])} layers)" for g in groups]
        _heat(axes[1][0], gdata, labels, gcols, "per channel group (coupled layers together)", result["metric"])
    from .io import save_figure

    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _heat(ax, data, rows, cols, title, metric):
    im = ax.imshow(data, cmap="magma_r", aspect="auto", vmin=0, vmax=max(1.0, float(data.max()) if data.size else 1.0))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if data[i, j] > 0.6 * max(1.0, data.max()) else "black")
    ax.set_title(f"{metric} drop (points) {title}")
    ax.figure.colorbar(im, ax=ax, fraction=0.03)

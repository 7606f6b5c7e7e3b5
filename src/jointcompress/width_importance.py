"""What a channel group loses when it is cut from one width to a narrower one: the currency the
latency allocator (latency_targets) trades milliseconds against.

Two measures:

- `NormImportance`: channel L2 norms over their group's mean. Cheap and data-free, but it
  makes a channel of every group worth about 1: cutting conv2 of LeNet-5 from 16 to 8 channels
  "costs" 8, as much as cutting 8 of fc1's 500 units, although the first loses ~1 point of
  accuracy after fine-tuning and the second nothing measurable. The allocator then spends its
  spare latency on the wide, cheap-per-channel layer.
- `LossImportance`: measured. For every group and a few widths it may take, the model with
  only that group cut (its weakest channels removed, as `shrunk_to` removes them) is briefly
  fine-tuned (`recover`, e.g. 100 KD steps) and evaluated on held-out data; what a cut loses
  is the rise of that loss, linear in between the measured widths. Loss units are the same in
  every group, so milliseconds go where accuracy comes from. Why recovered and not one-shot:
  on LeNet-5 / MNIST the one-shot loss ranks fc1 cut to 32 units (loss 1.29) far worse than
  conv2 cut to 8 channels (0.66), but after 100 KD steps fc1 at 64 is cheaper than conv2 at
  16 (0.038 vs 0.047), which is what full fine-tuning shows too (a narrow fc1 recovers, a
  narrow conv2 does not). The measure ranks cuts; it does not predict the final accuracy.
  Each group's curve is made monotone (a narrower width never loses less than a wider one),
  so noise cannot make a cut look free and a later one look like a gain.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .graph import ChannelGroup
from .model_call import call_model, model_device, to_device


@dataclass
class NormImportance:
    """Channel L2 norms over their group's mean, sorted ascending (the order they are removed)."""

    sorted_relative: dict[str, torch.Tensor]
    kind: str = "norm"

    def lost(self, group: str, wide: int, narrow: int) -> float:
        """Importance removed by cutting `group` from `wide` to `narrow` channels."""
        c = len(self.sorted_relative[group])
        return float(self.sorted_relative[group][c - wide: c - narrow].sum())

    def to_dict(self) -> dict:
        return {"kind": self.kind}


@dataclass
class LossImportance:
    """Held-out loss with one group cut to each measured width (the others at full width)."""

    loss: dict[str, dict[int, float]]  # group -> width -> monotone loss
    base_loss: float
    raw_loss: dict[str, dict[int, float]]  # as measured, before the monotone envelope
    recover_steps: int = 0
    kind: str = "loss"

    def at(self, group: str, width: int) -> float:
        """The group's loss at `width`, linear between measured widths (clamped at the ends)."""
        ws = sorted(self.loss[group])
        curve = self.loss[group]
        if width <= ws[0]:
            return curve[ws[0]]
        if width >= ws[-1]:
            return curve[ws[-1]]
        k = bisect.bisect_right(ws, width)
        lo, hi = ws[k - 1], ws[k]
        return curve[lo] + (curve[hi] - curve[lo]) * (width - lo) / (hi - lo)

    def lost(self, group: str, wide: int, narrow: int) -> float:
        return max(0.0, self.at(group, narrow) - self.at(group, wide))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "base_loss": self.base_loss, "recover_steps": self.recover_steps,
                "loss": {g: {str(w): v for w, v in c.items()} for g, c in self.raw_loss.items()}}


def norm_importance(model: nn.Module, groups: list[ChannelGroup]) -> NormImportance:
    from .graph import channel_norms, root_weight

    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        norms = channel_norms(g, modules, root_weight)
        out[g.name] = torch.sort(norms / norms.mean().clamp_min(1e-12)).values
    return NormImportance(out)


@torch.no_grad()
def held_out_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Mean cross-entropy of `model` on (x, y)."""
    model.eval()
    device = model_device(model)
    total = sum(float(F.cross_entropy(call_model(model, x[i:i + chunk]), to_device(y[i:i + chunk], device), reduction="sum"))
                for i in range(0, len(x), chunk))
    return total / max(1, len(x))


def spread(widths: list[int], points: int | None) -> list[int]:
    """At most `points` of the ascending `widths`, spread geometrically (the loss changes most
    at the narrow end), the narrowest and widest kept."""
    if points is None or len(widths) <= points:
        return list(widths)
    lo, hi = widths[0], widths[-1]
    targets = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    return sorted({min(widths, key=lambda w: abs(w - t)) for t in targets})


def loss_importance(model: nn.Module, example_inputs, groups: list[ChannelGroup], held_out,
                    options: dict[str, list[int]], recover=None, recover_steps: int = 0,
                    points: int | None = None, recover_base: bool = False) -> LossImportance:
    """Measure `LossImportance` on `held_out = (x, y)` at (at most `points` of) the widths in
    `options[group]`. `recover(model)`: fine-tunes a cut copy in place before it is evaluated
    (None: one-shot); `recover_steps` only records how many steps it takes. `recover_base`: the
    reference loss is the uncut model after the same recovery, for a model that is itself still
    recovering (a teacher without a dropped block): its cut copies would otherwise come out better
    than it, and every cut would read as free."""
    import copy

    from .latency_targets import shrunk_to

    x, y = held_out
    if recover_base and recover is not None:
        reference = copy.deepcopy(model)
        recover(reference)
        base = held_out_loss(reference, x, y)
    else:
        base = held_out_loss(model, x, y)
    raw, mono = {}, {}
    for g in groups:
        curve = {}
        for w in spread(options[g.name], points):
            if w >= g.channels:
                curve[w] = base
                continue
            cut = shrunk_to(model, example_inputs, {g.name: w})
            if recover is not None:
                recover(cut)
            curve[w] = held_out_loss(cut, x, y)
        raw[g.name] = curve
        env, worst = {}, base
        for w in sorted(curve, reverse=True):  # wide -> narrow: never below a wider width's loss
            worst = max(worst, curve[w])
            env[w] = worst
        mono[g.name] = env
    return LossImportance(mono, base, raw, recover_steps)

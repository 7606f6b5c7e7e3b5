"""Parity between a reference model and a deployed copy: largest logit gap and metric change.

Every export path ends with this check because a deployed model that silently disagrees
with the trained one is worse than no deployment: the CLI prints the report, and tests
bound it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from ..errors import UnsupportedModelError

Predict = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ParityReport:
    backend: str
    max_abs_logit_diff: float
    samples: int
    metric: str = "accuracy"
    metric_reference: float | None = None
    metric_deployed: float | None = None
    path: str | None = None
    max_abs_reference: float | None = None  # the largest |logit| of the reference: the scale of max_abs_logit_diff
    # the share of outputs (samples; tokens of a sequence's logits; pixels of a dense map) whose top-1 class is
    # the reference's, over `outputs_compared` of them; None for a single output per sample or a regression
    # (no class to agree on)
    top1_agreement: float | None = None
    outputs_compared: int = 0

    @property
    def metric_delta(self) -> float | None:
        if self.metric_reference is None or self.metric_deployed is None:
            return None
        return self.metric_deployed - self.metric_reference

    def to_dict(self) -> dict:
        return {**asdict(self), "metric_delta": self.metric_delta}

    def __str__(self) -> str:
        s = f"{self.backend}: max |logit diff| {self.max_abs_logit_diff:.3g} over {self.samples} samples"
        if self.metric_delta is not None:
            s += (f"; {self.metric} {self.metric_reference:.4f} -> {self.metric_deployed:.4f} "
                  f"({self.metric_delta:+.4f})")
        return s


def class_axis(logits: torch.Tensor) -> int:
    """The axis of the classes, as the default task loss reads them: last for [batch, classes] and a sequence's
    [batch, tokens, vocab], 1 for a dense map [batch, classes, H, W(, D)] (a segmentation)."""
    return 1 if logits.dim() >= 4 else -1


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of outputs whose top-1 class is the target, over the targets the default loss reads (-100: ignored)."""
    scored = targets != -100
    hits = (logits.argmax(class_axis(logits)) == targets) & scored
    return (hits.sum() / scored.sum().clamp(min=1)).item()


def batches(data, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """Accept (X, Y) tensors, an X tensor, or an iterable of (x, y) batches (e.g. a DataLoader), or of (x,) ones (a
    TensorDataset of inputs alone: no labels; it failed on item[1] with a bare IndexError)."""
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) \
            and (data[1] is None or isinstance(data[1], torch.Tensor)):
        x, y = data
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], None if y is None else y[i:i + batch_size]
        return
    for item in data:
        x, y = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
        yield x, y


def compare(reference: Predict, deployed: Predict, data, backend: str,
            metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy, path: str | None = None,
            classes: bool = True) -> ParityReport:
    """Run both on `data`; the metric is computed over all samples when targets are given. Both
    outputs are read as training reads them (session.outputs.logits_of): a bare Hugging Face model
    returns a ModelOutput, which exported fine and then failed here on `.float()`. `classes`: False for a
    regression's outputs, whose top-1 "class" means nothing."""
    from ..model_call import model_device, to_device
    from ..session.outputs import logits_of

    worst, scale, n, agree, classified = 0.0, 0.0, 0, 0, 0
    ref_all, dep_all, ys = [], [], []
    with torch.inference_mode():
        for x, y in batches(data):
            r, d = (logits_of(fn(to_device(x, model_device(fn)))).float().cpu() for fn in (reference, deployed))
            if r.shape != d.shape:  # broadcasting would compare them anyway and report a small gap
                raise UnsupportedModelError(
                    f"{backend}{f' ({path})' if path else ''} returned logits of shape {list(d.shape)} for a batch of "
                    f"{len(x)}, where PyTorch returned {list(r.shape)}: the exported graph does not take the batch as the "
                    "model does (a Python loop or branch on the input is fixed when the model is traced); write the "
                    "forward with tensor operations only")
            worst = max(worst, (r - d).abs().max().item())
            scale = max(scale, r.abs().max().item())
            n += len(x)
            axis = class_axis(r)
            if classes and r.dim() >= 2 and r.shape[axis] > 1:
                agree += int((r.argmax(axis) == d.argmax(axis)).sum())
                classified += r.argmax(axis).numel()
            if y is not None:
                ref_all.append(r), dep_all.append(d), ys.append(y.cpu())
    rep = ParityReport(backend, worst, n, getattr(metric, "__name__", "metric"), path=path, max_abs_reference=scale,
                       top1_agreement=agree / classified if classified else None, outputs_compared=classified)
    if ys:
        y = torch.cat(ys)
        rep.metric_reference, rep.metric_deployed = metric(torch.cat(ref_all), y), metric(torch.cat(dep_all), y)
    return rep

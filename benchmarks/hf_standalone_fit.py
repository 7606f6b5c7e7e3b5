"""The standalone fine-tuning loop of the earlier SST-2 benchmark (benchmarks/hf_sst2.py).

Kept with that benchmark so its teacher fine-tune and its recorded results
(benchmarks/results/hf_sst2.md) stay reproducible; the library itself trains through one
engine, the compression session (jointcompress.session, jointcompress.compress).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch

from jointcompress.errors import TrainingError
from jointcompress.hf.data import batches

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


def task_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Plain cross-entropy from the model's own head (HF computes it when labels are given)."""
    return model(**batch).loss


def linear_warmup_decay(step: int, total: int, warmup: float) -> float:
    """LR multiplier: linear warm-up over warmup*total steps, then linear decay to 0."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


def fit(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    lr: float,
    epochs: float = 1.0,
    batch_size: int = 32,
    warmup: float = 0.06,
    weight_decay: float = 0.01,
    loss_fn: LossFn = task_loss,
    extra_params: Iterable[torch.nn.Parameter] = (),
    extra_lr: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
    log_every: int = 100,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train model (and extra_params, e.g. mask scores or projections) with AdamW.

    epochs may be fractional (e.g. 0.5 = half a pass). on_step(step, total) runs before
    each optimizer step, which is where temperature / sparsity schedules update.
    Raises TrainingError after 5 consecutive non-finite losses.
    """
    n = tensors["labels"].shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    extra = [p for p in extra_params]
    if extra:
        groups.append({"params": extra, "lr": extra_lr or lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    model.train()
    step, bad, t0, running = 0, 0, time.time(), 0.0
    epoch = 0
    while step < total:
        for batch in batches(tensors, batch_size, shuffle=True, seed=seed + epoch, bucket=50):
            if step >= total:
                break
            if on_step is not None:
                on_step(step, total)
            mult = linear_warmup_decay(step, total, warmup)
            for g, b in zip(opt.param_groups, base_lrs):
                g["lr"] = b * mult
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                bad += 1
                opt.zero_grad(set_to_none=True)
                if bad >= 5:
                    raise TrainingError("5 non-finite losses in a row; lower the learning rate")
                step += 1
                continue
            bad = 0
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            running += loss.item()
            step += 1
            if log_every and step % log_every == 0:
                log(f"step {step}/{total} loss {running / log_every:.4f} {time.time() - t0:.0f}s")
                running = 0.0
        epoch += 1
    model.eval()
    return {"steps": total, "seconds": time.time() - t0}



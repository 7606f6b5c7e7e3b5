"""The batches of the current epoch, resumable mid-epoch.

A resumed run replays the epoch's shuffle from the RNG states saved at the epoch's start
and skips the batches already trained on (advancing only the sampler when it can, so no
data is loaded for them).
"""
from __future__ import annotations

import torch


def epoch_batches(trainer):
    loader, pos = trainer.loader, trainer.pos
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(pos.epoch)
    gen = getattr(loader, "generator", None)
    skip = pos.batch_in_epoch
    if skip == 0:
        trainer.epoch_start = {"gen": gen.get_state() if gen is not None else None, "torch": torch.get_rng_state()}
        return iter(loader)
    now = torch.get_rng_state()
    if gen is not None and trainer.epoch_start["gen"] is not None:
        gen.set_state(trainer.epoch_start["gen"])
    torch.set_rng_state(trainer.epoch_start["torch"])
    it = iter(loader)
    if getattr(loader, "num_workers", 0) == 0 and hasattr(it, "_sampler_iter") and hasattr(it, "_num_yielded"):
        for _ in range(skip):  # advance the sampler only: no data is loaded for skipped batches
            next(it._sampler_iter)
        it._num_yielded += skip
    else:
        for _ in range(skip):
            next(it)
    torch.set_rng_state(now)
    return it

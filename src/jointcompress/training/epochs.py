"""The batches of the current epoch, resumable mid-epoch.

A resumed run replays the epoch's shuffle from the RNG states saved at the epoch's start (torch's
and every generator the loader, its sampler and batch sampler draw from)
and skips the batches already trained on (advancing only the sampler when it can, so no
data is loaded for them).
"""
from __future__ import annotations

import warnings

import torch

from ..data import shuffle_generators


def generator_states(loader) -> list[torch.Tensor]:
    """The states of every generator the loader's order draws from (data.shuffle_generators)."""
    return [g.get_state() for g in shuffle_generators(loader)]


def set_generator_states(loader, states) -> None:
    """Put back what generator_states took. A checkpoint from before the sampler's generators were saved
    holds the loader's one state (or None); a loader with other generators than the saved run's cannot
    replay its order, and says so."""
    states = [] if states is None else [states] if isinstance(states, torch.Tensor) else list(states)
    generators = shuffle_generators(loader)
    if states and len(states) != len(generators):
        warnings.warn(f"resume: the run saved the states of {len(states)} shuffle generator(s), the loader now has "
                      f"{len(generators)}; the resumed epochs draw another order of batches (give the loader, its "
                      "sampler and batch sampler the generators the run had)", stacklevel=3)
        return
    for generator, state in zip(generators, states):
        generator.set_state(state)


def epoch_batches(trainer):
    loader, pos = trainer.loader, trainer.pos
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(pos.epoch)
    skip = pos.batch_in_epoch
    if skip == 0:
        trainer.epoch_start = {"gen": generator_states(loader), "torch": torch.get_rng_state()}
        return iter(loader)
    now = torch.get_rng_state()
    set_generator_states(loader, trainer.epoch_start["gen"])
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

"""BatchNorm's running statistics re-estimated for the weights as they are now.

A BatchNorm layer evaluates with the running averages training left behind, an exponential
average over the last few dozen batches. Compression moves the weights under them faster than
plain training does: quantized weights flip between grid points every step (Nagel et al. 2022,
"Overcoming Oscillations in Quantization-Aware Training", re-estimate them for this reason), and
a mask that moves at once (a size target's late trim, a projection onto the budget) changes
every later layer's inputs in one step. The averages then describe a model that no longer
exists: depthwise-separable CNNs whose masks a size target trimmed 10% of the run before its end
kept 0.30-0.42 accuracy, and stored it, where the same runs with their statistics re-estimated
on 16 training batches kept 0.92-0.94 (benchmarks/norm_recalibration.py, 3 seeds).

So before each evaluation the loop runs `training.recalibrate_norms` batches of training data
through the model with every layer in evaluation mode except the BatchNorm layers, which
average the batches' statistics with equal weight (momentum None) from zero. Dropout stays off,
so the statistics are those of the evaluated forward. Nothing else of the run changes: the RNG
states the data loading draws from are put back, every layer's count and momentum are restored,
and the training forwards keep normalizing by their own batches.
"""
from __future__ import annotations

import itertools
import random
import warnings
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from ..data import order_holders, shuffle_generators
from ..model_call import evaluating, kept_modes


def tracked_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that evaluate with running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


def trained_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The tracked BatchNorm layers that train when the model does: `model.train()` is called (and the
    modes put back) so that a model's own train() that keeps some frozen (pretrained statistics, as
    detection and fine-tuning code do) decides; those keep their statistics, and training normalizes by them."""
    with kept_modes(model):
        model.train()
        return [m for m in tracked_norms(model) if m.training]


@torch.no_grad()
def recalibrate_norms(model: nn.Module, batches: Iterable, forward: Callable[[object], object], max_batches: int) -> int:
    """Re-estimate the running statistics of `model`'s trained BatchNorm layers (trained_norms) over the
    first `max_batches` of `batches`, each passed to `forward` (which runs the model on it). Returns how
    many batches were used; 0 (and no change) when the model has no such layer, `max_batches` is 0, no
    batch came, or a batch gave non-finite statistics (warned: one corrupt sample would stay in them)."""
    norms = trained_norms(model) if max_batches > 0 else []
    if not norms:
        return 0
    kept = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None,
             m.running_mean.clone(), m.running_var.clone()) for m in norms]
    used, finished = 0, False
    with evaluating(model):  # every other layer reads; each module's mode is put back after
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a plain average of the batches' statistics
                m.train()
            for batch in itertools.islice(batches, max_batches):
                forward(batch)
                used += 1
            finished = True
        finally:
            bad = _nonfinite(model, norms) if finished else None
            for m, momentum, count, mean, var in kept:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)
                if used == 0 or not finished or bad:  # the statistics training left
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
    if bad:
        warnings.warn(f"recalibrate_norms: the training batches gave BatchNorm {bad} non-finite statistics, so this "
                      "evaluation reads the running averages training left; check the training data for NaN or inf "
                      "(training skipped such steps) or set training.recalibrate_norms: 0", RuntimeWarning, stacklevel=3)
        return 0
    return used


def _nonfinite(model: nn.Module, norms: list[nn.Module]) -> str | None:
    """The name of the first layer whose re-estimated statistics are not all finite (None: all are)."""
    bad = next((m for m in norms if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())), None)
    if bad is None:
        return None
    return f"layer {next((name for name, m in model.named_modules() if m is bad), type(bad).__name__)!r}"


def batches_for_the_pass(loader):
    """The loader the pass reads: itself, or, where its workers persist (their own random states would move
    with the extra batches, and every later epoch's augmentation with them), the same batches read in this
    process."""
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(loader, DataLoader) or not (loader.num_workers and loader.persistent_workers):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last,
                          collate_fn=loader.collate_fn)
    if loader.batch_sampler is None:  # batch_size=None: the sampler yields whole batches
        return DataLoader(loader.dataset, sampler=loader.sampler, batch_size=None, collate_fn=loader.collate_fn)
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)


EPOCH_COUNTERS = ("iteration", "epoch")  # the attributes a loader or sampler counts its epochs in


class RandomStates:
    """The RNG states iterating a loader draws from (the shuffle generators of the loader, its sampler and
    its batch sampler's sampler; torch's, CUDA's, numpy's and Python's, for workers' seeds and a dataset's
    own augmentation) and its epoch counters, taken and put back, so a pass over the data for the statistics
    leaves the training's stream of batches, and the next pass's, as they were."""

    def __init__(self, loader):
        self.generators = shuffle_generators(loader)
        # where an epoch counter picks the order (accelerate's loader and its seedable sampler count a pass read
        # to its end as an epoch): a pass that exhausted the loader moved every later order on, and a resumed
        # run, whose loader starts at 0, re-estimated on other batches
        self.counters = [(h, name) for h in order_holders(loader) for name in EPOCH_COUNTERS
                         if type(getattr(h, name, None)) is int]

    def __enter__(self) -> "RandomStates":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.states = ([g.get_state() for g in self.generators], torch.get_rng_state(), cuda, np.random.get_state(),
                       random.getstate())
        self.counts = [getattr(h, name) for h, name in self.counters]
        return self

    def __exit__(self, *exc) -> None:
        gens, torch_state, cuda, np_state, py_state = self.states
        for g, state in zip(self.generators, gens):
            g.set_state(state)
        torch.set_rng_state(torch_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        for (holder, name), count in zip(self.counters, self.counts):
            try:
                setattr(holder, name, count)
            except AttributeError:  # a read-only counter (a property): what moves it is its owner's
                pass

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
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn


def tracked_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that evaluate with running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


@torch.no_grad()
def recalibrate_norms(model: nn.Module, batches: Iterable, forward: Callable[[object], object], max_batches: int) -> int:
    """Re-estimate the running statistics of `model`'s BatchNorm layers over the first `max_batches`
    of `batches`, each passed to `forward` (which runs the model on it). Returns how many batches
    were used; 0 (and no change) when the model has no such layer, `max_batches` is 0 or no batch came."""
    norms = tracked_norms(model)
    if not norms or max_batches <= 0:
        return 0
    modes = {m: m.training for m in model.modules()}
    kept = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None,
             m.running_mean.clone(), m.running_var.clone()) for m in norms]
    used, finished = 0, False
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average of the batches' statistics
            m.train()
        for batch in itertools.islice(batches, max_batches):
            forward(batch)
            used += 1
        finished = True
    finally:
        for m, momentum, count, mean, var in kept:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
            if used == 0 or not finished:  # nothing seen, or a forward failed: the statistics training left
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, training in modes.items():
            m.training = training
    return used


class RandomStates:
    """The RNG states iterating a loader draws from (its shuffle generator, torch's, numpy's and
    Python's for workers' seeds and a dataset's own augmentation), taken and put back, so a pass over
    the data for the statistics leaves the training's stream of batches as it was."""

    def __init__(self, loader):
        self.generator = getattr(loader, "generator", None)

    def __enter__(self) -> "RandomStates":
        self.states = (self.generator.get_state() if self.generator is not None else None, torch.get_rng_state(),
                       np.random.get_state(), random.getstate())
        return self

    def __exit__(self, *exc) -> None:
        gen, torch_state, np_state, py_state = self.states
        if self.generator is not None:
            self.generator.set_state(gen)
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)

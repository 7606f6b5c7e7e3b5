"""The public verbs: compress a model with a recipe; finalize it; measure it."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import techniques as tech
from .errors import DataError, RecipeError
from .loop import History, Trainer
from .plan import make_plan
from .recipe import Recipe, parse_recipe


@dataclass
class Result:
    """What compress() returns: the compressed model (masks and quantizers still attached,
    so it can keep training; call finalize() to make it permanent), the history and the
    final metrics of the kept (best) state."""

    model: nn.Module
    history: History
    metrics: dict[str, float]
    recipe: Recipe
    techniques: list = field(default_factory=list)
    example_inputs: Any = None

    def summary(self) -> dict[str, Any]:
        out = dict(self.metrics)
        for t in self.techniques:
            out.update({f"{t.kind}.{k}": v for k, v in t.metrics().items()})
        out["wall_seconds"] = self.history.wall_seconds
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def as_loader(train_data, batch_size: int, seed: int):
    """Accept a DataLoader or an (x, y) pair of tensors."""
    from .data import loader

    if isinstance(train_data, (tuple, list)) and len(train_data) == 2 and all(isinstance(t, torch.Tensor) for t in train_data):
        return loader(train_data[0], train_data[1], batch_size, shuffle=True, seed=seed)
    if isinstance(train_data, torch.utils.data.DataLoader):
        return train_data
    raise DataError("train_data: pass a DataLoader yielding (x, y[, index]) or a tuple (x, y) of tensors")


def first_inputs(loader) -> torch.Tensor:
    batch = next(iter(loader))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise DataError("train_data: batches must start with an input tensor")
    return x[:2]


def compress(
    model: nn.Module,
    recipe: Recipe | dict,
    train_data,
    evaluate: Callable[[nn.Module], dict[str, float] | float],
    teacher: nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    callbacks: list | None = None,
) -> Result:
    """Compress `model` in place with `recipe` (joint or sequential); returns a Result.

    `evaluate(model)` returns the user's metric(s) on held-out data; it is called after
    every epoch and the best state with all techniques at their target is kept.
    """
    recipe = parse_recipe(recipe)
    if recipe.technique("distill_kd") is not None and teacher is None:
        raise RecipeError("techniques: distill_kd needs a teacher; pass teacher=... (CLI: --teacher) or remove distill_kd")
    seed_everything(recipe.training.seed)
    loader = as_loader(train_data, recipe.training.batch_size, recipe.training.seed)
    example = first_inputs(loader)
    techniques = [tech.build(c) for c in recipe.techniques]
    total_steps = recipe.training.epochs * len(loader)
    plan = make_plan(techniques, total_steps, recipe)
    trainer = Trainer(model, techniques, plan, recipe, loader, evaluate, example, teacher=teacher, progress=progress, callbacks=callbacks)
    history = trainer.run()
    metrics = evaluate(model)
    metrics = metrics if isinstance(metrics, dict) else {recipe.training.metric: float(metrics)}
    for t in techniques:
        if hasattr(t, "remove_hooks"):
            t.remove_hooks()
    return Result(model, history, dict(metrics), recipe, techniques, example)


def train_baseline(model: nn.Module, train_data, evaluate, epochs: int = 10, lr: float = 1e-3, batch_size: int = 128, seed: int = 0, progress=None) -> History:
    """Plain training (no technique): trains the teacher / the uncompressed reference."""
    recipe = parse_recipe({"training": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}})
    return compress(model, recipe, train_data, evaluate, progress=progress).history

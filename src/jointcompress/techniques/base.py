"""The lifecycle every technique follows, driven by one training loop.

Like llm-compressor's modifiers: a technique is attached (`setup`), told where the run is
(`on_step`), may add *named* loss terms (`loss_terms`), may act around the optimizer step,
and is made permanent (`finalize`). Joint and sequential compression are then only a
question of when each technique's window opens and closes (see plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..layer_types import COMPRESSIBLE


@dataclass
class RunContext:
    """What techniques may read about the run."""

    model: nn.Module
    example_inputs: Any
    step: int = 0
    total_steps: int = 1
    epoch: int = 0
    teacher: nn.Module | None = None
    batch_inputs: Any = None
    batch_targets: torch.Tensor | None = None
    batch_extra: dict = field(default_factory=dict)
    outputs: torch.Tensor | None = None
    # in before_optimizer_step: the factor a mixed-precision loss scaler multiplied this step's terms by
    # (None: not scaled); gradients a technique caught in the backward carry it (session/loss_scale.py)
    loss_scale: float | None = None
    log: Callable[[str], None] = lambda msg: None


class Technique:
    """Base class; subclasses override the hooks they need."""

    kind: str = "technique"
    order: int = 50  # attach order on the same weight: pruning (masks) before quantization
    window: tuple[int, int] = (0, 0)  # steps over which the technique ramps to its target
    attached: bool = False
    frozen: bool = False  # after its phase in a sequential run: keep applying, stop changing
    # set by a hook that changed the model's weights by a decision that may differ between ranks (the size
    # budget's landing orders its cuts, and a learned width re-fits its step, by each rank's own Fisher
    # estimate): the session then puts rank 0's model on every rank and clears it
    moved_weights: bool = False

    def __init__(self, config):
        self.config = config

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        self.attached = True

    def before_training(self, ctx: RunContext, techniques: list["Technique"]) -> None:
        """Once, at the session's start, attached or not: checks that need the other techniques of the
        run and must refuse before its first step, not when this one attaches."""

    def on_step(self, ctx: RunContext) -> None:
        """Update schedules (sparsity, temperature) before the forward pass."""

    def loss_terms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Named loss terms; the coordinator sees each separately."""
        return {}

    def task_weight(self) -> float:
        """Multiplier on the task (cross-entropy) term; distillation lowers it to 1 - alpha."""
        return 1.0

    def before_optimizer_step(self, ctx: RunContext) -> None:
        pass

    def rank_local_grads(self) -> list[torch.Tensor]:
        """Parameters whose .grad `before_optimizer_step` changed after the gradients were averaged over
        the ranks, from numbers each rank has of its own (the size budget's Fisher estimate): the session
        puts rank 0's gradients of these on every rank, so the ranks' updates stay the same."""
        return []

    def after_optimizer_step(self, ctx: RunContext) -> None:
        pass

    def on_epoch_end(self, ctx: RunContext) -> None:
        pass

    def freeze(self) -> None:
        """Stop learning (sequential phases after this one) but keep the effect on the model."""
        self.frozen = True

    def at_target(self) -> bool:
        """True once the technique's effect is final (e.g. masks binary at the target)."""
        return True

    def parameters(self) -> list[dict]:
        """Optimizer parameter groups owned by the technique (scores, step sizes, projections)."""
        return []

    def before_finalize(self) -> None:
        """The last look at the model with its masks and quantizers on (finalize removes them next)."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def selected_layers(model: nn.Module, cfg, types=None) -> dict[str, nn.Module]:
    """The layers a technique's `targets`/`exclude` patterns select, in model order: Linear and
    convolution layers, and embedding tables where the technique's `embeddings` is set."""
    from ..graph import matches

    if types is None:
        types = COMPRESSIBLE + (nn.Embedding,) if getattr(cfg, "embeddings", False) else COMPRESSIBLE
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, types) and matches(n, cfg.targets) and not matches(n, cfg.exclude)
    }

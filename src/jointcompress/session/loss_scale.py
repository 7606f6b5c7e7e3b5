"""Mixed precision with loss scaling (fp16 autocast and a torch.amp.GradScaler): the session's share.

A GradScaler multiplies the loss by its scale S before the backward, so that small fp16 gradients
do not underflow, and divides the gradients back (`unscale_`) before the optimizer step, skipping
the step when they overflowed. The coordinated backward takes its own gradients, one per loss term,
so the scaler's `scaler.scale(loss).backward()` cannot run: `session.backward(terms, scaler=...)`
scales every term by S instead (PCGrad and the conflict statistics do not change when every term
is scaled by one factor). Two things then need the scaler after the backward:

- the techniques' own gradient work in `before_step` (the size budget's learned widths, the
  Fisher saliency) adds gradients in true units, so it must come after `unscale_`: `before_step`
  unscales the bound optimizer itself unless the loop did (the transformers Trainer does, in its
  gradient clipping);
- the Fisher estimate keeps the gradient its quantizers caught in the backward, which carries S:
  it is divided back out, and an overflowed step (inf or nan) is not folded into the estimate;
- settling a step's micro-batches (coordination.py, `settle`) resolves held per-term gradients that
  carry S into a .grad the loop may have unscaled already (to clip): `grad_unit` says which.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import RecipeError


class LossScale:
    """The loss scaler the step's backward was given, and the step it was given at."""

    def __init__(self):
        self.scaler: Any = None
        self.step: int | None = None

    def scaled(self, terms: dict[str, torch.Tensor], scaler: Any, step: int) -> dict[str, torch.Tensor]:
        """The terms multiplied by the scaler's scale, as `scaler.scale(loss)` would (the terms
        unchanged without a scaler or with a disabled one)."""
        if scaler is None:
            return terms
        if not all(callable(getattr(scaler, verb, None)) for verb in ("is_enabled", "scale", "unscale_", "get_scale")):
            raise RecipeError(f"session.backward(scaler=...): expected a torch.amp.GradScaler (or None), got "
                              f"{type(scaler).__name__}")
        if not scaler.is_enabled():
            return terms
        self.scaler, self.step = scaler, step
        return {name: scaler.scale(term) for name, term in terms.items()}

    def unscale(self, optimizer: torch.optim.Optimizer | None, step: int) -> float | None:
        """Before the techniques read or add gradients: the optimizer's gradients in true units
        (`scaler.unscale_`, unless the loop called it this step), and the scale the gradients caught
        in the backward still carry. None when this step's backward was not scaled."""
        if self.scaler is None or self.step != step:
            return None
        if optimizer is not None:
            try:
                self.scaler.unscale_(innermost(optimizer))
            except RuntimeError as err:  # the loop unscaled already (before clipping): nothing left to do
                if "already been called" not in str(err):
                    raise
        return float(self.scaler.get_scale())


    def grad_unit(self, optimizer: torch.optim.Optimizer | None, step: int) -> float:
        """What .grad holds per unit of the gradients the backward took: 1, or 1 / the scale where the loop
        has unscaled the optimizer already this step (to clip) while the step's held per-term gradients,
        which settling resolves, still carry the scale. Read from the scaler's per-optimizer state (not
        public API: where it is missing, 1, and a loop must settle before it unscales)."""
        if self.scaler is None or self.step != step or optimizer is None:
            return 1.0
        from torch.amp.grad_scaler import OptState

        state = getattr(self.scaler, "_per_optimizer_states", {}).get(id(innermost(optimizer)), {})
        return 1.0 / float(self.scaler.get_scale()) if state.get("stage") is OptState.UNSCALED else 1.0


def innermost(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers such as accelerate's AcceleratedOptimizer: the scaler keys
    its per-optimizer state by that object, so unscaling the wrapper would unscale a second time."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # the wrapper is one too
        optimizer = optimizer.optimizer
    return optimizer

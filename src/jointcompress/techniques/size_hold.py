"""Holding the size budget from below (`size_budget.hold`): a state under its budget stops
shrinking, and between the window's end and the freeze it grows back onto the aim.

Why: the multiplier is an integral controller. While the budget falls it accumulates, and when
the state reaches the goal it is still large and positive, so the dead zones keep widening
past the goal (integral windup). On LeNet-300-100 at 100x with 4 epochs the state was 4.5%
under its aim at the freeze (9% with an earlier window), and the freeze's projection then
revived about a thousand weights at once, weights that had been out of the network for
hundreds of steps and came back with stale values for the short fine-tuning. The errors
followed the undershoot (1.81%, 1.77%, 1.74% at 4.5%, 4.0%, 1.8% under, one seed).

What it does, at every calibration of the budget:
- anti-windup: a state more than HOLD_TOLERANCE under the budget of the moment clamps the
  multiplier to <= 0, so the size term no longer pulls the dead zones wider (it may pull
  them narrower, as dual ascent then decides);
- re-growth: between the window's end and the freeze (the budget is final), an even share of
  the deficit to the aim is revived, the pruned weights nearest their dead zone's edge per
  byte first (the projection's revival order), by moving their shadow value just past the
  edge with its sign kept; training decides from there whether they stay. This is the mirror
  of `size_projection.Landing.catch_up`, which cuts a state over its aim in even steps.
"""
from __future__ import annotations

import torch

HOLD_TOLERANCE = 0.02  # a state this far under the budget is held (the mirror of CATCH_UP_TOLERANCE)
REVIVE_OFFSET = 0.1  # a revived weight's shadow sits this far (in steps) past its dead zone's edge


@torch.no_grad()
def hold(budget, step: int) -> None:
    """Anti-windup and re-growth of `budget` (a size_budget.SizeBudget) at `step`; see the module."""
    now = budget.calibrated_hard()
    if now >= budget.goal(step) * (1 - HOLD_TOLERANCE):
        return
    budget.lam = min(budget.lam, 0.0)
    if not budget.window[1] <= step < budget.freeze_step:
        return
    aim = budget.aim()
    every = budget.calibration_interval
    share = every / (budget.freeze_step - step + every)
    owners, where, cost = budget.ranking(drop=False)
    if len(where) == 0:
        return
    count = int(torch.searchsorted(torch.cumsum(cost, 0), torch.tensor(share * (aim - now)))) + 1
    revive(budget, owners[:count], where[:count])
    budget.events.append({"event": "size_regrow", "step": step, "bytes_before": round(now),
                          "aim_bytes": round(aim), "revived_weights": int(min(count, len(where)))})


def revive(budget, owners: torch.Tensor, where: torch.Tensor) -> None:
    """Move the shadow values at flat indices `where` of the layers numbered `owners` just past
    their channel's dead-zone edge (sign kept; a weight at exactly 0 comes back positive)."""
    for i, (m, q) in enumerate(budget.layers.values()):
        w = m.parametrizations.weight.original
        idx = where[owners == i]
        if len(idx) == 0:
            continue
        edge = ((q.dead_zone() + REVIVE_OFFSET) * q.effective_step()).detach().expand_as(w).reshape(-1)
        flat = w.view(-1)
        sign = torch.where(flat[idx] < 0, -1.0, 1.0).to(flat.dtype)
        flat[idx] = sign * edge[idx].to(flat.dtype)

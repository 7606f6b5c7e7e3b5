"""Where a run stands in its plan: attach / freeze events, LR phases.

The plan (plan.py) says at which step every technique attaches and (sequential runs)
freezes; `apply_events` carries those out at a step, and `event_steps` lists the steps
whose events built the structure a resumed run must rebuild before loading its state.
"""
from __future__ import annotations

import math

from ..model_call import on_model_device
from ..plan import Plan


def apply_events(techniques, plan: Plan, ctx, step: int) -> bool:
    """Attach the techniques due by `step` and freeze those due at it; True if any changed."""
    changed = False
    for t in techniques:
        if not t.attached and plan.attach.get(id(t), 0) <= step:
            ctx.step = step
            with on_model_device(ctx.model):
                t.setup(ctx)
            changed = True
        if t.attached and not t.frozen and plan.freeze.get(id(t), -1) == step:
            ctx.step = step
            t.on_step(ctx)  # the window has closed: final exact masks first
            t.freeze()
            changed = True
    return changed


def event_steps(plan: Plan, before: int) -> list[int]:
    """The event steps earlier than `before` (and 0), in order."""
    return sorted({s for s in list(plan.attach.values()) + list(plan.freeze.values()) if s < before} | {0})


def lr_factor(step: int, plan: Plan, kind: str) -> float:
    """The built-in loop's LR multiplier: a cosine decay per phase (or constant)."""
    if kind == "constant":
        return 1.0
    for ph in plan.phases:
        if ph.start <= step < ph.end:
            p = (step - ph.start) / max(1, ph.end - ph.start)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))
    return 0.01


def phase_of(plan: Plan, step: int) -> str:
    return next((p.name for p in plan.phases if p.start <= step < p.end), plan.phases[-1].name)

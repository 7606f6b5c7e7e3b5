"""A caller's LR scheduler kept in step with parameter groups a technique brings later.

A technique that attaches after step 0 (quant_lsq with `start: 0.3`) adds its parameters to the
caller's optimizer as a new group. torch's schedulers and the transformers Trainer's keep one
entry per group from when they were made (base_lrs, LambdaLR's lr_lambdas, OneCycleLR's per-group
max_lr): a group they never saw stopped the next scheduler step with "zip() argument 2 is shorter
than argument 1". The new group gets the entries the first group has, scaled by the ratio of its
own learning rate to the first group's base, so it follows the same schedule at its own size.
"""
from __future__ import annotations

import torch

# per-group values a scheduler keeps in the group itself (OneCycleLR, and every scheduler's initial_lr)
GROUP_KEYS = ("initial_lr", "max_lr", "min_lr")
# per-group momentum values OneCycleLR / CyclicLR keep in the group, and what they drive: copied
MOMENTUM_KEYS = ("max_momentum", "base_momentum", "betas", "momentum")
# per-group lists a scheduler keeps on itself, extended with the first group's entry scaled
SCALED_LISTS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")
# per-group lists copied from the first group's entry (CyclicLR's momentum bounds: a momentum is no rate)
COPIED_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")


def base_lr(optimizer: torch.optim.Optimizer, scheduler=None, bound_lr: float | None = None) -> float:
    """The first group's learning rate as the caller chose it, so a technique's own rate is placed
    beside it at the ratio it has under a constant LR: the peak of a one-cycle schedule (the group's
    max_lr) or of a cyclic one (CyclicLR's max_lrs, kept on the scheduler: its initial_lr is the
    bottom of the cycle, which placed a later group 10x too high), else the rate before any schedule:
    its initial_lr, or `bound_lr` (the rate when the optimizer was bound) for a scheduler that keeps
    none (ReduceLROnPlateau: the current, already cut rate made a later group join at its full rate)."""
    first = optimizer.param_groups[0]
    if "max_lr" in first:
        return float(first["max_lr"])
    peaks = [s.max_lrs[0] for s in _schedulers(scheduler) if isinstance(getattr(s, "max_lrs", None), list) and s.max_lrs]
    if peaks:
        return float(peaks[0])
    if "initial_lr" in first:
        return float(first["initial_lr"])
    return float(first["lr"] if bound_lr is None else bound_lr)


def has_scheduler(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a torch LR scheduler was made on this optimizer (it marks the optimizer's step)."""
    return bool(getattr(optimizer.step, "_wrapped_by_lr_sched", False)) or "initial_lr" in optimizer.param_groups[0]


def follow_schedule(optimizer: torch.optim.Optimizer, group: dict, scheduler=None,
                    bound_lr: float | None = None) -> None:
    """Fit `group` (just added, at its own learning rate) into the optimizer's schedule and, if
    given, into `scheduler`'s per-group lists (SequentialLR / ChainedScheduler: into each one's)."""
    first = optimizer.param_groups[0]
    base = base_lr(optimizer, scheduler, bound_lr)
    scale = group["lr"] / base if base > 0 else 1.0
    for key in GROUP_KEYS:
        if key in first:
            group[key] = first[key] * scale
    group["lr"] = first["lr"] * scale  # where the schedule is now
    for key in MOMENTUM_KEYS:
        if key in first:
            group[key] = first[key]
    for sched in _schedulers(scheduler):
        for name in SCALED_LISTS:
            values = getattr(sched, name, None)
            if isinstance(values, list) and values and len(values) < len(optimizer.param_groups):
                values.append(values[0] * scale)
        for name in COPIED_LISTS:
            values = getattr(sched, name, None)
            if isinstance(values, list) and values and len(values) < len(optimizer.param_groups):
                values.append(values[0])


def _schedulers(scheduler) -> list:
    if scheduler is None:
        return []
    inner = getattr(scheduler, "_schedulers", None)
    return [scheduler] + [s for child in (inner or []) for s in _schedulers(child)]

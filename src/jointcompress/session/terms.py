"""The named loss terms of a step: the task term (weighted down by distillation) and every
term an attached technique adds (distill, sparsity, quant, size, ...), each kept apart so
the gradient coordinator sees them separately."""
from __future__ import annotations

import math

import torch


def technique_terms(techniques, ctx, task: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{"task": w * task, **terms of every attached technique}; w is the product of the
    techniques' task weights (distillation: 1 - alpha); a term named twice is summed."""
    terms: dict[str, torch.Tensor] = {}
    task_w = math.prod(t.task_weight() for t in techniques if t.attached)
    if task_w > 0 and task is not None:
        terms["task"] = task_w * task
    for t in techniques:
        if t.attached:
            for k, v in t.loss_terms(ctx).items():
                terms[k] = terms[k] + v if k in terms else v
    return terms


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain sum of the terms (what is logged and what a plain backward would use)."""
    return sum(terms.values())


def technique_scalars(techniques) -> list[dict]:
    """The plain numbers and flags on each technique (attached, frozen, counters): part of
    its state that state_dict() does not hold."""
    return [{k: v for k, v in vars(t).items() if type(v) in (bool, int, float)} for t in techniques]


def set_technique_scalars(techniques, scalars: list[dict]) -> None:
    for t, sc in zip(techniques, scalars):
        for k, v in sc.items():
            setattr(t, k, v)

"""Schedules: how far along a technique is at a given step.

Gradual pruning (Zhu & Gupta, 2017) ramps sparsity s(t) = s_f * (1 - (1 - p)^3) over a window,
reaching the target *exactly* at the window's end. Soft masks are sharpened over the same
window: the sigmoid temperature falls geometrically and the mask becomes exactly binary
when the window closes.
"""
from __future__ import annotations

import math


def progress(step: int, start: int, end: int) -> float:
    """Fraction of the window [start, end] done at `step`, clamped to [0, 1]."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def ramp(target: float, p: float, kind: str = "cubic") -> float:
    """Sparsity at progress p for a target; exact `target` when p == 1."""
    if p >= 1.0 or kind == "constant":
        return target
    if kind == "linear":
        return target * p
    return target * (1.0 - (1.0 - p) ** 3)


def temperature(t0: float, p: float, t_end_ratio: float = 1e-3) -> float:
    """Geometric annealing from t0 to t0*t_end_ratio; 0 (hard) once the window is over."""
    if p >= 1.0:
        return 0.0
    return t0 * math.exp(p * math.log(t_end_ratio))


def update_interval(configured: int | None, window: tuple[int, int], updates: int = 50) -> int:
    """Steps between mask re-allocations: as configured, or ~`updates` over the ramp window
    (re-ranking every step costs a global top-k over all weights for no gain)."""
    if configured:
        return configured
    return max(1, (window[1] - window[0]) // updates)

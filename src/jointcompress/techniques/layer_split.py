"""How a size budget's bytes are split across layers: learned, or the ERK allocator's split (size_budget.layer_split).

Why: under one budget for the whole model, training decides which layers keep bytes, each layer's accuracy
gradient against its price per byte. Where the training loss is a good guide that split is the joint form's
strength; with little data it follows what the training images reward. On LeNet-300-100 at 2 bits with 2,000
images the learned split kept 3,342 weights in the input layer (the ERK allocator: 5,554) and 11,732 in the hidden
one (ERK: 4,030), and read 0.46 points worse than the sequential pipeline on the ERK budgets (BENCHMARKS.md, "Two
bits on the nonzero grid"). With `layer_split: erk` every layer gets its own goal, its ERK share of the budget
(targets.erk_weights, the allocator's data-free proxy), and its own multiplier: how many bytes each layer keeps is
the allocator's, and what the joint form decides is which weights, on which grid, inside each layer.
"""
from __future__ import annotations

import math

import torch

from .size_estimate import sparse_layer_bytes_with_slopes

SEARCH_STEPS = 60  # at most this many bisection steps of the global density factor (log scale)
SHARE_STEP = 0.01  # the shares are searched again when the goal has moved this much (in log-bytes)


class ErkSplit:
    """Each layer's goal in bytes (values + positions, the estimate's uncalibrated units) and multiplier."""

    def __init__(self, shapes: list[torch.Size], band: float = 2.0):
        from ..targets import erk_weight

        self.band = band
        self.numels = [math.prod(shape) for shape in shapes]
        self.weights = [erk_weight(shape) for shape in shapes]
        self.lams = [0.0] * (2 * len(self.numels))  # each layer's upper bound's, then its lower bound's (both >= 0)
        self._cache: tuple[tuple, list[float]] | None = None  # (goal's bucket and widths, the shares there)
        self._factor: float | None = None  # the global density factor found last

    def goals(self, variable_goal: float, bits: list[float]) -> list[float]:
        """The layers' bytes at the ERK densities whose sum is `variable_goal`: density = clip(g * weight, 1 weight,
        1) with the global factor g bisected (as targets.fit_global does on the real writer). The shares are searched
        again only when the goal has moved SHARE_STEP (or a width changed) and scaled onto it in between: the goal
        moves a little every step of the window, the shares hardly at all."""
        key = (round(math.log(max(variable_goal, 1e-9)) / SHARE_STEP), tuple(bits))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._shares(variable_goal, bits))
        return [share * variable_goal for share in self._cache[1]]

    def _shares(self, variable_goal: float, bits: list[float]) -> list[float]:
        """Each layer's share of `variable_goal` at the ERK densities, the factor g searched from the last one."""
        lo, hi = self._bracket(variable_goal, bits)
        for _ in range(SEARCH_STEPS):
            if hi / lo < 1 + 1e-6:
                break
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if self._bytes(mid, bits)[1] <= variable_goal else (lo, mid)
        values, total = self._bytes(lo, bits)
        self._factor = lo
        return [v / total for v in values]

    def _bracket(self, variable_goal: float, bits: list[float]) -> tuple[float, float]:
        """(lo, hi) around the factor whose bytes are `variable_goal`, widened from the last one found."""
        dense = 1.0 / min(self.weights)
        if self._bytes(dense, bits)[1] <= variable_goal:  # every layer dense is within the goal
            return dense, dense
        lo = hi = self._factor or math.sqrt(1e-12 * dense)
        width = 1.05
        while lo > 1e-12 and self._bytes(lo, bits)[1] > variable_goal:
            lo, width = max(1e-12, lo / width), width * width
        width = 1.05
        while hi < dense and self._bytes(hi, bits)[1] <= variable_goal:
            hi, width = min(dense, hi * width), width * width
        return lo, max(hi, lo)

    def _bytes(self, g: float, bits: list[float]) -> tuple[list[float], float]:
        counts = [min(float(n), max(1.0, g * w * n)) for w, n in zip(self.weights, self.numels)]
        values = sparse_layer_bytes_with_slopes(counts, self.numels, bits)[0]
        return values, sum(values)

    def term(self, values: list[float], bits: list[float], variable_goal: float, penalty: float
             ) -> tuple[float, list[float], list[float]]:
        """The bounds' augmented Lagrangian (inequalities: a bound met costs nothing beyond its multiplier's
        decay), its slope per layer's byte and the bounds' errors (> 0: violated), in units that give it the
        whole-file term's slope scale once multiplied by scale / goal (SizeTerm). Upper: bytes <= band * share,
        error bytes / (band * share) - 1; lower: bytes >= share / band, error 1 - band * bytes / share."""
        goals = self.goals(variable_goal, bits)
        n = len(goals)
        upper = [v / (self.band * g) - 1 for v, g in zip(values, goals)]
        lower = [1 - self.band * v / g for v, g in zip(values, goals)]
        term, slopes = 0.0, []
        for g, hi, lo, lam_hi, lam_lo in zip(goals, upper, lower, self.lams[:n], self.lams[n:]):
            push_hi, push_lo = lam_hi + penalty * max(0.0, hi), lam_lo + penalty * max(0.0, lo)
            # weights band * g and g / band: d term / d bytes = push_hi - push_lo
            term += self.band * g * (lam_hi * hi + 0.5 * penalty * max(0.0, hi) ** 2)
            term += g / self.band * (lam_lo * lo + 0.5 * penalty * max(0.0, lo) ** 2)
            slopes.append(push_hi - push_lo)
        return term, slopes, upper + lower

    def ascend(self, errors: list[float], lr: float, bound: float) -> None:
        """Dual ascent of each bound's multiplier on its own error, kept >= 0 (an inequality's)."""
        self.lams = [max(0.0, min(bound, lam + lr * c)) for lam, c in zip(self.lams, errors)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"layer_lams": torch.tensor(self.lams, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        if "layer_lams" in state:
            self.lams = [float(x) for x in state["layer_lams"]]


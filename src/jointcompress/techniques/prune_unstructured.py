"""Unstructured pruning: one mask entry per weight, magnitude or learned scores.

Sparsity follows the cubic ramp of gradual pruning and is exactly the target when the
window closes. `magnitude` re-ranks |w| every `update_every` steps (binary throughout);
`learned` trains movement-style scores (initialised from |w|) through a sigmoid mask whose
temperature anneals to zero, after which the mask is the exact top-k with a
straight-through gradient.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .. import schedules
from .base import RunContext, selected_layers
from .masks import ApplyMask, ScoredMask, allocate, floor_warning, floored_layers, layer_keep_count
from .pruning import PruningTechnique, key as _key


class PruneUnstructured(PruningTechnique):
    kind = "prune_unstructured"
    order = 10

    def __init__(self, config):
        super().__init__(config)
        self.layers: dict[str, nn.Module] = {}
        self.appliers: dict[str, ApplyMask] = {}
        self.retargeted: dict[str, float] = {}  # per-layer targets set during the run (size steering)
        self.retarget_count = 0
        # size steering measured the masks on LSQ's rounding (targets.SizeSteering): 0 not yet, 1 near the goal,
        # 2 re-fitted (kept weights at level 0 are then priced as zeros to the end)
        self.rounding_check = 0

    def setup(self, ctx: RunContext) -> None:
        self.layers = selected_layers(ctx.model, self.config)
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            mask = ScoredMask(self._initial_scores(w), learned=self.config.criterion == "learned")
            applier = ApplyMask(mask)
            parametrize.register_parametrization(layer, "weight", applier)
            self.masks[_key(name)], self.appliers[name] = mask, applier
        self.attached = True
        self._warn_floored()
        self._update(ctx.step, force=True)

    def _layer_min_keep(self) -> float:
        """The min_keep of allocate's layer scope: the recipe's; per-layer budgets (layer_sparsity, set by
        size-target allocators that floor them themselves) only keep the one weight every layer keeps."""
        return 0.0 if self.config.layer_sparsity else self.config.min_keep

    def _warn_floored(self) -> None:
        """Scope layer never empties a layer (masks.layer_floor: min_keep of its weights, at least one): said
        once, when attached, naming the layers the floor keeps less sparse than their target."""
        if self.config.scope == "global":
            self._warn_global_floor()
        if self.config.scope != "layer" or (self.config.sparsity is None and not self.config.layer_sparsity):
            return
        sizes = {n: layer.weight.numel() for n, layer in self.layers.items()}
        floored = floored_layers(sizes, {n: self.layer_target(n) for n in self.layers}, self._layer_min_keep())
        if floored:
            knob = ("prune_unstructured.layer_sparsity" if self.config.layer_sparsity
                    else f"prune_unstructured.sparsity {self.config.sparsity:g}")
            warnings.warn(floor_warning("prune_unstructured", "weights", "layers", knob, self._layer_min_keep(),
                                        sizes, floored), stacklevel=3)

    def _warn_global_floor(self) -> None:
        """Scope global with min_keep above 1 - sparsity: every layer keeps its floor, so the model keeps
        more than asked (0.9 asked with min_keep 0.8 ended at 0.2) and never counts as at its target;
        scope layer said so, global did not."""
        sparsity, floor = self.config.sparsity, self.config.min_keep
        if sparsity is None or floor <= 1.0 - sparsity:
            return
        warnings.warn(f"prune_unstructured: min_keep {floor:g} keeps more of every layer than sparsity {sparsity:g} "
                      f"leaves ({1 - sparsity:g}), so the model ends at sparsity {1 - floor:g} at most; lower min_keep "
                      "(or the sparsity)", stacklevel=4)

    def _initial_scores(self, w: torch.Tensor) -> torch.Tensor:
        scores = w.abs()
        if self.config.criterion == "learned":
            # comparable across layers for a global budget; O(1) so score_lr means the same everywhere
            denom = self._global_mean() if self.config.scope == "global" else scores.mean()
            scores = scores / denom.clamp_min(1e-12)
        return scores

    def _global_mean(self) -> torch.Tensor:
        ws = [l.weight.detach().abs().flatten() for l in self.layers.values()]
        return torch.cat(ws).mean()

    def target_sparsity(self, step: int) -> float:
        p = schedules.progress(step, *self.window)
        return schedules.ramp(self.config.sparsity, p, self.config.schedule)

    def on_step(self, ctx: RunContext) -> None:
        if not self.frozen:
            self._update(ctx.step)

    def _update(self, step: int, force: bool = False) -> None:
        p = schedules.progress(step, *self.window)
        due = force or p >= 1.0 or (step - self.window[0]) % schedules.update_interval(self.config.update_every, self.window) == 0
        if not due or (self._final_done and p >= 1.0):
            return
        self.current_sparsity = self.target_sparsity(step)
        if self.config.criterion == "magnitude":
            for name, layer in self.layers.items():
                self.masks[_key(name)].scores.copy_(_weight_seen_by(layer, self.appliers[name]).abs())
        temp = 0.0 if self.config.criterion == "magnitude" else schedules.temperature(self.config.temperature, p)
        masks = list(self.masks.values())
        if self.config.layer_sparsity:
            # every layer keeps at least one weight (allocate's layer scope), whatever its budget
            keeps = [allocate([m.scores], schedules.ramp(self.layer_target(n), p, self.config.schedule), "layer", 0)[0] for n, m in zip(self.layers, masks)]
        else:
            keeps = allocate([m.scores for m in masks], self.current_sparsity, self.config.scope, self.config.min_keep)
        for m, keep in zip(masks, keeps):
            m.set_keep(keep, temp)
        self._final_done = p >= 1.0

    def layer_target(self, name: str) -> float:
        if name in self.retargeted:
            return self.retargeted[name]
        return (self.config.layer_sparsity or {}).get(name, self.config.sparsity)

    def retarget(self, layer_sparsity: dict[str, float], now: bool = False) -> None:
        """New per-layer targets (needs per-layer budgets, i.e. scope layer); checkpointed.

        During the ramp it continues from where it is to them; with `now` the masks move to
        them at once, exactly and binary (after the ramp, or in a frozen sequential phase).
        """
        if not self.config.layer_sparsity:
            raise ValueError("retarget needs prune_unstructured.layer_sparsity (per-layer budgets)")
        self.retargeted = {n: float(layer_sparsity[n]) for n in self.layers if n in layer_sparsity}
        self.retarget_count += 1
        if now:
            self._final_done = False
            self._update(self.window[1], force=True)

    def state_dict(self):
        state = super().state_dict()
        if self.retargeted:  # NaN: the layer keeps its recipe target
            state["retarget"] = torch.tensor([self.retargeted.get(n, float("nan")) for n in self.layers], dtype=torch.float64)
            state["retarget_count"] = torch.tensor(self.retarget_count)
        if self.rounding_check:
            state["rounding_check"] = torch.tensor(self.rounding_check)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "retarget" in state:
            self.retargeted = {n: float(v) for n, v in zip(self.layers, state["retarget"].tolist()) if v == v}
            self.retarget_count = int(state["retarget_count"])
        self.rounding_check = int(state.get("rounding_check", 0))

    def loss_terms(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Push the weights being pruned toward zero so removing them costs less (L1 on w*(1-m))."""
        lam = self.config.regularization
        if lam == 0 or self.frozen:
            return {}
        terms = []
        for name, applier in self.appliers.items():
            if applier.last_mask is None:
                continue
            w = self.layers[name].parametrizations.weight.original
            terms.append((w.abs() * (1 - applier.last_mask.detach())).mean())
        return {"sparsity": lam * torch.stack(terms).mean()} if terms else {}

    def at_target(self) -> bool:
        if not self.binary():
            return False
        if self.config.layer_sparsity:
            return all(
                abs(m.sparsity() - self.layer_target(n)) <= 1.0 / m.hard.numel() + 1e-6
                for n, m in zip(self.layers, self.masks.values())
            )
        target = self.config.sparsity
        if self.config.scope == "layer":  # what the layers reach with their floors (masks.layer_keep_count)
            kept = sum(layer_keep_count(m.hard.numel(), target, self.config.min_keep) for m in self.masks.values())
            target = 1.0 - kept / max(1, self.total_entries())
        return abs(self.achieved_sparsity() - target) < 1e-3 + 1.0 / max(1, self.total_entries())

    def metrics(self) -> dict[str, float]:
        return {"sparsity": self.achieved_sparsity(), "sparsity_target_now": self.current_sparsity}


@torch.no_grad()
def _weight_seen_by(layer: nn.Module, applier: ApplyMask) -> torch.Tensor:
    """The weight as it enters `applier`: channels removed by structured pruning (stacked
    before it) count as zero, so no unstructured budget is spent on weights that will go."""
    w = layer.parametrizations.weight.original
    for p in layer.parametrizations.weight:
        if p is applier:
            break
        w = p(w)
    return w.detach()

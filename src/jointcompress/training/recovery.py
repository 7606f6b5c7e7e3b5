"""Non-finite steps: caught before the optimizer step, rolled back, or the run stops.

A non-finite loss term or gradient skips the step; model, techniques, optimizer and
coordinator go back to the last good in-memory snapshot with half the learning rate; the
`max_nonfinite`-th such step raises a TrainingError naming the step and the term (or
parameter). Snapshots are taken at the start, after attach/freeze events, every
`snapshot_every` steps and after every evaluation.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ..errors import RecipeError, TrainingError
from ..model_copy import load_model_state
from ..session import terms as _terms


def clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: clone(x) for k, x in v.items()}
    return v


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite, in one multi-tensor pass (the fast path; False also where
    only the sum of the norms overflows): the gradients' norms are finite iff their entries are,
    and their sum iff every norm is. Gradients on several devices take get_total_norm's grouping."""
    grads = [p.grad for p in params]
    device = grads[0].device
    if any(g.device != device for g in grads):
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))


class Recovery:
    def __init__(self, session, max_nonfinite: int = 3, snapshot_every: int = 50):
        if max_nonfinite < 1:
            raise RecipeError(f"max_nonfinite must be >= 1 (got {max_nonfinite})")
        self.session, self.max_nonfinite, self.snapshot_every = session, max_nonfinite, snapshot_every
        self.lr_scale = 1.0  # halved at every rollback after a non-finite step
        self.count = 0
        self.good: dict[str, Any] | None = None

    def _device(self):
        p = next(self.session.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def bad_term(self, values: dict[str, float]) -> str | None:
        """The first non-finite loss term, named; `values`: the step's terms read as floats (the
        loop reads them once, for this check and for what the step reports)."""
        bad = next((f"loss term '{k}' is {v}" for k, v in values.items() if not math.isfinite(v)), None)
        dist = self.session.sync.dist
        if dist is not None:  # every rank skips the step; each names the rank and term that made it
            src = dist.lowest_rank(bad is not None, self._device())
            if src is not None:
                told = dist.broadcast_json(bad, src=src, device=self._device())
                bad = bad if src == dist.rank else f"{told} on rank {src}"
        return bad

    def bad_gradient(self) -> str | None:
        params = [p for p in self.session.coordinator.params if p.grad is not None]
        if not params:
            return None
        if all_finite(params):
            return None
        finite = torch.stack([torch.isfinite(p.grad).all() for p in params])
        if bool(finite.all()):  # the norm overflowed, but every entry is finite
            return None
        p = params[int((~finite).nonzero()[0])]
        bad = p.grad[~torch.isfinite(p.grad)]
        name = self.session.param_names.get(id(p), tuple(p.shape))
        return f"the gradient of parameter '{name}' has {bad.numel()} non-finite value(s) (e.g. {float(bad[0])})"

    def take_good(self, step: int) -> None:
        """In-memory snapshot of model + techniques + optimizer to roll back to."""
        s = self.session
        self.good = {
            "step": step,
            "model": {k: v.detach().clone() for k, v in s.model.state_dict().items()},
            "techniques": [{k: clone(v) for k, v in t.state_dict().items()} for t in s.techniques],
            "scalars": _terms.technique_scalars(s.techniques),
            "optimizer": copy.deepcopy(s.optimizer.state_dict()),
            "factors": dict(s.coordinator.factors),
        }

    def rollback(self) -> None:
        g, s = self.good, self.session
        if g is None:
            return
        load_model_state(s.model, g["model"])
        s.load_technique_states(g["techniques"])
        _terms.set_technique_scalars(s.techniques, g["scalars"])
        s.optimizer.load_state_dict(copy.deepcopy(g["optimizer"]))
        s.coordinator.factors = dict(g["factors"])

    def nonfinite(self, step: int, what: str, terms: dict, events: list, last_checkpoint=None) -> dict[str, Any]:
        """Skip this step, roll back to the last good state with half the LR, or give up."""
        self.session.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        good_step = self.good["step"] if self.good else None
        self.rollback()
        self.lr_scale *= 0.5
        events.append({"event": "nonfinite", "step": step, "what": what, "rolled_back_to": good_step, "lr_scale": self.lr_scale})
        if self.count >= self.max_nonfinite:
            saved = f"; the last checkpoint ({last_checkpoint}) is kept" if last_checkpoint else ""
            kept = (" (a changed recipe starts a new run: the kept checkpoint resumes only with this recipe)"
                    if last_checkpoint else "")  # said only where there is one: the run may stop before the first
            fp16 = ("; in fp16 the forward itself may overflow: training.precision bf16 or fp32"
                    if getattr(self.session.recipe.training, "precision", None) == "fp16" else "")
            raise TrainingError(
                f"step {step}: {what}. This was non-finite step {self.count} of at most max_nonfinite={self.max_nonfinite} "
                f"(each rolled back to the last good state, step {good_step}, and halved the learning rate){saved}. "
                f"Lower training.lr, set training.grad_clip, or check the data for NaN/Inf{fp16}{kept}"
            )
        return {"terms": {k: float(v.detach()) for k, v in terms.items()}, "coordination": None, "skipped": True}

"""The one training loop that drives every technique (joint and sequential alike).

Per step: techniques update their schedules, the model runs forward, every technique adds
its named loss terms, the gradient coordinator turns the terms into one update, the
optimizer steps. After every epoch the user's metric is evaluated and the best state whose
techniques are all at their target (masks binary, sparsity exact) is kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .coordination import GradientCoordinator
from .errors import TrainingError
from .plan import Plan
from .techniques.base import RunContext, Technique


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # one entry per evaluation
    steps: list[dict] = field(default_factory=list)  # loss terms + coordination, every log_every steps
    best_epoch: int | None = None
    best_metric: float | None = None
    wall_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "wall_seconds": self.wall_seconds,
        }


def _lr_factor(step: int, plan: Plan, kind: str) -> float:
    if kind == "constant":
        return 1.0
    for ph in plan.phases:
        if ph.start <= step < ph.end:
            p = (step - ph.start) / max(1, ph.end - ph.start)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))
    return 0.01


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        techniques: list[Technique],
        plan: Plan,
        recipe,
        train_loader,
        evaluate: Callable[[nn.Module], dict[str, float]],
        example_inputs,
        teacher: nn.Module | None = None,
        progress: Callable | None = None,
        callbacks: list | None = None,
    ):
        self.model, self.techniques, self.plan, self.recipe = model, sorted(techniques, key=lambda t: t.order), plan, recipe
        self.loader, self.evaluate, self.teacher = train_loader, evaluate, teacher
        self.ctx = RunContext(model=model, example_inputs=example_inputs, teacher=teacher, total_steps=plan.total_steps)
        self.history = History()
        self.optimizer: torch.optim.Optimizer | None = None
        self.coordinator: GradientCoordinator | None = None
        self.progress = progress
        # objects with any of on_step(trainer, step, out), on_epoch(trainer, entry), on_end(trainer)
        self.callbacks = list(callbacks or [])
        self.teacher_cache: dict[int, torch.Tensor] = {}
        self._best_state = None

    # -- optimizer and coordinator ---------------------------------------------------------
    def _rebuild(self) -> None:
        """(Re)create the optimizer and coordinator when techniques attach or freeze."""
        cfg = self.recipe.training
        groups, owned = [], set()
        for t in self.techniques:
            if not t.attached:
                continue
            for g in t.parameters():
                params = [p for p in g["params"] if p.requires_grad and id(p) not in owned]
                owned.update(id(p) for p in params)
                if params:
                    groups.append({**g, "params": params, "lr": g.get("lr", cfg.lr)})
        weights = [p for p in self.model.parameters() if p.requires_grad and id(p) not in owned]
        groups.insert(0, {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"})
        for g in groups:
            g["base_lr"] = g["lr"]
        old = self.optimizer
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
        else:
            cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            self.optimizer = cls(groups, lr=cfg.lr)
        if old is not None:  # keep the moments of parameters that stay
            for p, s in old.state.items():
                if any(p is q for g in groups for q in g["params"]):
                    self.optimizer.state[p] = s
        self.coordinator = GradientCoordinator(
            self.recipe.coordination, {g["name"]: g["params"] for g in groups}, seed=cfg.seed
        )

    def _schedule_events(self, step: int) -> bool:
        changed = False
        for t in self.techniques:
            if not t.attached and self.plan.attach.get(id(t), 0) <= step:
                self.ctx.step = step
                t.setup(self.ctx)
                changed = True
            if t.attached and not t.frozen and self.plan.freeze.get(id(t), -1) == step:
                self.ctx.step = step
                t.on_step(self.ctx)  # the window has closed: final exact masks first
                t.freeze()
                changed = True
        return changed

    # -- one step ---------------------------------------------------------------------------
    def _teacher_logits(self, x, idx):
        if idx is None or self.teacher is None:
            return None
        if all(int(i) in self.teacher_cache for i in idx):
            return torch.stack([self.teacher_cache[int(i)] for i in idx])
        with torch.no_grad():
            out = self.teacher(x)
        for i, row in zip(idx, out):
            self.teacher_cache[int(i)] = row
        return out

    def _terms(self, x, y, idx) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        ctx.batch_inputs, ctx.batch_targets = x, y
        distill = next((t for t in self.techniques if t.kind == "distill_kd" and t.attached), None)
        cache = distill is not None and distill.config.cache_teacher and not distill.config.features
        ctx.batch_extra = {"teacher_logits": self._teacher_logits(x, idx) if cache else None}
        ctx.outputs = self.model(x)
        terms: dict[str, torch.Tensor] = {}
        task_w = math.prod(t.task_weight() for t in self.techniques if t.attached)
        if task_w > 0:
            terms["task"] = task_w * F.cross_entropy(ctx.outputs, y)
        for t in self.techniques:
            if t.attached:
                for k, v in t.loss_terms(ctx).items():
                    terms[k] = terms[k] + v if k in terms else v
        return terms

    def step(self, batch, step: int) -> dict[str, Any]:
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) > 2 else None
        self.ctx.step = step
        for t in self.techniques:
            if t.attached:
                t.on_step(self.ctx)
        terms = self._terms(x, y, idx)
        for name, v in terms.items():
            if not torch.isfinite(v):
                raise TrainingError(f"step {step}: loss term '{name}' is {float(v)}; lower the learning rate")
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(step, self.plan, self.recipe.training.lr_schedule)
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.coordinator.backward(terms, step)
        for t in self.techniques:
            if t.attached:
                t.before_optimizer_step(self.ctx)
        if self.recipe.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.coordinator.params, self.recipe.training.grad_clip)
        self.optimizer.step()
        for t in self.techniques:
            if t.attached:
                t.after_optimizer_step(self.ctx)
        return {"terms": {k: float(v.detach()) for k, v in terms.items()}, "coordination": stats}

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> History:
        start_time = time.perf_counter()
        total = self.plan.total_steps
        spe = len(self.loader)
        step, epoch = 0, 0
        self.model.train()
        self._schedule_events(0)
        self._rebuild()
        while step < total:
            sums: dict[str, float] = {}
            conflict, n_conf, n = 0.0, 0, 0
            for batch in self.loader:
                if step >= total:
                    break
                if step > 0 and self._schedule_events(step):
                    self._rebuild()
                out = self.step(batch, step)
                for k, v in out["terms"].items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                stats = out["coordination"]
                if stats is not None:
                    conflict, n_conf = conflict + stats.conflict_rate, n_conf + 1
                    if step % self.recipe.coordination.log_every == 0:
                        self.history.steps.append({"step": step, "terms": out["terms"], **stats.as_dict()})
                self._notify("on_step", step, out)
                step += 1
                if self.progress:
                    self.progress(step, total)
            epoch += 1
            self.ctx.epoch = epoch
            self._end_epoch(epoch, step, {k: v / max(1, n) for k, v in sums.items()}, conflict / n_conf if n_conf else None)
        if step >= total:  # freeze events due exactly at the end
            self._schedule_events(total)
        self._restore_best()
        self.history.wall_seconds = time.perf_counter() - start_time
        self._notify("on_end")
        return self.history

    def _notify(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self, *args)

    def _phase(self, step: int) -> str:
        return next((p.name for p in self.plan.phases if p.start <= step < p.end), self.plan.phases[-1].name)

    def _end_epoch(self, epoch: int, step: int, losses: dict, conflict: float | None) -> None:
        for t in self.techniques:
            if t.attached:
                t.on_epoch_end(self.ctx)
        metrics = self.evaluate(self.model)
        metrics = metrics if isinstance(metrics, dict) else {self.recipe.training.metric: float(metrics)}
        self.model.train()
        entry = {"epoch": epoch, "step": step, "phase": self._phase(step - 1), "losses": losses, "conflict_rate": conflict, "metrics": metrics}
        for t in self.techniques:
            if t.attached:
                entry.update({f"{t.kind}.{k}": v for k, v in t.metrics().items()})
        all_final = all(t.attached and t.at_target() for t in self.techniques) and step >= max(
            [t.window[1] for t in self.techniques] + [0]
        )
        entry["at_target"] = all_final
        self.history.epochs.append(entry)
        self._notify("on_epoch", entry)
        key = self.recipe.training.metric
        if key not in metrics:
            raise TrainingError(f"evaluate() returned {sorted(metrics)}; training.metric is '{key}'. Set training.metric to one of them")
        value = float(metrics[key])
        if all_final and (self.history.best_metric is None or value >= self.history.best_metric):
            self.history.best_metric, self.history.best_epoch = value, epoch
            self._best_state = self._snapshot()

    def _snapshot(self):
        return (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            [{k: _clone(v) for k, v in t.state_dict().items()} for t in self.techniques],
        )

    def _restore_best(self) -> None:
        if self._best_state is None:
            return
        model_state, tech_states = self._best_state
        self.model.load_state_dict(model_state)
        for t, s in zip(self.techniques, tech_states):
            if s:
                t.load_state_dict(s)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v

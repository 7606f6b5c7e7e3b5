"""The one training loop that drives every technique (joint and sequential alike).

Per step: techniques update their schedules, the model runs forward, every technique adds
its named loss terms, the gradient coordinator turns the terms into one update, the
optimizer steps. After every epoch the user's metric is evaluated and the best state whose
techniques are all at their target (masks binary, sparsity exact) is kept.

Reliability (docs/reliability.md):
- checkpoints (checkpoint.py) every `checkpoint_every` steps and at every evaluation hold
  everything needed to continue bit-for-bit: weights with their parametrizations, technique
  states, optimizer, LR scale, RNG states, the DataLoader position, history and best state;
- a non-finite loss term or gradient is caught before the optimizer step: the step is
  skipped, the run rolls back to the last good in-memory state with half the learning rate,
  and after `max_nonfinite` such steps it stops with a TrainingError naming the step and the
  term (or parameter);
- under torch.distributed (distributed.py) gradients are averaged over ranks, masks and step
  sizes are broadcast from rank 0, metrics are averaged and only rank 0 writes.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .coordination import GradientCoordinator
from .distributed import DistContext, tensors_of
from .errors import RecipeError, TrainingError
from .plan import Plan
from .techniques.base import RunContext, Technique


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # one entry per evaluation
    steps: list[dict] = field(default_factory=list)  # loss terms + coordination, every log_every steps
    best_epoch: int | None = None
    best_metric: float | None = None
    wall_seconds: float = 0.0
    events: list[dict] = field(default_factory=list)  # skipped non-finite steps, rollbacks, resumes

    def as_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "wall_seconds": self.wall_seconds,
            "events": self.events,
        }


def _lr_factor(step: int, plan: Plan, kind: str) -> float:
    if kind == "constant":
        return 1.0
    for ph in plan.phases:
        if ph.start <= step < ph.end:
            p = (step - ph.start) / max(1, ph.end - ph.start)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))
    return 0.01


@dataclass
class _Position:
    """Where the run is: the next step, completed epochs, batches done in the current epoch,
    and the running sums of the current epoch (so a resumed epoch logs the same averages)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    sums: dict = field(default_factory=dict)
    conflict: float = 0.0
    n_conf: int = 0
    n: int = 0

    def new_epoch(self) -> None:
        self.batch_in_epoch, self.sums, self.conflict, self.n_conf, self.n = 0, {}, 0.0, 0, 0


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
        run_dir=None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        max_nonfinite: int = 3,
        snapshot_every: int = 50,
        dist: DistContext | None = None,
        keep_checkpoints: int = 2,
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
        self.teacher_cache = TeacherCache()
        self._best_state = None
        # reliability
        if checkpoint_every is not None and checkpoint_every < 1:
            raise RecipeError(f"checkpoint_every must be >= 1 (got {checkpoint_every}); pass None for checkpoints at evaluations only")
        if max_nonfinite < 1:
            raise RecipeError(f"max_nonfinite must be >= 1 (got {max_nonfinite})")
        self.store = ckpt.CheckpointStore(run_dir, keep=keep_checkpoints) if run_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.max_nonfinite = max_nonfinite
        self.snapshot_every = snapshot_every
        self.dist = dist
        self.lr_scale = 1.0  # halved at every rollback after a non-finite step
        self.nonfinite = 0
        self.pos = _Position()
        self._epoch_start: dict[str, Any] = {"gen": None, "torch": None}
        self._good: dict[str, Any] | None = None
        self._param_names: dict[int, str] = {}
        self._wall_offset = 0.0
        self._t0 = time.perf_counter()
        self.last_checkpoint = None

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
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, foreach=True)
        else:
            cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            self.optimizer = cls(groups, lr=cfg.lr, foreach=True)
        if old is not None:  # keep the moments of parameters that stay
            for p, s in old.state.items():
                if any(p is q for g in groups for q in g["params"]):
                    self.optimizer.state[p] = s
        self.coordinator = GradientCoordinator(
            self.recipe.coordination, {g["name"]: g["params"] for g in groups}, seed=cfg.seed
        )
        self._param_names = {id(p): n for n, p in self.model.named_parameters()}
        for t in self.techniques:
            for attr, val in vars(t).items():
                if isinstance(val, nn.Module):
                    for n, p in val.named_parameters():
                        self._param_names.setdefault(id(p), f"{t.kind}.{attr}.{n}")

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

    def _after_events(self) -> None:
        self._rebuild()
        self._sync_model()
        self._sync_techniques()
        self._take_good()

    # -- distributed ------------------------------------------------------------------------
    def _sync_model(self) -> None:
        if self.dist is not None:
            self.dist.broadcast_tensors(tensors_of(self.model.state_dict()))

    def _sync_techniques(self) -> None:
        if self.dist is not None:
            self.dist.broadcast_tensors(tensors_of([t.state_dict() for t in self.techniques if t.attached]))

    def _device(self):
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -- one step ---------------------------------------------------------------------------
    def _teacher_logits(self, x, idx):
        if idx is None or self.teacher is None:
            return None
        cached = self.teacher_cache.get(idx)
        if cached is not None:
            return cached
        with torch.no_grad():
            out = self.teacher(x)
        self.teacher_cache.put(idx, out)
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

    def _bad_gradient(self) -> str | None:
        params = [p for p in self.coordinator.params if p.grad is not None]
        if not params:
            return None
        # one fused norm over every gradient: finite iff every entry is finite (fast path)
        if bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params]))):
            return None
        finite = torch.stack([torch.isfinite(p.grad).all() for p in params])
        if bool(finite.all()):  # the norm overflowed, but every entry is finite
            return None
        p = params[int((~finite).nonzero()[0])]
        bad = p.grad[~torch.isfinite(p.grad)]
        return f"the gradient of parameter '{self._param_names.get(id(p), tuple(p.shape))}' has {bad.numel()} non-finite value(s) (e.g. {float(bad[0])})"

    def step(self, batch, step: int) -> dict[str, Any]:
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) > 2 else None
        self.ctx.step = step
        for t in self.techniques:
            if t.attached:
                t.on_step(self.ctx)
        self._sync_techniques()  # masks decided on rank 0 are the masks everywhere
        terms = self._terms(x, y, idx)
        bad = next((f"loss term '{k}' is {float(v.detach().float().sum())}" for k, v in terms.items() if not bool(torch.isfinite(v).all())), None)
        if self.dist is not None and self.dist.any(bad is not None, self._device()) and bad is None:
            bad = "a loss term is non-finite on another rank"
        if bad is not None:
            return self._nonfinite(step, bad, terms)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * self.lr_scale * _lr_factor(step, self.plan, self.recipe.training.lr_schedule)
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.coordinator.backward(terms, step)
        if self.dist is not None:
            self.dist.all_reduce_grads(self.coordinator.params)
        bad = self._bad_gradient()  # identical on every rank after the all-reduce
        if bad is not None:
            return self._nonfinite(step, bad, terms)
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

    # -- non-finite steps -------------------------------------------------------------------
    def _nonfinite(self, step: int, what: str, terms: dict) -> dict[str, Any]:
        """Skip this step, roll back to the last good state with half the LR, or give up."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite += 1
        good_step = self._good["step"] if self._good else None
        self._rollback()
        self.lr_scale *= 0.5
        self.history.events.append({"event": "nonfinite", "step": step, "what": what, "rolled_back_to": good_step, "lr_scale": self.lr_scale})
        if self.nonfinite >= self.max_nonfinite:
            saved = f"; the last checkpoint ({self.last_checkpoint}) is kept" if self.last_checkpoint else ""
            raise TrainingError(
                f"step {step}: {what}. This was non-finite step {self.nonfinite} of at most max_nonfinite={self.max_nonfinite} "
                f"(each rolled back to the last good state, step {good_step}, and halved the learning rate){saved}. "
                "Lower training.lr, set training.grad_clip, or check the data for NaN/Inf"
            )
        return {"terms": {k: float(v.detach()) for k, v in terms.items()}, "coordination": None, "skipped": True}

    def _technique_scalars(self) -> list[dict]:
        return [{k: v for k, v in vars(t).items() if type(v) in (bool, int, float)} for t in self.techniques]

    def _set_technique_scalars(self, scalars: list[dict]) -> None:
        for t, sc in zip(self.techniques, scalars):
            for k, v in sc.items():
                setattr(t, k, v)

    def _take_good(self) -> None:
        """In-memory snapshot of model + techniques + optimizer to roll back to."""
        self._good = {
            "step": self.pos.step,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "techniques": [{k: _clone(v) for k, v in t.state_dict().items()} for t in self.techniques],
            "scalars": self._technique_scalars(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "factors": dict(self.coordinator.factors),
        }

    def _rollback(self) -> None:
        g = self._good
        if g is None:
            return
        self.model.load_state_dict(g["model"])
        for t, s in zip(self.techniques, g["techniques"]):
            if s:
                t.load_state_dict(s)
        self._set_technique_scalars(g["scalars"])
        self.optimizer.load_state_dict(copy.deepcopy(g["optimizer"]))
        self.coordinator.factors = dict(g["factors"])

    # -- the run ----------------------------------------------------------------------------
    def _epoch_iter(self):
        """An iterator over this epoch's batches; mid-epoch after a resume it replays the
        epoch's shuffle from the saved RNG states and skips the batches already trained on."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.pos.epoch)
        gen = getattr(self.loader, "generator", None)
        skip = self.pos.batch_in_epoch
        if skip == 0:
            self._epoch_start = {"gen": gen.get_state() if gen is not None else None, "torch": torch.get_rng_state()}
            return iter(self.loader)
        now = torch.get_rng_state()
        if gen is not None and self._epoch_start["gen"] is not None:
            gen.set_state(self._epoch_start["gen"])
        torch.set_rng_state(self._epoch_start["torch"])
        it = iter(self.loader)
        if getattr(self.loader, "num_workers", 0) == 0 and hasattr(it, "_sampler_iter") and hasattr(it, "_num_yielded"):
            for _ in range(skip):  # advance the sampler only: no data is loaded for skipped batches
                next(it._sampler_iter)
            it._num_yielded += skip
        else:
            for _ in range(skip):
                next(it)
        torch.set_rng_state(now)
        return it

    def run(self) -> History:
        self._t0 = time.perf_counter()
        total = self.plan.total_steps
        spe = len(self.loader)
        self.model.train()
        if not self._try_resume():
            self._schedule_events(0)
            self._rebuild()
            if self.dist is not None and self.teacher is not None:
                self.dist.broadcast_tensors(tensors_of(self.teacher.state_dict()))
            self._sync_model()
            self._sync_techniques()
        self._take_good()
        pos = self.pos
        while pos.step < total:
            for batch in self._epoch_iter():
                if pos.step >= total:
                    break
                step = pos.step
                if step > 0 and self._schedule_events(step):
                    self._after_events()
                out = self.step(batch, step)
                for k, v in out["terms"].items():
                    pos.sums[k] = pos.sums.get(k, 0.0) + v
                pos.n += 1
                stats = out["coordination"]
                if stats is not None:
                    pos.conflict, pos.n_conf = pos.conflict + stats.conflict_rate, pos.n_conf + 1
                    if step % self.recipe.coordination.log_every == 0:
                        self.history.steps.append({"step": step, "terms": out["terms"], **stats.as_dict()})
                self._notify("on_step", step, out)
                pos.step += 1
                pos.batch_in_epoch += 1
                if self.progress:
                    self.progress(pos.step, total)
                if not out.get("skipped") and self.snapshot_every and pos.step % self.snapshot_every == 0:
                    self._take_good()
                if self.checkpoint_every and pos.step % self.checkpoint_every == 0 and pos.batch_in_epoch < spe and pos.step < total:
                    self.save_checkpoint()
            pos.epoch += 1
            self.ctx.epoch = pos.epoch
            losses = {k: v / max(1, pos.n) for k, v in pos.sums.items()}
            conflict = pos.conflict / pos.n_conf if pos.n_conf else None
            pos.new_epoch()
            self._end_epoch(pos.epoch, pos.step, losses, conflict)
            self._take_good()
            self.save_checkpoint()
        if pos.step >= total:  # freeze events due exactly at the end
            self._schedule_events(total)
        self._restore_best()
        self.history.wall_seconds = self._wall_offset + time.perf_counter() - self._t0
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
        self._sync_model()  # BatchNorm statistics and everything else: rank 0's
        self._sync_techniques()
        metrics = self.evaluate(self.model)
        metrics = metrics if isinstance(metrics, dict) else {self.recipe.training.metric: float(metrics)}
        if self.dist is not None:
            metrics = self.dist.mean_metrics(metrics, self._device())
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

    def forget_best(self) -> None:
        """The states kept so far no longer meet the targets (a technique was retargeted)."""
        self._best_state = None
        self.history.best_metric = self.history.best_epoch = None

    def _restore_best(self) -> None:
        if self._best_state is None:
            return
        model_state, tech_states = self._best_state
        self.model.load_state_dict(model_state)
        for t, s in zip(self.techniques, tech_states):
            if s:
                t.load_state_dict(s)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self):
        """Write a checkpoint of the run as it is now (rank 0 only; a no-op without run_dir)."""
        if self.store is None or (self.dist is not None and not self.dist.is_main):
            return None
        gen = getattr(self.loader, "generator", None)
        cache = self.teacher_cache.state()
        payload = {
            "model": self.model.state_dict(),
            "techniques": [t.state_dict() for t in self.techniques],
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader_gen": gen.get_state() if gen is not None else None,
            "epoch_start_gen": self._epoch_start["gen"],
            "epoch_start_torch": self._epoch_start["torch"],
            "best": None if self._best_state is None else {"model": self._best_state[0], "techniques": self._best_state[1]},
            "teacher_cache": cache,
        }
        history = self.history.as_dict()
        history["wall_seconds"] = self._wall_offset + time.perf_counter() - self._t0
        meta = {
            "position": vars(self.pos),
            "total_steps": self.plan.total_steps,
            "history": history,
            "recipe": self.recipe.model_dump(mode="json"),
            "lr_scale": self.lr_scale,
            "nonfinite": self.nonfinite,
            "technique_scalars": self._technique_scalars(),
            "coordinator": {"factors": self.coordinator.factors, "rng": ckpt.python_rng_state(self.coordinator.rng)},
            "python_rng": ckpt.python_rng_state(),
            "numpy_rng": ckpt.numpy_rng_state(),
            "world_size": self.dist.world_size if self.dist is not None else 1,
        }
        self.last_checkpoint = self.store.save(self.pos.step, payload, meta)
        return self.last_checkpoint

    def _try_resume(self) -> bool:
        if not self.resume or self.store is None:
            return False
        found = self.store.latest()
        if found is None:
            return False
        path, ck = found
        meta = ck["meta"]
        if meta.get("recipe") != self.recipe.model_dump(mode="json"):
            raise RecipeError(
                f"{path}: the checkpoint was made with a different recipe; resume with the same recipe "
                "(and --mode/--model/--data), or start a new run in another directory"
            )
        if meta.get("total_steps") != self.plan.total_steps:
            raise TrainingError(
                f"{path}: the checkpoint's run has {meta.get('total_steps')} steps, this one {self.plan.total_steps}; "
                "the training data or batch size changed. Resume with the same data, or start a new run"
            )
        pos = _Position(**meta["position"])
        # rebuild the structure the run had (parametrizations, frozen techniques), then load the state
        events = sorted({s for s in list(self.plan.attach.values()) + list(self.plan.freeze.values()) if s < pos.step} | {0})
        for e in events:
            self._schedule_events(e)
        self._rebuild()
        try:
            self.model.load_state_dict(ck["model"])
            for t, s in zip(self.techniques, ck["techniques"]):
                if s:
                    t.load_state_dict(s)
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise TrainingError(
                f"{path}: the checkpoint does not fit this model ({str(err).splitlines()[0][:300]}); resume with the same model and recipe"
            ) from None
        self._set_technique_scalars(meta["technique_scalars"])
        self.coordinator.factors = dict(meta["coordinator"]["factors"])
        ckpt.set_python_rng_state(meta["coordinator"]["rng"], self.coordinator.rng)
        self.lr_scale, self.nonfinite = float(meta["lr_scale"]), int(meta["nonfinite"])
        h = meta["history"]
        self.history = History(**h)
        self._wall_offset = float(h.get("wall_seconds") or 0.0)
        best = ck.get("best")
        self._best_state = None if best is None else (best["model"], best["techniques"])
        cache = ck.get("teacher_cache")
        self.teacher_cache = TeacherCache.from_state(cache)
        self.pos = pos
        self.ctx.epoch = pos.epoch
        self._epoch_start = {"gen": ck.get("epoch_start_gen"), "torch": ck.get("epoch_start_torch")}
        gen = getattr(self.loader, "generator", None)
        if gen is not None and ck.get("loader_gen") is not None:
            gen.set_state(ck["loader_gen"])
        ckpt.set_python_rng_state(meta["python_rng"])
        ckpt.set_numpy_rng_state(meta["numpy_rng"])
        torch.set_rng_state(ck["torch_rng"])
        if ck.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        self._sync_model()
        self._sync_techniques()
        self.history.events.append({"event": "resumed", "step": pos.step, "checkpoint": path.name})
        self.last_checkpoint = path
        return True


class TeacherCache:
    """Teacher logits per sample index, filled during the first epoch and reused after it.

    Held as one tensor plus a "have" flag per index, so a batch is looked up with one
    gather instead of a Python loop over its samples.
    """

    def __init__(self):
        self.logits: torch.Tensor | None = None
        self.have = torch.zeros(0, dtype=torch.bool)

    def get(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.logits is None or int(idx.max()) >= len(self.have) or not bool(self.have[idx].all()):
            return None
        return self.logits[idx]

    def put(self, idx: torch.Tensor, out: torch.Tensor) -> None:
        need = int(idx.max()) + 1
        if self.logits is None or need > len(self.have):
            size = max(need, 2 * len(self.have))
            logits = out.new_zeros((size,) + tuple(out.shape[1:]))
            have = torch.zeros(size, dtype=torch.bool)
            if self.logits is not None:
                logits[: len(self.have)] = self.logits
                have[: len(self.have)] = self.have
            self.logits, self.have = logits, have
        self.logits[idx] = out.detach()
        self.have[idx] = True

    def state(self) -> dict | None:
        if self.logits is None or not bool(self.have.any()):
            return None
        idx = torch.nonzero(self.have).flatten()
        return {"idx": idx, "logits": self.logits[idx]}

    @classmethod
    def from_state(cls, state: dict | None) -> "TeacherCache":
        cache = cls()
        if state is not None and len(state["idx"]):
            cache.put(state["idx"].long(), state["logits"])
        return cache


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v

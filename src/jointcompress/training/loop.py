"""The built-in training loop: one client of the compression session.

Per step: the session carries out the plan's events and the techniques' schedules, the
model runs forward, the session gives the named loss terms and the coordinated backward,
the optimizer steps between the techniques' hooks. After every epoch the user's metric is
evaluated and the best state whose techniques are all at their target is kept.

The loop composes small collaborators (docs/reliability.md):
- RunCheckpoints (checkpoints.py): every `checkpoint_every` steps and at every evaluation,
  everything needed to continue bit for bit;
- Recovery (recovery.py): a non-finite loss term or gradient skips the step and rolls back
  to the last good in-memory state with half the learning rate, and stops after
  `max_nonfinite` such steps with a TrainingError naming the step and the term;
- BestState (best.py): the best evaluated state at target, restored at the end;
- the session's Sync: under torch.distributed gradients are averaged over ranks, masks and
  step sizes are broadcast from rank 0, metrics are averaged and only rank 0 writes.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from ..distributed import DistContext
from ..errors import RecipeError, TrainingError
from ..plan import Plan
from ..session.norm_statistics import RandomStates, batches_for_the_pass, recalibrate_norms, tracked_norms
from ..session.schedule import lr_factor, phase_of
from ..session.session import CompressionSession, LossFn
from .best import BestState
from .checkpoints import RunCheckpoints
from .epochs import epoch_batches
from .history import History, Position
from .metrics import evaluated
from .micro_batches import check_parts, micro_batches
from .mixed_precision import check_precision, forward_precision, loss_scaler
from .recovery import Recovery


class Trainer:
    """Callbacks are objects with any of on_start(trainer, step) (step: 0, or where a resumed run continues),
    on_step(trainer, step, out), on_epoch(trainer, entry), on_end(trainer); they may read trainer.model,
    .techniques, .plan, .history, .optimizer, .lr_scale and call trainer.forget_best()."""

    def __init__(self, model: nn.Module, techniques: list, plan: Plan, recipe, train_loader,
                 evaluate: Callable[[nn.Module], dict[str, float]], example_inputs, teacher: nn.Module | None = None,
                 progress: Callable | None = None, callbacks: list | None = None, run_dir=None,
                 checkpoint_every: int | None = None, resume: bool = False, max_nonfinite: int = 3,
                 snapshot_every: int = 50, dist: DistContext | None = None, keep_checkpoints: int = 2,
                 loss_fn: LossFn | None = None, asked_recipe=None):
        if checkpoint_every is not None and checkpoint_every < 1:
            raise RecipeError(f"checkpoint_every must be >= 1 (got {checkpoint_every}); pass None for checkpoints at evaluations only")
        check_parts(model, recipe.training, dist.world_size if dist is not None else 1)
        check_precision(model, recipe.training.precision)
        self.scaler = loss_scaler(model, recipe.training.precision)  # fp16 only
        self.session = CompressionSession(model, techniques, plan, recipe, example_inputs=example_inputs, teacher=teacher,
                                          loss_fn=loss_fn, dist=dist)
        self.session.owns_optimizer = True
        self.session.on_restructure.append(self._snapshot)
        self.loader, self.evaluate, self.progress = train_loader, evaluate, progress
        self.callbacks = list(callbacks or [])
        self.history = History()
        self._events_copied: dict[int, int] = {}  # technique id -> how many of its events the history holds
        self.pos = Position()
        self.recovery = Recovery(self.session, max_nonfinite, snapshot_every)
        self.best = BestState(self.session)
        self.checkpoints = RunCheckpoints(self, run_dir, keep=keep_checkpoints)
        self.checkpoint_every, self.resume = checkpoint_every, resume
        self.epoch_start: dict[str, Any] = {"gen": None, "torch": None}
        self.wall_offset = 0.0
        self.t0 = time.perf_counter()
        # the recipe before its target was resolved (run_target.py): a resumed run reuses the resolution
        self.asked_recipe = asked_recipe
        self._warned_epoch_length = False
        self._said_nan = False

    # -- what callbacks read ------------------------------------------------------------------
    model = property(lambda self: self.session.model)
    techniques = property(lambda self: self.session.techniques)
    plan = property(lambda self: self.session.plan)
    recipe = property(lambda self: self.session.recipe)
    ctx = property(lambda self: self.session.ctx)
    optimizer = property(lambda self: self.session.optimizer)
    coordinator = property(lambda self: self.session.coordinator)
    lr_scale = property(lambda self: self.recovery.lr_scale)
    last_checkpoint = property(lambda self: self.checkpoints.last)

    def forget_best(self) -> None:
        """The states kept so far no longer meet the targets (a technique was retargeted)."""
        self.best.forget()
        self.history.best_metric = self.history.best_epoch = None

    def save_checkpoint(self):
        self.collect_technique_events()
        return self.checkpoints.save()

    def collect_technique_events(self) -> None:
        """The techniques' own events (the size budget's cuts, freeze and projections) into the history as
        they come: before each checkpoint, so a resumed run keeps them, and at the end, so compress()'s
        history has them (only the CLI copied them once, after the run)."""
        for t in self.session.techniques:
            events = getattr(t, "events", None) or []
            done = self._events_copied.get(id(t), 0)
            self.history.events.extend(events[done:])
            self._events_copied[id(t)] = len(events)

    def _snapshot(self) -> None:
        self.recovery.take_good(self.pos.step)

    # -- one step -----------------------------------------------------------------------------
    def step(self, batch, step: int) -> dict[str, Any]:
        s, rec = self.session, self.recovery
        s.step = step
        s.update_techniques()
        s.optimizer.zero_grad(set_to_none=True)
        values: dict[str, float] = {}  # what the step reports: each term over the whole batch
        stats = None
        for part, share in micro_batches(batch, s.recipe.training.micro_batches, s.model):
            with forward_precision(s.model, s.recipe.training.precision):
                terms = s.forward_terms(part)
            read = {k: float(v.detach()) for k, v in terms.items()}  # read once, for the check and the report
            bad = rec.bad_term(read)
            if bad is not None:
                return rec.nonfinite(step, bad, terms, self.history.events, self.last_checkpoint)
            values = {k: values.get(k, 0.0) + share.of(k) * v for k, v in read.items()}
            whole = share == 1.0 and share.distill == 1.0
            stats = s.backward(terms if whole else {k: t * share.of(k) for k, t in terms.items()}, scaler=self.scaler)
        factor = lr_factor(step, s.plan, s.recipe.training.lr_schedule)
        for g in s.optimizer.param_groups:
            g["lr"] = g["base_lr"] * rec.lr_scale * factor
        scale = self._unscale()
        bad = rec.bad_gradient()  # identical on every rank after the all-reduce
        if bad is not None:
            if scale is not None:
                self.scaler.update()  # ends the scaler's step (its unscale_ is done) and halves the scale
                if scale > 1.0:  # the loss scale overflowed them: the scaler's own skip
                    return self._overflowed(step, values)
            return rec.nonfinite(step, bad, terms, self.history.events, self.last_checkpoint)
        s.before_step()
        if s.recipe.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(s.coordinator.params, s.recipe.training.grad_clip)
        if self.scaler is not None:
            self.scaler.step(s.optimizer)
            self.scaler.update()
        else:
            s.optimizer.step()
        s.after_step(prepare_next=False)
        return {"terms": values, "coordination": stats}

    def _unscale(self) -> float | None:
        """fp16: the gradients back in true units before they are checked, clipped and worked on; returns
        the scale they carried (None without a scaler)."""
        if self.scaler is None:
            return None
        self.session.settle_gradients()  # the held per-term gradients (micro-batches, ranks) carry the scale too
        scale = self.scaler.get_scale()
        self.scaler.unscale_(self.session.optimizer)
        return scale

    def _overflowed(self, step: int, values: dict[str, float]) -> dict[str, Any]:
        """fp16: gradients that overflowed under a loss scale above 1 skip the step (the scale was halved), as
        GradScaler does; the non-finite recovery (rollback, half the LR) is for gradients that overflow unscaled."""
        self.session.optimizer.zero_grad(set_to_none=True)
        self.history.events.append({"event": "loss_scale_overflow", "step": step, "scale": self.scaler.get_scale()})
        return {"terms": values, "coordination": None, "skipped": True}

    # -- the run --------------------------------------------------------------------------------
    def _start(self) -> None:
        if not self.checkpoints.resume():
            self.session.start()
        else:  # the history holds the events up to the checkpoint; replaying the structure (a freeze) made more
            self._events_copied = {id(t): len(getattr(t, "events", None) or []) for t in self.session.techniques}
        self.recovery.take_good(self.pos.step)
        self._notify("on_start", self.pos.step)  # 0, or the step a resumed run continues from

    def _train_step(self, batch, spe: int) -> None:
        pos, total = self.pos, self.plan.total_steps
        step = pos.step
        self.session.step = step
        self.session.advance_schedule()
        out = self.step(batch, step)
        pos.add(out)
        stats = out["coordination"]
        if stats is not None:
            self.history.note_coordination(stats.changed)
        # one term (distillation alone, alpha 1) has nothing to coordinate, so no stats: its curve is logged all the same
        if (stats is not None or len(out["terms"]) <= 1) and step % self.recipe.coordination.log_every == 0:
            self.history.steps.append({"step": step, "terms": out["terms"], **(stats.as_dict() if stats else {})})
        self._notify("on_step", step, out)
        pos.step += 1
        pos.batch_in_epoch += 1
        if self.progress:
            self.progress(pos.step, total)
        snap = self.recovery.snapshot_every
        checkpoint = self.checkpoint_every and pos.step % self.checkpoint_every == 0 and pos.batch_in_epoch < spe \
            and pos.step < total
        # at a checkpoint too: where a run resumed from it rolls back to (one snapshot where both fall due)
        if checkpoint or (not out.get("skipped") and snap and pos.step % snap == 0):
            self.recovery.take_good(pos.step)
        if checkpoint:
            self.save_checkpoint()

    def run(self) -> History:
        self.t0 = time.perf_counter()
        total, spe = self.plan.total_steps, len(self.loader)
        self.model.train()
        self._start()
        pos = self.pos
        while pos.step < total:
            for batch in epoch_batches(self):
                if pos.step >= total:
                    break
                self._train_step(batch, spe)
                if pos.batch_in_epoch == spe + 1:
                    self._warn_epoch_length(f"more batches than the {spe:,} its len() gives")
            else:
                if pos.batch_in_epoch < spe:
                    self._warn_epoch_length(f"{pos.batch_in_epoch:,} batches where its len() gives {spe:,}")
            pos.epoch += 1
            losses, conflict = pos.epoch_means()
            measured = pos.n_conf
            pos.new_epoch()
            self._end_epoch(pos.epoch, pos.step, losses, conflict, measured)
            self.recovery.take_good(pos.step)
            self.save_checkpoint()
        self.session.step = max(self.session.step, pos.step)
        if pos.step >= total:  # freeze events due exactly at the end
            self.session.finish_schedule()
        self.best.restore()
        self.collect_technique_events()
        self.history.wall_seconds = self.wall_offset + time.perf_counter() - self.t0
        _warn_idle_coordination(self.recipe.coordination, self.history.coordination, self.session.sync.dist)
        _warn_recovered(self.history.events, self.session.sync.dist)
        self._notify("on_end")
        return self.history

    def _warn_epoch_length(self, what: str) -> None:
        """The schedule (pruning ramps, the quantizers' start, the LR) is placed on len(loader) batches an epoch: a
        loader that yields another number (an IterableDataset that every worker yields whole, a __len__ that counts
        something else) ended after another number of epochs, without a word. Said once a run."""
        if self._warned_epoch_length:
            return
        self._warned_epoch_length = True
        warnings.warn(f"train_data: an epoch yielded {what}; the run is placed on its len(), so it ends after another "
                      "number of epochs than training.epochs. Give the loader a __len__ that counts its batches (an "
                      "IterableDataset under several workers must split its samples among them)", UserWarning,
                      stacklevel=3)

    def _notify(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self, *args)

    # -- evaluation -------------------------------------------------------------------------------
    def _metrics(self) -> dict:
        s = self.session
        self._recalibrate_norms()
        s.sync.model(s.model)  # BatchNorm statistics and everything else: rank 0's
        s.sync.techniques(s.techniques)
        metrics = evaluated(self.evaluate, s.model, s.recipe.training.metric)
        metrics = s.sync.mean_metrics(metrics, self.recovery._device())
        s.model.train()
        return metrics

    def _recalibrate_norms(self) -> None:
        """BatchNorm's running statistics re-estimated for the weights being evaluated, from the first
        training.recalibrate_norms batches of the training data (session/norm_statistics.py)."""
        s = self.session
        count = s.recipe.training.recalibrate_norms
        if not count or not tracked_norms(s.model):
            return
        parts = s.recipe.training.micro_batches

        def forward(batch) -> None:
            for part, _ in micro_batches(batch, parts):
                with forward_precision(s.model, s.recipe.training.precision):
                    s.forward_inputs(part)

        with RandomStates(self.loader):
            recalibrate_norms(s.model, iter(batches_for_the_pass(self.loader)), forward, count)

    def _end_epoch(self, epoch: int, step: int, losses: dict, conflict: float | None, measured: int = 0) -> None:
        s = self.session
        s.on_epoch_end(epoch)
        metrics = self._metrics()
        entry = {"epoch": epoch, "step": step, "phase": phase_of(s.plan, step - 1), "losses": losses,
                 "conflict_rate": conflict, "conflict_steps": measured, "metrics": metrics}
        entry.update(s.metrics())
        all_final = all(t.attached and t.at_target() for t in s.techniques) and step >= s.final_from()
        entry["at_target"] = all_final
        self.history.epochs.append(entry)
        self._notify("on_epoch", entry)
        key = s.recipe.training.metric
        if key not in metrics:
            raise TrainingError(f"evaluate() returned {sorted(metrics)}; training.metric is '{key}'. Set training.metric to one of them")
        value = float(metrics[key])
        last = s.recipe.training.keep == "last"  # every final state replaces the one before: the run ends with the last
        if all_final and (last or self._better(value, epoch)):
            self.history.best_metric, self.history.best_epoch = value, epoch
            self.best.keep()

    def _better(self, value: float, epoch: int) -> bool:
        """Whether `value` beats the best so far, in the metric's direction (training.metric_rises). A
        NaN is never the best (it was kept, and every later comparison with it failed: the run ended
        with that epoch), and is said once."""
        if math.isnan(value):
            if not self._said_nan:
                self._said_nan = True
                warnings.warn(f"evaluate() returned NaN for '{self.session.recipe.training.metric}' at epoch {epoch}; "
                              "an epoch read as NaN is never kept as the best (check the evaluation data and function)",
                              RuntimeWarning, stacklevel=2)
            return False
        best = self.history.best_metric
        if best is None:
            return True
        return value >= best if self.session.recipe.training.metric_rises() else value <= best


def _warn_recovered(events: list, dist) -> None:
    """Non-finite steps the run recovered from: each was skipped, rolled the model back to the last
    snapshot and halved the learning rate for the rest of the run, which costs accuracy (a probe: 89.5%
    to 87.1% from one NaN step) and was only in history.json."""
    skipped = [e for e in events if e.get("event") == "nonfinite"]
    if not skipped or (dist is not None and not dist.is_main):
        return
    steps = ", ".join(str(e["step"]) for e in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    warnings.warn(f"the run skipped {len(skipped)} non-finite step(s) (step {steps}: {skipped[0]['what']}); each rolled "
                  f"back to the last good state and halved the learning rate, which ended at x{skipped[-1]['lr_scale']:g}. "
                  "Lower training.lr or set training.grad_clip and run again for the accuracy this cost",
                  RuntimeWarning, stacklevel=3)


def _warn_idle_coordination(config, counts: dict, dist) -> None:
    """A strategy that changed no update in the whole run (resumed parts included: the history holds
    them) trained as `none` would have; say why, since the recipe asked for it."""
    if config.strategy == "none" or counts["changed"] or (dist is not None and not dist.is_main):
        return
    import warnings

    why = (f"measured {counts['measured']} steps and the terms never conflicted past its threshold"
           if counts["measured"] else "had one objective to act on (task + distillation summed, accuracy_as_one)"
           " and no size or regularizer term")
    warnings.warn(f"coordination: {config.strategy} changed no update in this run: it {why}; it acts against a size "
                  "term (mode: joint under a size target) or a regularizer. Set strategy: none for the same "
                  "training without the measuring (the same to float rounding: the terms' gradients are summed in "
                  "another order, so the weights need not match bit for bit)", stacklevel=2)


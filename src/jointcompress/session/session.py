"""A compression session: the techniques of a recipe, driven from any training loop.

    session = jointcompress.prepare(model, recipe, total_steps=N, teacher=teacher)
    optimizer = torch.optim.AdamW(session.param_groups(lr=1e-4)); session.bind(optimizer)
    for batch in loader:
        outputs = model(**batch)                       # or model(x): any output type
        terms = session.loss(outputs, batch)           # task (+ distill, sparsity, ...) by name
        optimizer.zero_grad()
        session.backward(terms)                        # coordinated backward
        session.before_step(); optimizer.step(); session.after_step()
    spec = session.finalize()

What the session owns: the techniques and their plan (when each attaches, ramps, freezes),
the run context they read, the gradient coordinator, the teacher's logits (and their
cache), and the step. What it leaves to the loop: data, optimizer, LR schedule, evaluation,
checkpoints. The built-in loop (training/loop.py) is one client; the transformers Trainer
integration (integrations/hf_trainer.py) another.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn as nn

from ..coordination import PRIMARY, GradientCoordinator
from ..errors import DataError, RecipeError, TrainingError
from ..model_call import model_device, to_device
from ..plan import Plan
from ..techniques.base import RunContext
from ..techniques.pruning import PruningTechnique
from . import terms as _terms
from .outputs import (Batch, call_model, check_scalar_loss, decoder_token_mask, default_task_loss, is_encoder_decoder,
                      logits_of, padding_is_labelled, said_once_per_run, split_batch)
from .guards import (NonFiniteWatch, OptimizerOrderWatch, check_fits, check_terms_given, check_terms_have_grad,
                     check_terms_reach_model, refuse_ddp_forward, refuse_finalized, refuse_model_state_first,
                     session_identity, warn_model_state_first)
from .loss_scale import LossScale
from .schedule import apply_events, event_steps
from .sync import Sync
from .teacher import TEACHER_INPUT_ERRORS, TeacherCache, teacher_logits

LossFn = Callable[[Any, Any], torch.Tensor]


class CompressionSession:
    def __init__(self, model: nn.Module, techniques: list, plan: Plan, recipe, *, example_inputs=None,
                 teacher: nn.Module | None = None, loss_fn: LossFn | None = None, dist=None):
        self.model, self.plan, self.recipe = model, plan, recipe
        self.techniques = sorted(techniques, key=lambda t: t.order)
        self.teacher, self.loss_fn = teacher, loss_fn
        self.ctx = RunContext(model=model, example_inputs=example_inputs, teacher=teacher, total_steps=plan.total_steps)
        self.sync = Sync(dist)
        self.teacher_cache = TeacherCache()
        self.optimizer: torch.optim.Optimizer | None = None
        self.owns_optimizer = False  # the built-in loop: the session (re)builds the optimizer
        self.scheduler = None  # the caller's LR scheduler on a bound optimizer (bind)
        # the weights' decay when the recipe sets training.weight_decay itself, else None (the optimizer's own);
        # prepare() reads it from the recipe as given (the joint form's rebuilt recipe marks every field set)
        self.recipe_weight_decay = explicit_weight_decay(recipe)
        self.late_group_defaults: dict = {}  # settings of technique groups added to a bound optimizer
        self._bound_weights: dict[int, weakref.ref] = {}  # the model's parameters when the optimizer was bound
        self._bound_optimizer, self._bound_lr = None, None  # and its first group's rate then
        self.coordinator: GradientCoordinator | None = None
        self.param_names: dict[int, str] = {}
        self.step = 0
        self._begun: int | None = None  # the step whose schedule update has run
        self._before_at: int | None = None  # the step of the last before_step (after_step must follow it)
        self._warned_no_after = False
        self._warned_no_before = False
        self._backward_at: int | None = None  # the step of the last session.backward
        self._last_terms: tuple[int, list] | None = None  # the step and terms (weak) of the last session.backward
        self._loss_terms: tuple[int, list] | None = None  # the step and terms (weak) of the last session.loss
        self._warned_no_backward = False
        self._warned_padding = False  # labels counted where the attention_mask is 0 (said once)
        self._gradients_checked = False  # the first before_step checks they reached the session's model
        self._terms_checked = False  # the first backward checks the accuracy terms depend on it
        self._teacher_ran = False  # the teacher's first batch names inputs it cannot take
        self._warned_unbound = False
        self._warned_decay = False
        self._unbound_probe: list | None = None  # (parameter, its value before the step): see _probe_unbound
        self.nonfinite = NonFiniteWatch()  # the caller's own loop (the built-in loop rolls such steps back)
        self.step_order = OptimizerOrderWatch()  # a bound optimizer stepped after after_step, or loaded first
        self.loss_scale = LossScale()  # fp16 mixed precision: the scaler the step's backward was given
        self.spec = None  # what finalize() returned: the session is finished then
        self.on_restructure: list[Callable[[], None]] = []  # after attach/freeze events (rollback snapshots)
        self._ddp_guard = model.register_forward_pre_hook(refuse_ddp_forward)  # a wrapper added after prepare()
        self._load_guard = model.register_load_state_dict_post_hook(warn_model_state_first)
        self._load_refusal = model.register_load_state_dict_pre_hook(refuse_model_state_first)

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        """Attach the techniques due at step 0 and agree on the state over the ranks: rank 0's weights first,
        since a technique's setup reads them (mask scores from magnitudes, the size budget's bytes and its
        multiplier: a rank that began from its own weights kept its own multiplier)."""
        if self.teacher is not None:
            self.sync.model(self.teacher)
        self.sync.model(self.model)
        apply_events(self.techniques, self.plan, self.ctx, 0)
        for t in self.techniques:
            t.before_training(self.ctx, self.techniques)
        self.rebuild()
        self.sync.model(self.model)
        self.sync.techniques(self.techniques)

    # -- parameters and optimizer ----------------------------------------------------------
    def to(self, device) -> "CompressionSession":
        """Move what the session holds beside the model to `device`: the teacher and the techniques' own
        modules (mask scores, distillation projections), which are not the model's submodules. For a model
        moved after prepare(), as the transformers Trainer moves it in its constructor; parameters move in
        place, so an optimizer made before keeps them."""
        if device is None:
            return self
        if self.teacher is not None:
            self.teacher.to(device)
        for t in self.techniques:
            for value in vars(t).values():
                for module in _modules_in(value):
                    module.to(device)
        return self

    def param_groups(self, lr: float | None = None, weight_decay: float | None = None) -> list[dict]:
        """Optimizer groups: the model's weights ("weights"), then each technique's own
        (mask scores, LSQ step sizes, feature projections) with their own LR if they set one.
        The weights group carries a weight_decay only when one is asked for (here, or the recipe's
        training.weight_decay set explicitly): otherwise the optimizer's own applies, so that
        AdamW(session.param_groups(...), weight_decay=0.1) decays the weights as it says. Mask
        scores and LSQ step sizes always carry 0 (decay would pull them toward 0 / a step of 1)."""
        cfg = self.recipe.training
        lr = cfg.lr if lr is None else lr
        groups, owned = [], set()
        for t in self.techniques:
            if not t.attached:
                continue
            for g in t.parameters():
                params = [p for p in g["params"] if p.requires_grad and id(p) not in owned]
                owned.update(id(p) for p in params)
                if params:
                    groups.append({**g, "params": params, "lr": g.get("lr", lr)})
        weights = [p for p in self.model.parameters() if p.requires_grad and id(p) not in owned]
        wd = self.recipe_weight_decay if weight_decay is None else weight_decay
        groups.insert(0, {"params": weights, "lr": lr, "name": "weights", **({} if wd is None else {"weight_decay": wd})})
        return groups

    def bind(self, optimizer: torch.optim.Optimizer, scheduler=None) -> torch.optim.Optimizer:
        """Use the caller's optimizer: parameters of techniques it lacks (now, and whenever a
        technique attaches later) are added to it as new groups. `scheduler`: the caller's LR
        scheduler on it (bind again once it is made), which a group added later then follows
        (session/lr_schedulers.py); without it such a group breaks most torch schedulers."""
        self.optimizer, self.owns_optimizer = optimizer, False
        self.step_order.watch(optimizer, self)
        if scheduler is not None:
            self.scheduler = scheduler
        if optimizer is not self._bound_optimizer:  # its rate before any schedule cut it
            self._bound_optimizer, self._bound_lr = optimizer, float(optimizer.param_groups[0]["lr"])
        self._bound_weights = {id(p): weakref.ref(p) for p in self.model.parameters()}
        self._warn_decayed_technique_parameters()
        self._add_missing_groups()
        return optimizer

    def _warn_decayed_technique_parameters(self) -> None:
        """Technique parameters the caller's optimizer holds in a group with weight decay: an optimizer made from
        model.parameters() holds LSQ's step sizes (parametrizations live in the model), and decay pulls their logs
        toward a step of 1 (and mask scores toward 0) at the weights' LR, with no word."""
        if self._warned_decay:
            return
        decayed = {id(p) for g in self.optimizer.param_groups if g.get("weight_decay", 0.0) > 0 for p in g["params"]}
        held = [p for g in self.param_groups()[1:] if g.get("weight_decay") == 0.0 for p in g["params"] if id(p) in decayed]
        if held:
            self._warned_decay = True
            warnings.warn(f"the optimizer decays {self._named(held)} as weights: weight decay pulls LSQ's log step "
                          "sizes toward a step of 1 and mask scores toward 0. Make the optimizer from "
                          "session.param_groups(lr=..., weight_decay=...): they get their own groups, with no decay",
                          UserWarning, stacklevel=3)

    def _named(self, params: list) -> str:
        """'N technique parameter(s) (the first three names, ...)', as warnings about them name them."""
        names = sorted({self.param_names.get(id(p), "a technique parameter") for p in params})
        return f"{len(params)} technique parameter(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"

    def _add_missing_groups(self) -> None:
        """The technique parameters the bound optimizer lacks, as new groups; of the model's weights only those
        made after bind (a layer rebuilt narrower): one the caller's optimizer left out on purpose (a frozen
        backbone, or weights given to a second optimizer) stays out. Adding every weight it lacked trained a
        backbone the loop froze, or stepped each weight by two optimizers, with no word."""
        from .lr_schedulers import base_lr, follow_schedule, has_scheduler

        have = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        for g in self.param_groups(lr=base_lr(self.optimizer, self.scheduler, self._bound_lr)):
            params = [p for p in g["params"] if id(p) not in have
                      and not (g.get("name") == "weights" and self._bound_before(p))]
            if not params:
                continue
            group = {**self.late_group_defaults, **g, "params": params}
            self.optimizer.add_param_group(group)
            have.update(id(p) for p in params)
            if self.scheduler is None and has_scheduler(self.optimizer):
                warnings.warn(f"{g.get('name', 'a technique')}'s parameters joined the optimizer as a new group at step "
                              f"{self.step}; the LR scheduler made on it does not know the group (LambdaLR, OneCycleLR "
                              "and others fail at their next step(), zip() or a length mismatch): pass it to "
                              "session.bind(optimizer, scheduler) so the group follows its schedule", stacklevel=3)
            follow_schedule(self.optimizer, self.optimizer.param_groups[-1], self.scheduler, self._bound_lr)

    def _bound_before(self, p: torch.Tensor) -> bool:
        """Whether `p` was one of the model's parameters when the optimizer was bound (by identity: a weak
        reference, so a freed parameter's id reused by a new one does not count)."""
        ref = self._bound_weights.get(id(p))
        return ref is not None and ref() is p

    def _own_optimizer(self, groups: list[dict]) -> None:
        cfg = self.recipe.training
        for g in groups:
            g["base_lr"] = g["lr"]
        groups[0].setdefault("weight_decay", cfg.weight_decay)  # the built-in loop: the recipe's, default 0
        old = self.optimizer
        if cfg.optimizer == "sgd":
            self.optimizer = fused_or_foreach(torch.optim.SGD, groups, lr=cfg.lr, momentum=0.9)
        else:
            cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            self.optimizer = fused_or_foreach(cls, groups, lr=cfg.lr)
        if old is not None:  # keep the moments of parameters that stay
            for p, s in old.state.items():
                if any(p is q for g in groups for q in g["params"]):
                    self.optimizer.state[p] = s

    def rebuild(self) -> None:
        """After techniques attach or freeze: a new coordinator over the current parameter
        groups, and the optimizer rebuilt (owned) or extended (bound)."""
        groups = self.param_groups()
        if self.owns_optimizer:
            self._own_optimizer(groups)
        elif self.optimizer is not None:
            self._add_missing_groups()
        self.coordinator = GradientCoordinator(
            self.recipe.coordination, {g["name"]: g["params"] for g in groups}, seed=self.recipe.training.seed,
            mean_over_ranks=self.sync.mean_groups if self.sync.dist is not None else None,
            said_changed=self.coordinator is not None and self.coordinator.said_changed,
        )
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}
        for t in self.techniques:
            for attr, val in vars(t).items():
                if isinstance(val, nn.Module):
                    for n, p in val.named_parameters():
                        self.param_names.setdefault(id(p), f"{t.kind}.{attr}.{n}")

    # -- the step ----------------------------------------------------------------------------
    def advance_schedule(self) -> bool:
        """Carry out the attach / freeze events due at this step; True if any happened."""
        attached = {id(t) for t in self.techniques if t.attached}
        if self.step == 0 or not apply_events(self.techniques, self.plan, self.ctx, self.step):
            return False
        self._warn_unbound([t for t in self.techniques if t.attached and id(t) not in attached])
        self.rebuild()
        self.sync.model(self.model)
        self.sync.techniques(self.techniques)
        for t in self.techniques:  # rank 0's model is everywhere now
            t.moved_weights = False
        for fn in self.on_restructure:
            fn()
        return True

    def _warn_unbound(self, attached_now: list) -> None:
        """A technique attaching mid-run brings parameters (LSQ step sizes) that only a bound optimizer
        receives: without session.bind(optimizer) they never trained, silently. Said once."""
        if self.optimizer is not None or self.owns_optimizer or self._warned_unbound:
            return
        names = [f"{g.get('name', 'parameters')} ({t.kind})" for t in attached_now for g in t.parameters() if g["params"]]
        if names:
            self._warned_unbound = True
            warnings.warn(f"{', '.join(names)} attached at step {self.step}, and no optimizer is bound to the session, so "
                          "these parameters join none and do not train: call session.bind(optimizer) once the optimizer "
                          "is made from session.param_groups()", UserWarning, stacklevel=4)

    def _probe_unbound(self) -> None:
        """With no optimizer bound, the techniques' parameters that have a gradient at the first step that
        gives them one, and their values, to see after the step whether the user's optimizer holds them: one
        made from model.parameters() does not, and mask scores and step sizes then never trained, silently."""
        if self.optimizer is not None or self.owns_optimizer or self._unbound_probe is not None:
            return
        graded = [p for t in self.techniques if t.attached for g in t.parameters() for p in g["params"]
                  if p.grad is not None and bool(p.grad.ne(0).any())]
        if not graded:  # nothing to watch yet: the model's weights are not searched either
            return
        own = {id(p) for p in graded}
        weight = next((p for p in self.model.parameters() if id(p) not in own and p.grad is not None
                       and bool(p.grad.ne(0).any())), None)
        if weight is not None:  # the weight tells a step the optimizer took from one it skipped
            self._unbound_probe = [(weight, weight.detach().clone())] + [(p, p.detach().clone()) for p in graded]

    def _check_unbound(self) -> None:
        probe, self._unbound_probe = self._unbound_probe, (None if self._unbound_probe is None else [])
        if probe and torch.equal(probe[0][0].detach(), probe[0][1]):  # no step taken (an fp16 overflow): ask again
            self._unbound_probe = None
            return
        still = [p for p, before in (probe or [])[1:] if torch.equal(p.detach(), before)]
        if still and not self._warned_unbound:
            self._warned_unbound = True
            warnings.warn(f"the optimizer step left {self._named(still)} with a gradient unchanged: the optimizer does "
                          "not hold them (one made from model.parameters() lacks the mask scores), so they do not train. "
                          "Make it from session.param_groups(lr=...) and call session.bind(optimizer)", UserWarning,
                          stacklevel=3)

    def update_techniques(self) -> None:
        """Every technique updates its schedule (sparsity, temperature) for this step; masks
        decided on rank 0 are then the masks everywhere."""
        self.ctx.step = self.step
        for t in self.techniques:
            if t.attached:
                t.on_step(self.ctx)
        self.sync.techniques(self.techniques)
        self._sync_moved_weights()
        self._begun = self.step

    def _sync_moved_weights(self) -> None:
        """A technique moved weights by a decision each rank takes from its own numbers (the size budget's
        landing orders its cuts, and a learned width re-fits its step, by a Fisher estimate from that rank's
        gradients): rank 0's model on every rank, so the ranks do not train different models until the
        next event syncs them."""
        moved = [t for t in self.techniques if t.moved_weights]
        for t in moved:
            t.moved_weights = False
        if self.sync.dist is None:  # one process: nothing to agree on
            return
        device = next(self.model.parameters()).device
        if self.sync.any(bool(moved), device):  # the same answer on every rank, so the broadcast matches
            self.sync.model(self.model)

    def begin_step(self) -> None:
        """Make the techniques ready for this step's forward pass (idempotent per step)."""
        if self._begun != self.step:
            self.advance_schedule()
            self.update_techniques()

    def loss(self, outputs, batch=None, task_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The step's named loss terms from the model's outputs (any type) and the batch
        (tuple or dict): "task" (task_loss if given, else the session's loss_fn(outputs,
        batch), else the model's own loss or cross-entropy), weighted down by distillation,
        plus each technique's terms ("distill", "sparsity", "quant", ...)."""
        self.begin_step()
        batch = to_device(batch, model_device(self.model))  # a GPU model's labels and sample index beside its logits
        b = split_batch(batch) if batch is not None else Batch(None)
        if not self._warned_padding and not is_encoder_decoder(self.model) and padding_is_labelled(b):
            # (an encoder-decoder's attention_mask is the encoder's: its labels are the decoder's positions)
            self._warned_padding = True
            warnings.warn("the batch's labels are not -100 where its attention_mask is 0: the model's own loss counts "
                          "the padding positions (it learns that padding follows padding), while distillation "
                          "averages over the attention mask only; set labels to -100 there (labels = "
                          "input_ids.masked_fill(attention_mask == 0, -100), as transformers' "
                          "DataCollatorForLanguageModeling does)", UserWarning, stacklevel=2)
        ctx = self.ctx
        ctx.batch_inputs, ctx.batch_targets = b.inputs, b.targets
        ctx.outputs = self._logits(outputs, task_loss)
        token_mask = decoder_token_mask(b) if is_encoder_decoder(self.model) else b.token_mask
        ctx.batch_extra = {"teacher_logits": self._teacher_logits(b), "teacher_fresh": True, "token_mask": token_mask}
        if (task_loss is not None or self.loss_fn is not None) and not self._task_weighted():
            said_once_per_run("distill_kd.alpha is 1: the task loss's weight is 1 - alpha = 0, so the task loss you give "
                              "(session.loss(task_loss=...) or prepare(loss_fn=...)) is not trained on; lower "
                              "distill_kd.alpha to train on it")
        if task_loss is not None:
            check_scalar_loss(task_loss, "session.loss(task_loss=...) got")
        elif self._task_weighted():
            task_loss = self.loss_fn(outputs, batch) if self.loss_fn is not None else default_task_loss(outputs, b)
            if self.loss_fn is not None:
                check_scalar_loss(task_loss)
        terms = _terms.technique_terms(self.techniques, ctx, task_loss)
        self._loss_terms = (self.step, [weakref.ref(t) for t in terms.values()])
        return terms

    def forward_terms(self, batch) -> dict[str, torch.Tensor]:
        """Forward the model on the batch's inputs and return the step's loss terms."""
        batch = to_device(batch, model_device(self.model))
        outputs = call_model(self.model, split_batch(batch).inputs)
        return self.loss(outputs, batch)

    def forward_inputs(self, batch):
        """The model's outputs on the batch's inputs (no loss terms): the forward of a pass that only
        reads the model, such as recalibrate_norms'."""
        return call_model(self.model, split_batch(to_device(batch, model_device(self.model))).inputs)

    def recalibrate_norms(self, batches, max_batches: int | None = None) -> int:
        """Re-estimate BatchNorm's running statistics over the first `max_batches` (default:
        training.recalibrate_norms) of `batches`, for a caller's loop to run before it evaluates
        (session/norm_statistics.py; the built-in loop does it before every evaluation). Returns the
        number of batches used. Leaves the RNG states to the caller (the built-in loop puts back the
        ones its loader draws from). Under torchrun every rank calls it, and rank 0's statistics are then every
        rank's: each rank had re-estimated them on its own shard, and the ranks evaluated and finalized
        different models."""
        from .norm_statistics import recalibrate_norms, tracked_norms

        count = self.recipe.training.recalibrate_norms if max_batches is None else max_batches
        used = recalibrate_norms(self.model, iter(batches), self.forward_inputs, count)
        self.sync.norm_statistics(tracked_norms(self.model))
        return used

    def _task_weighted(self) -> bool:
        return all(t.task_weight() > 0 for t in self.techniques if t.attached)

    def _teacher_logits(self, b: Batch) -> torch.Tensor | None:
        distill = next((t for t in self.techniques if t.kind == "distill_kd" and t.attached), None)
        if distill is None or self.teacher is None or b.inputs is None:
            return None
        use_cache = distill.config.cache_teacher and not distill.config.features
        try:
            logits = teacher_logits(self.teacher, b, self.teacher_cache, use_cache)
        except TEACHER_INPUT_ERRORS as err:
            if self._teacher_ran:
                raise
            from ..api import teacher_cannot_run  # the first batch: named (prepare() without example_inputs has not)

            raise teacher_cannot_run(b.inputs, err) from None
        self._teacher_ran = True
        return logits

    def backward(self, terms: dict[str, torch.Tensor], scaler=None):
        """The coordinated backward: each term's gradient resolved into `.grad` of every
        shared parameter (then averaged over the ranks). Returns the coordination stats of
        measured steps (None between them). `scaler`: the torch.amp.GradScaler of fp16 mixed
        precision; the terms are scaled by it here, in place of `scaler.scale(loss).backward()`,
        and before_step unscales the gradients before the techniques work on them (loss_scale.py)."""
        if self.coordinator is None:
            raise RecipeError("session.backward before the session started; create it with jointcompress.prepare(...)")
        if self.spec is not None:
            refuse_finalized("backward", self.step)
        check_terms_given(terms)
        check_terms_have_grad(terms, self.model)
        self._refuse_stale_terms(terms)
        self._refuse_terms_again(terms)
        if not self._terms_checked:  # once: a walk over the first step's graph
            self._terms_checked = True
            check_terms_reach_model(terms, PRIMARY, self.model)
        if not self.owns_optimizer:
            self.nonfinite.note(terms)
        terms = self.loss_scale.scaled(terms, scaler, self.step)
        self._backward_at = self.step
        stats = self.coordinator.backward(terms, self.step)
        self.sync.grads(self.coordinator.params)
        self.coordinator.note_gradients(self.step)
        return stats

    def _refuse_stale_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Terms session.loss made at an earlier step (after_step called between the loss and its backward): after_step
        moves the masks and quantizers in place, so their graph no longer matches the weights, and torch's backward
        failed nine frames deep on a tensor "modified by an inplace operation". Refused with the order named."""
        if self._loss_terms is not None and self._loss_terms[0] != self.step and _any_held(self._loss_terms[1], terms):
            raise TrainingError(
                f"session.backward at step {self.step}: these terms were made by session.loss at step "
                f"{self._loss_terms[0]}, and session.after_step() has moved the session since (it changes the masks "
                "and quantizers in place, so the terms' graph no longer matches the weights). The order is: loss, "
                "backward, before_step, optimizer.step(), after_step")

    def _refuse_terms_again(self, terms: dict[str, torch.Tensor]) -> None:
        """The same terms given to backward twice in a step (a copied line in a loop): on a measured step the
        coordination keeps their graph, so the second call added every gradient again, unsaid (torch refuses a
        second backward only where the graph was freed). Held by weak reference: the graph is not kept alive."""
        if self._last_terms is not None and self._last_terms[0] == self.step and _any_held(self._last_terms[1], terms):
            raise TrainingError(
                f"session.backward at step {self.step}: these terms went through backward already; their "
                "gradients would be added twice. Call session.backward once per session.loss (under "
                "gradient accumulation each micro-batch's own terms)")
        self._last_terms = (self.step, [weakref.ref(t) for t in terms.values()])

    def settle_gradients(self) -> None:
        """The measured step's micro-batches, and under torchrun the ranks' batches, resolved together,
        as one batch of all their samples is (coordination.py, `settle`). before_step calls it; a loop
        that changes the gradients between its last backward and before_step (clipping, as the Hugging
        Face Trainer does) calls it first. Once a step; in one process without accumulation it changes
        nothing."""
        if self.coordinator is not None:
            self.coordinator.settle(self.step, self.loss_scale.grad_unit(self.optimizer, self.step))

    def before_step(self) -> None:
        """Right before optimizer.step(): techniques act on the gradients."""
        if self.spec is not None:
            refuse_finalized("before_step", self.step)
        self.settle_gradients()
        if self._before_at == self.step and not self._warned_no_after:
            # a loop that never calls after_step trains at step 0's schedule: masks never ramp,
            # quantizers never start, and finalize then bakes an uncompressed model, silently
            self._warned_no_after = True
            warnings.warn(f"session.before_step() ran twice at step {self.step} with no session.after_step() between: "
                          "after_step advances the schedule (pruning ramps, the quantizers' start, freezes); call it "
                          "right after optimizer.step()", RuntimeWarning, stacklevel=2)
        self._before_at = self.step
        self._check_loop_gradients()
        self._probe_unbound()
        self.ctx.loss_scale = self.loss_scale.unscale(self.optimizer, self.step)  # after settling: PCGrad is scale-free
        for t in self.techniques:
            if t.attached:
                t.before_optimizer_step(self.ctx)
        if self.sync.dist is not None:  # gradients a technique added from its own rank's numbers: rank 0's
            local = [p.grad for t in self.techniques if t.attached for p in t.rank_local_grads()]
            self.sync.dist.broadcast_tensors([g for g in local if g is not None])
        self._sync_moved_weights()  # a learned width's step re-fit by this rank's Fisher estimate

    def _check_loop_gradients(self) -> None:
        """The step's gradients came through session.backward into the model prepare() was given. A plain
        loss.backward() skips the coordination (pcgrad acts on nothing) and, under torchrun, the ranks' averaging
        (each rank trains its own weights); a loss of another model (a Trainer or loop given a copy of it) trained
        that one, and finalize then baked this one, untrained and uncompressed, with no word."""
        if not self._gradients_checked:  # first: with no gradient at all, the warning below would mislead
            self._gradients_checked = True
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            if trainable and all(p.grad is None for p in trainable):
                raise TrainingError(
                    f"session.before_step() at step {self.step}: no weight of the model prepare() was given has a "
                    "gradient. The loss was computed with another model (train the very model passed to prepare(), "
                    "session.model: not a copy, and give it to the Trainer), or before_step ran before "
                    "session.backward(terms)")
        # a backward one step back with after_step between (said at after_step): the order's, not a plain backward
        out_of_order = self._warned_no_before and self._backward_at == self.step - 1
        if self._backward_at != self.step and not self._warned_no_backward and not out_of_order:
            self._warned_no_backward = True
            warnings.warn(f"session.before_step() at step {self.step} with no session.backward(terms) at this step: "
                          f"a plain loss.backward() skips the coordination ('{self.recipe.coordination.strategy}') and, "
                          "under torchrun, the averaging of the ranks' gradients; call session.backward(terms) with "
                          "the terms session.loss returned", RuntimeWarning, stacklevel=3)

    def after_step(self, prepare_next: bool = True) -> None:
        """Right after optimizer.step(): techniques act on the new weights; the step
        advances and (prepare_next) the next step's schedule update runs."""
        if self.spec is not None:
            refuse_finalized("after_step", self.step)
        if self._before_at != self.step and not self._warned_no_before:
            # the techniques' work on the gradients (the size budget's and the masks' own gradients,
            # the Fisher estimate's fold, ...) never ran: the step trained the weights alone
            self._warned_no_before = True
            warnings.warn(f"session.after_step() at step {self.step} with no session.before_step() since the last "
                          "after_step: before_step lets the techniques act on the gradients; call it right before "
                          "optimizer.step()", RuntimeWarning, stacklevel=2)
        self._check_unbound()
        for t in self.techniques:
            if t.attached:
                t.after_optimizer_step(self.ctx)
        self.step += 1
        self.nonfinite.read(self.step, self.model)
        if prepare_next and self.step < self.plan.total_steps:
            self.begin_step()
        if self.step == self.plan.total_steps + 1:
            warnings.warn(f"session: step {self.step} of a session prepared with total_steps={self.plan.total_steps}: "
                          "the schedule ended at its last step, and the steps after it train the weights with the "
                          "schedule's last settings (a size target is no longer steered, so the file can drift "
                          "over it); prepare the session with the loop's real number of optimizer steps",
                          RuntimeWarning, stacklevel=2)

    def on_epoch_end(self, epoch: int) -> None:
        self.ctx.epoch = epoch
        for t in self.techniques:
            if t.attached:
                t.on_epoch_end(self.ctx)

    # -- state ---------------------------------------------------------------------------------
    def technique_states(self) -> list[dict]:
        return [t.state_dict() for t in self.techniques]

    def load_technique_states(self, states: list[dict]) -> None:
        for t, s in zip(self.techniques, states):
            if s:
                t.load_state_dict(s)

    def restore_structure(self, step: int, begun: bool = False) -> None:
        """Rebuild what the run had built by `step` (parametrizations, frozen techniques)
        so that saved model and technique state can be loaded into it."""
        for e in event_steps(self.plan, step + 1 if begun else step):
            apply_events(self.techniques, self.plan, self.ctx, e)
        self.rebuild()
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint of the user's loop needs besides the model and optimizer: the
        step, whether its schedule update ran, technique states (masks, scores, targets) and
        scalars, the coordinator's factors, the teacher cache."""
        from ..checkpoint import python_rng_state

        if self.spec is not None:
            refuse_finalized("state_dict", self.step)
        return {
            "identity": session_identity(self),
            "step": self.step,
            "begun": self._begun == self.step,
            "techniques": self.technique_states(),
            "scalars": _terms.technique_scalars(self.techniques),
            "coordinator": {"factors": dict(self.coordinator.factors), "rng": python_rng_state(self.coordinator.rng)},
            "teacher_cache": self.teacher_cache.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a session saved by state_dict() into a freshly prepared one. Call it before
        model.load_state_dict (the model's parametrizations are rebuilt here) and before
        optimizer.load_state_dict (technique groups are added to a bound optimizer here). A state
        saved by a session of another recipe or total_steps is refused by name (guards.check_fits)."""
        from ..checkpoint import set_python_rng_state

        if self.spec is not None:
            refuse_finalized("load_state_dict", self.step)
        check_fits(self, state)
        self.restore_structure(int(state["step"]), bool(state.get("begun")))
        self.load_technique_states(state["techniques"])
        _terms.set_technique_scalars(self.techniques, state["scalars"])
        self.coordinator.factors = dict(state["coordinator"]["factors"])
        set_python_rng_state(state["coordinator"]["rng"], self.coordinator.rng)
        self.teacher_cache = TeacherCache.from_state(state.get("teacher_cache"))
        self._begun = self.step if state.get("begun") else None
        # what the techniques read as the step: the rebuild left it at the last event's, and a
        # step whose schedule update ran before the save does not run it again
        self.ctx.step = self.step

    # -- the end -------------------------------------------------------------------------------
    def finish_schedule(self) -> None:
        """Freeze events due exactly at the end of the run."""
        if self.step >= self.plan.total_steps:
            apply_events(self.techniques, self.plan, self.ctx, self.plan.total_steps)

    def finish(self) -> None:
        """The end of the run: last freeze events; distillation hooks off (teacher mode restored)."""
        self.finish_schedule()
        self.release_hooks()

    def release_hooks(self) -> None:
        """Distillation's capture hooks off the model and the teacher, the teacher's mode restored: at the
        end, and when a run stops on an error (a notebook keeps the models)."""
        for t in self.techniques:
            if hasattr(t, "remove_hooks"):
                t.remove_hooks()
        self._ddp_guard.remove()
        self._load_guard.remove()
        self._load_refusal.remove()
        self.step_order.remove()

    def finalize(self, example_inputs=None):
        """Make the compression permanent (masks applied and removed, LSQ values baked, pruned
        units removed) and return the CompressionSpec. For Hugging Face head / FFN / layer
        pruning the HF model is shrunk in place (`session.model` then holds it).

        A second call returns the first call's spec: the model is finalized already (a second pass
        found no masks or quantizers and returned an empty spec, which saved the model as dense
        fp32), and after finalize the session's training verbs refuse to run, so the spec still
        describes the model (a notebook cell re-run, finalize in a callback and at the end)."""
        from .finalize import finalize_session

        if self.spec is not None:
            return self.spec
        self.finish()
        self._warn_unfinished()
        self.nonfinite.read(self.step, self.model, force=True)
        self.spec = finalize_session(self, example_inputs)
        return self.spec

    def _logits(self, outputs, task_loss):
        """The logits in the model's outputs; None for outputs without them (a dict of other names) where the
        task term is the user's own (loss_fn or task_loss) and no technique reads logits (distill_kd does)."""
        if outputs is None:
            return None
        try:
            return logits_of(outputs)
        except DataError:
            own_task = task_loss is not None or self.loss_fn is not None
            if own_task and not any(t.kind == "distill_kd" for t in self.techniques):
                return None
            raise

    def _warn_unfinished(self) -> None:
        """Finalizing before the schedule's end keeps what the techniques have reached so far: one
        that never attached (quant_lsq with `start: 0.5` at step 3 of 10) stores fp32 weights. Said,
        so that a loop whose total_steps overshot what it ran is noticed."""
        if self.step >= self.plan.total_steps:
            return
        short = [f"{t.kind} (not attached yet)" for t in self.techniques if not t.attached]
        short += [f"{t.kind} (not at its target)" for t in self.techniques if t.attached and not t.at_target()]
        short += [f"{t.kind} (its ramp ends at step {t.window[1]})" for t in self.techniques  # near its target already
                  if t.attached and t.at_target() and isinstance(t, PruningTechnique) and t.window[1] > self.step]
        if short:
            warnings.warn(f"finalize at step {self.step} of the {self.plan.total_steps} prepare() planned: "
                          f"{', '.join(short)}; the model keeps what they reached. Train to the planned step, or "
                          "prepare with the total_steps the loop runs", stacklevel=3)

    def final_from(self) -> int:
        """The first step at which every technique has ended its ramp: a state evaluated before it is not the
        compressed model (the built-in loop's and the Trainer's best state are chosen from those at or after it)."""
        return max([t.window[1] for t in self.techniques] + [0])

    def metrics(self) -> dict[str, float]:
        out = {}
        for t in self.techniques:
            if t.attached:
                out.update({f"{t.kind}.{k}": v for k, v in t.metrics().items()})
        return out


def explicit_weight_decay(recipe) -> float | None:
    """training.weight_decay if the recipe sets it, None when it is the default (left to the optimizer)."""
    return recipe.training.weight_decay if "weight_decay" in recipe.training.model_fields_set else None


def fused_or_foreach(cls, groups: list[dict], **options) -> torch.optim.Optimizer:
    """The optimizer with its fused kernel where every parameter's device and dtype have one, else
    its multi-tensor one. Why: the fused kernel updates each tensor in one pass, the multi-tensor
    one in about eight (one per operation of the update), which on a CPU made the optimizer a
    large share of a small model's step (benchmarks/step_cost.py). The same update to float rounding."""
    try:
        return cls(groups, fused=True, **options)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return cls(groups, foreach=True, **options)


def _modules_in(value):
    """The nn.Modules a technique's attribute holds: itself, or those in a dict, list or tuple of them."""
    if isinstance(value, nn.Module):
        yield value
    elif isinstance(value, dict):
        yield from (v for v in value.values() if isinstance(v, nn.Module))
    elif isinstance(value, (list, tuple)):
        yield from (v for v in value if isinstance(v, nn.Module))


def _any_held(refs: list, terms: dict[str, torch.Tensor]) -> bool:
    """Whether one of `terms` is a tensor the weak references `refs` still point at (the same object, not an equal
    one): a session's record of the terms it made or took, without keeping their graph alive."""
    held = [ref() for ref in refs]
    return any(any(t is h for h in held) for t in terms.values())

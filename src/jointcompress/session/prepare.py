"""`prepare`: a compression session for the caller's own training loop."""
from __future__ import annotations

import torch.nn as nn

from .. import techniques as tech
from ..errors import RecipeError
from ..plan import make_plan
from ..recipe import Recipe, parse_recipe, warn_compresses_nothing, warn_no_steps_after, warn_unread_quant_start
from .checks import check_model_tensors, check_teacher, refuse_scripted, unsized_lazy
from .session import CompressionSession, LossFn, explicit_weight_decay


def total_steps_of(recipe: Recipe, total_steps: int | None, steps_per_epoch: int | None) -> int:
    if total_steps is None and steps_per_epoch is not None:
        total_steps = recipe.training.epochs * steps_per_epoch
    if total_steps is None or total_steps < 1 or total_steps != int(total_steps):
        raise RecipeError(
            f"prepare: total_steps={total_steps}; give total_steps=N (the optimizer steps your loop will run) or "
            "steps_per_epoch=len(loader) (times training.epochs): pruning ramps and LSQ start are placed on it"
        )
    return int(total_steps)


def check_needs(recipe: Recipe, teacher, example_inputs) -> None:
    """Fail before training on what a technique of the recipe will need."""
    if recipe.target is not None and recipe.target.is_latency:  # the size target's way out does not apply
        raise RecipeError(
            "target: a latency target is allocated from timed per-layer latency tables by the built-in loop "
            "(compress()); in your own loop set prune_structured.sparsity yourself (with layer_sparsity for the "
            "layers that differ) "
            "(`jointcompress dry-run` lists the channel groups), or run compress()")
    if recipe.target is not None and not _budgeted_in_session(recipe):
        raise RecipeError(
            f"target: a size target with mode: {recipe.mode} is allocated and steered by the built-in loop (compress()); "
            "in your own loop use mode: joint with the size target (the joint form: one size budget inside the "
            "session, docs/joint.md), or set the techniques' sparsity and bits yourself")
    kd = recipe.technique("distill_kd")
    if kd is not None and teacher is None:
        raise RecipeError("techniques: distill_kd needs a teacher; pass teacher=... to prepare() or remove distill_kd")
    needs_example = any(recipe.technique(k) is not None for k in ("prune_structured", "prune_blocks", "raise_stride")) or \
        (kd is not None and kd.features)
    if needs_example and example_inputs is None:
        raise RecipeError("prepare: prune_structured, prune_blocks and raise_stride (tracing the model) and distill_kd.features (sizing projections) "
                          "need example_inputs=... (a batch of inputs, e.g. the first two rows)")


def _budgeted_in_session(recipe: Recipe) -> bool:
    """Whether the session itself holds the recipe's size target: a size_kb / ratio target with a
    size_budget (the joint form), which needs no allocation before training and no steering after it."""
    return not recipe.target.is_latency and recipe.technique("size_budget") is not None


def prepare(model: nn.Module, recipe: Recipe | dict, *, total_steps: int | None = None,
            steps_per_epoch: int | None = None, teacher: nn.Module | None = None, example_inputs=None,
            loss_fn: LossFn | None = None, distributed="auto") -> CompressionSession:
    """A session compressing `model` in place with `recipe`, driven by the caller's loop.

    total_steps (or steps_per_epoch x training.epochs) places the techniques' windows;
    loss_fn(outputs, batch) is the task loss (default: the model's own loss, else
    cross-entropy). The techniques due at step 0 are attached on return, so create the
    optimizer afterwards from `session.param_groups()` (or bind your own with `session.bind`).
    distributed: "auto" (default: join torchrun's group, or one you initialized; one process
    otherwise), False or a DistContext. Under torchrun the session averages the gradients after
    its coordinated backward and broadcasts rank 0's decisions: do not wrap the model in
    DistributedDataParallel (its reducer does not see the per-term backward; docs/reliability.md).
    A recipe with `mode: joint` and a size target (size_kb / ratio) trains its joint form, as
    compress() does (joint_form.py): `session.recipe` holds the recipe that runs.
    """
    from .. import distributed as _dist
    from ..api import (check_data, check_targets, check_teacher_data, same_recipe_on_every_rank,
                       same_teacher_on_every_rank, warn_teacher_unused, warn_validation_unread)
    from ..model_call import model_device
    from ..joint_form import as_joint_form
    from ..targets import resolve_target, warn_unused_sparsity
    from .outputs import new_run

    new_run()  # the warnings said once a run are said again, once
    given = parse_recipe(recipe)
    warn_validation_unread(given, reader="prepare()")
    warn_unread_quant_start(given)
    warn_no_steps_after(given)
    warn_compresses_nothing(given)
    warn_unused_sparsity(given)  # what a size or latency target replaces, as compress() and the CLI say it
    recipe, _ = as_joint_form(given)  # mode: joint under a size target, as compress() trains it
    check_needs(recipe, teacher, example_inputs)
    refuse_ddp(model)
    model = _dist.unwrap(model)
    refuse_scripted(model)
    bare_teacher = _dist.unwrap(teacher) if teacher is not None else None
    check_teacher(model, bare_teacher)
    check_model_tensors(model)
    check_targets(model, given)  # first as the user wrote it: errors name their techniques[i] (compress() does too)
    check_targets(model, recipe, hint=False)  # the joint form's: the model's hint was said just above
    # the model runs on the example first: inputs it cannot take are named here, not inside a trace or a target
    outputs = check_data(model, example_inputs, None, what="example_inputs") if example_inputs is not None else None
    refuse_unsized(model)  # a lazy layer is sized by that first call, or not at all
    if recipe.target is not None:  # the size budget's bytes, from the target and the model
        recipe = resolve_target(model, recipe, example_inputs)
    kd = recipe.technique("distill_kd")
    if kd is not None and bare_teacher is not None and outputs is not None:
        check_teacher_data(bare_teacher, example_inputs, outputs, kd.alpha)
    warn_teacher_unused(model, bare_teacher, recipe)
    dist = _dist.resolve(distributed)
    same_recipe_on_every_rank(given, dist, model_device(model), total_steps_of(given, total_steps, steps_per_epoch))
    same_teacher_on_every_rank(bare_teacher, dist, model_device(model))
    techniques = [tech.build(c) for c in recipe.techniques]
    plan = make_plan(techniques, total_steps_of(recipe, total_steps, steps_per_epoch), recipe)
    session = CompressionSession(model, techniques, plan, recipe, example_inputs=example_inputs, teacher=teacher,
                                 loss_fn=loss_fn, dist=dist)
    session.recipe_weight_decay = explicit_weight_decay(given)  # as given: the joint form sets every field
    session.start()
    session.begin_step()
    return session


def refuse_ddp(model) -> None:
    """Your own loop calls the model it passed: a DistributedDataParallel wrapper's reducer then waits for
    gradients the session's per-term backward never hands it, and torch's error ("Expected to have finished
    reduction ...") points at find_unused_parameters, which is not the fix. compress() calls the model itself
    and unwraps it; prepare() names it."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise RecipeError("prepare: the model is wrapped in DistributedDataParallel; pass the model itself (model.module) "
                          "and call that in your loop: under torchrun the session averages the gradients after its "
                          "coordinated backward (docs/reliability.md)")


def refuse_unsized(model) -> None:
    """Lazy layers not sized yet (no example_inputs, no forward before prepare): attaching the masks failed in
    torch's "Attempted to use an uninitialized parameter"."""
    unsized = unsized_lazy(model)
    if unsized:
        raise RecipeError(f"prepare: '{unsized[0]}' belongs to a lazy layer that is not sized yet (it takes its shape "
                          "on the model's first call); pass example_inputs=... (a batch of inputs), or call the model "
                          "once on a batch before prepare()")

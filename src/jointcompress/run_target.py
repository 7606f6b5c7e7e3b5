"""A recipe's target resolved once per run (compress()): on rank 0, sent to the other ranks, and
on resume taken from the checkpoint instead of resolved again.

Why: a latency target is allocated from timings (latency_targets.allocate_latency), which move
with the machine's load: allocated again, the same target gave LeNet-5 8, 40 and 50 conv2
channels in three calls on a loaded machine. So every rank timing its own allocation under torchrun
would train other widths than rank 0, and a resumed run would allocate widths its checkpoint does
not fit (refused as "a different recipe"). A size allocation is measured in bytes and repeats,
but resuming it would run its sensitivity scan again.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .errors import JointCompressError
from .recipe import MEMORY_FIELDS, Recipe, parse_recipe, with_added_fields, without_memory_fields


def resolve_for_run(model: nn.Module, recipe: Recipe, example, run_dir: str | Path | None = None,
                    resume: bool = False, dist=None, sensitivity: dict | None = None) -> Recipe:
    """`recipe` with its target resolved (targets.resolve_target): the checkpoint's resolution when
    resuming the same recipe, else resolved here; under torchrun on rank 0 only, then broadcast.
    An error on rank 0 (an unreachable target) is raised on every rank. `sensitivity`: the scan
    target.allocator: sensitivity allocates from (api._allocation_scan)."""
    from .targets import TargetError, resolve_target

    resolved, error = None, None
    if dist is None or dist.is_main:
        try:
            resolved = (resumed_resolution(recipe, run_dir) if resume else None) or \
                resolve_target(model, recipe, example, sensitivity=sensitivity)
        except Exception as exc:  # noqa: BLE001 -- under torchrun every rank must hear of it, or they wait forever
            if dist is None:
                raise
            error = exc
    if dist is None:
        return resolved
    device = next(model.parameters()).device
    sent = dist.broadcast_json({"recipe": resolved.model_dump(mode="json") if resolved is not None else None,
                                "error": str(error) if error is not None else None,
                                "target_error": isinstance(error, TargetError)}, device=device)
    if error is not None:
        raise error
    if sent["error"] is not None:
        kind = TargetError if sent["target_error"] else JointCompressError
        raise kind(f"rank 0 could not resolve the target: {sent['error']}")
    if dist.is_main:
        return resolved  # with what the resolution records for the history (Recipe._resolution)
    return parse_recipe(sent["recipe"], source="the target as rank 0 resolved it")


def resumed_resolution(recipe: Recipe, run_dir: str | Path | None) -> Recipe | None:
    """The resolved recipe the newest checkpoint of `run_dir` trained, where that run asked for the
    same recipe (its `asked_recipe`); None otherwise (no checkpoint, another recipe, or one written
    before checkpoints recorded what was asked: resolved again, as before)."""
    from .checkpoint import CheckpointStore

    if run_dir is None:
        return None
    found = CheckpointStore(run_dir).latest()
    if found is None:
        return None
    meta = found[1]["meta"]
    asked, now = meta.get("asked_recipe"), recipe.model_dump(mode="json")
    # matched as the checkpoint matches (training/checkpoints.py): fields added since it was written at what it
    # trained with, fields a resumed run may set anew (MEMORY_FIELDS) left out; a latency target re-resolved
    # on a resume timed other widths and the run was refused as another recipe
    if asked is None or without_memory_fields(with_added_fields(asked)) != without_memory_fields(now):
        return None
    resolved = with_added_fields(meta["recipe"])
    for section, field in MEMORY_FIELDS:  # today's, as the checkpoint match allows
        if isinstance(resolved.get(section), dict) and field in now.get(section, {}):
            resolved = {**resolved, section: {**resolved[section], field: now[section][field]}}
    return parse_recipe(resolved, source=f"{found[0]}: the target as the run resolved it")

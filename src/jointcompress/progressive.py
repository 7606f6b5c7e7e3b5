"""Progressive compression: prune the teacher first, then distil the pruned teacher into a
smaller student (with the recipe's other techniques, e.g. quantization).

The alternative to joint compression that the literature often uses for transformers
(prune the big model, then distil it down); it uses the same total epochs as the recipe so
it can be compared with `mode: joint` and `mode: sequential` on the same budget (each stage
gets at least one epoch, so a recipe of fewer than two is refused).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch.nn as nn

from .api import Result, compress
from .errors import RecipeError
from .finalize import finalize
from .recipe import DistillKD, Recipe, parse_recipe


HF_UNITS = ("prune_heads", "prune_ffn", "prune_layers")


def progressive(
    teacher: nn.Module,
    student: nn.Module | None,
    recipe: Recipe | dict,
    train_data,
    evaluate,
    prune_fraction: float = 0.5,
    progress=None,
    *,
    student_from: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[Result, Result]:
    """Returns (pruned-teacher result, student result); the student is compressed in place.

    Stage 1 trains a copy of the teacher with the recipe's pruning techniques (task loss
    only) for `prune_fraction` of the epochs and finalizes it (channels, or for Hugging Face
    models heads / FFN neurons / layers, physically removed). Stage 2 distils that pruned
    teacher into the student with the remaining techniques for the remaining epochs (a
    default `distill_kd` is added if the recipe has none). Give `student`, or
    `student_from(pruned_teacher)` to build it from the pruned teacher (e.g. a DistilBERT-style
    student of its layers: `lambda t: SequenceClassifier(make_student(t.hf, [0, 2, 4, 5]))`).
    The result's `.model` of stage 2 is the student. A size `target` is the student's: stage 1 prunes the teacher at
    its techniques' own sparsity, and stage 2 compresses the student to the target.
    """
    if (student is None) == (student_from is None):
        raise RecipeError("progressive: give exactly one of `student` and `student_from`")
    recipe = parse_recipe(recipe)
    if not 0 < prune_fraction < 1:
        raise RecipeError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
    prune = [t for t in recipe.techniques if t.type.startswith("prune")]
    rest = [t for t in recipe.techniques if not t.type.startswith("prune")]
    if not prune:
        raise RecipeError("progressive compression needs at least one prune_* technique in the recipe")
    if not any(t.type == "distill_kd" for t in rest):
        rest.append(DistillKD(type="distill_kd"))
    epochs = recipe.training.epochs
    if epochs < 2:  # each stage trains at least one: one epoch asked for trained two, and was reported as one
        raise RecipeError(f"progressive compression splits training.epochs between pruning the teacher and distilling "
                          f"the student, and got {epochs}; give at least 2")
    e1 = min(epochs - 1, max(1, round(epochs * prune_fraction)))  # both stages train, within the recipe's epochs
    e2 = epochs - e1
    # no target in stage 1: a size target is the student's file (stage 2); given to the teacher's stage too, the joint
    # form swapped its pruning for a 4-bit quantizer and distilled the student from a quantized teacher
    stage1 = recipe.model_copy(update={"mode": "joint", "techniques": prune, "target": None,
                                       "training": recipe.training.model_copy(update={"epochs": e1})})
    pruned_teacher = copy.deepcopy(teacher)
    first = compress(pruned_teacher, stage1, train_data, evaluate, progress=progress)
    if any(t.type in HF_UNITS for t in prune):
        from .hf.finalize import finalize_hf

        finalize_hf(pruned_teacher, first.techniques)  # in place: the wrapper now holds the pruned model
    else:
        finalize(pruned_teacher, first.example_inputs)
    pruned_teacher.eval()
    if student is None:
        student = student_from(pruned_teacher)
    stage2 = recipe.model_copy(update={"techniques": rest,
                                       "training": recipe.training.model_copy(update={"epochs": e2})})
    second = compress(student, stage2, train_data, evaluate, teacher=pruned_teacher, progress=progress)
    return first, second

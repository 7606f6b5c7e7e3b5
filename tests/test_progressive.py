import copy

import torch
import torch.nn as nn

from jointcompress.data import evaluator
from jointcompress.progressive import progressive


def test_prune_the_teacher_then_distil_into_a_smaller_student(digits, digits_teacher):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    recipe = {"training": {"epochs": 8, "lr": 3e-3},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": "magnitude", "end": 0.5},
                             {"type": "quant_lsq", "bits": 4, "start": 0.2}]}
    teacher = copy.deepcopy(digits_teacher)
    evaluate = evaluator(digits.x_test, digits.y_test)
    first, second = progressive(teacher, student, recipe, (digits.x_train, digits.y_train), evaluate)
    assert [t.kind for t in first.techniques] == ["prune_structured"]
    assert {t.kind for t in second.techniques} == {"quant_lsq", "distill_kd"}
    pruned = first.model
    assert pruned.fc1.out_features == 150 and pruned.fc2.out_features == 50  # physically halved
    assert len(first.history.epochs) == 4 and len(second.history.epochs) == 4  # the recipe's 8 epochs, split
    assert second.metrics["accuracy"] > 0.85
    assert torch.equal(teacher.fc1.weight, digits_teacher.fc1.weight)  # the user's teacher is untouched


def test_progressive_refuses_one_epoch_it_would_train_twice(digits, digits_teacher):
    """Each stage trains at least one epoch: epochs 1 trained two, and the summary said one."""
    import pytest

    from jointcompress.errors import RecipeError

    recipe = {"training": {"epochs": 1}, "techniques": [{"type": "prune_structured", "sparsity": 0.5}]}
    with pytest.raises(RecipeError, match="splits training.epochs between pruning the teacher and distilling the student, "
                                          "and got 1; give at least 2"):
        progressive(copy.deepcopy(digits_teacher), None, recipe, (digits.x_train, digits.y_train),
                    evaluator(digits.x_test, digits.y_test), student_from=copy.deepcopy)


def test_progressive_splits_the_recipes_epochs_whatever_the_prune_fraction(digits, digits_teacher):
    """prune_fraction 0.9 of 2 epochs gave the teacher 2 and the student 1: 3 epochs trained where the recipe asked
    for 2 (and 4 of 3)."""
    recipe = {"training": {"epochs": 3}, "techniques": [{"type": "prune_structured", "sparsity": 0.5}]}
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    first, second = progressive(copy.deepcopy(digits_teacher), student, recipe, (digits.x_train, digits.y_train),
                                evaluator(digits.x_test, digits.y_test), prune_fraction=0.9)
    assert (len(first.history.epochs), len(second.history.epochs)) == (2, 1)


def test_a_size_target_is_the_students_and_the_teacher_is_only_pruned(digits, digits_teacher, tmp_path):
    """With a size target, stage 1 (the teacher's pruning) became the joint form: a 4-bit quantizer and a size budget in
    place of the pruning, so the student was distilled from a quantized teacher, and both stages aimed at one target."""
    from jointcompress.artifact import save

    recipe = {"target": {"ratio": 20}, "training": {"epochs": 2, "lr": 3e-3},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4},
                             {"type": "distill_kd"}]}
    first, second = progressive(copy.deepcopy(digits_teacher), None, recipe, (digits.x_train, digits.y_train),
                                evaluator(digits.x_test, digits.y_test), student_from=copy.deepcopy)
    assert [t.kind for t in first.techniques] == ["prune_unstructured"] and first.recipe.target is None
    weights = first.model.fc1.weight
    assert 0.45 <= float((weights == 0).float().mean()) <= 0.55  # pruned at its sparsity, not rounded
    assert len(torch.unique(weights)) > 1000
    manifest = save(second.model, second.finalize(), tmp_path / "student", example_inputs=second.example_inputs)
    asked = second.recipe.technique("size_budget").target_bytes
    assert manifest["weights_file_bytes"] <= 1.02 * asked  # the student's file is on the target

"""End-to-end: joint and sequential compression on digits reach stated accuracies."""
import copy

import pytest

from jointcompress import compress, finalize
from jointcompress.data import evaluator
from jointcompress.recipe import builtin_recipe, load_recipe


@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_demo_recipe_reaches_accuracy_at_90_percent_and_4_bits(digits, digits_teacher, mode):
    recipe = load_recipe(builtin_recipe("demo")).model_copy(update={"mode": mode})
    recipe.training.epochs = 20
    model = copy.deepcopy(digits_teacher)
    evaluate = evaluator(digits.x_test, digits.y_test)
    teacher_acc = evaluate(digits_teacher)["accuracy"]
    res = compress(model, recipe, (digits.x_train, digits.y_train), evaluate, teacher=digits_teacher)
    assert res.history.best_epoch is not None and res.history.epochs[-1]["at_target"]
    spec = finalize(model, res.example_inputs)
    acc = evaluate(model)["accuracy"]
    assert acc >= 0.93 and acc >= teacher_acc - 0.04, (acc, teacher_acc)
    ws = [model.fc1.weight, model.fc2.weight, model.fc3.weight]
    total = sum(w.numel() for w in ws)
    masks = res.techniques[0].masks.values()
    assert sum(int(m.hard.sum()) for m in masks) == round(total * 0.1)  # the masks: exactly the target
    zeros = sum(int((w == 0).sum()) for w in ws)  # 4-bit rounding may zero a few more kept weights
    assert total - round(total * 0.1) <= zeros <= total - round(total * 0.09)
    assert all(spec.layers[n].bits == 4 for n in ("fc1", "fc2", "fc3"))
    phases = {e["phase"] for e in res.history.epochs}
    assert phases == ({"joint"} if mode == "joint" else {"prune", "finetune", "quantize", "finetune_q"})


def test_joint_run_logs_conflicts_per_term(digits, digits_teacher):
    recipe = load_recipe(builtin_recipe("demo"))
    recipe.training.epochs = 2
    recipe.coordination.strategy = "pcgrad"
    recipe.coordination.accuracy_as_one = False  # per term (the default resolves task + distill as one)
    recipe.coordination.every = 1
    recipe.coordination.log_every = 5
    recipe.techniques[0].regularization = 0.5
    model = copy.deepcopy(digits_teacher)
    res = compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test), teacher=digits_teacher)
    logged = res.history.steps
    assert logged and {"task", "distill", "sparsity"} <= set(logged[-1]["terms"])
    assert any(k.startswith("distill|sparsity@weights") or k.startswith("task|sparsity@weights") for k in logged[-1]["cosines"])
    assert all(0.0 <= s["conflict_rate"] <= 1.0 for s in logged)
    # every step measured (every: 1): each epoch's rate rests on all its steps, and the table names a small count
    steps_per_epoch = res.history.epochs[0]["step"]
    assert [e["conflict_steps"] for e in res.history.epochs] == [steps_per_epoch] * 2
    from jointcompress.cli import _conflict_cell

    assert _conflict_cell({"conflict_rate": 1.0, "conflict_steps": 2}) == "1.00 (2 steps)"
    assert _conflict_cell({"conflict_rate": 0.25, "conflict_steps": 40}) == "0.25"
    from jointcompress.pipeline import conflict_summary  # the share over every measured step, not the epochs' mean

    rate, steps = conflict_summary([{"conflict_rate": 0.778, "conflict_steps": 6}, {"conflict_rate": 1.0, "conflict_steps": 5},
                                    {"conflict_rate": 1.0, "conflict_steps": 3}])
    assert steps == 14 and rate == pytest.approx((0.778 * 6 + 8) / 14)
    assert conflict_summary([{"conflict_rate": 0.5}, {"conflict_rate": 1.0}]) == (0.75, None)  # an older history

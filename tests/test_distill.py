import math

import pytest
import torch
import torch.nn.functional as F

from jointcompress import RecipeError, compress
from jointcompress.techniques.distill_kd import hinton_loss, kd_loss


def test_kd_loss_equals_hand_computation():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p = torch.softmax(t / T, -1)
    q = torch.softmax(s / T, -1)
    hand = (p * (p.log() - q.log())).sum(-1).mean() * T * T  # KL(p || q), batchmean, T^2
    assert math.isclose(float(kd_loss(s, t, T)), float(hand), rel_tol=1e-5)
    y = torch.randint(0, 7, (5,))
    full = hinton_loss(s, t, y, T, alpha=0.3)
    assert math.isclose(float(full), float(0.3 * hand + 0.7 * F.cross_entropy(s, y)), rel_tol=1e-5)


def test_kd_loss_is_zero_when_student_equals_teacher_with_alpha_one():
    t = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    assert abs(float(hinton_loss(t.clone(), t, y, 4.0, alpha=1.0))) < 1e-6


def test_kd_gradient_reaches_the_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_distillation_without_teacher_is_a_clear_error(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(RecipeError, match="needs a teacher"):
        compress(model, {"techniques": [{"type": "distill_kd"}]}, (digits.x_train, digits.y_train), lambda m: 0.0)


def test_feature_distillation_with_projection(digits, digits_teacher):
    import copy

    from jointcompress.data import evaluator
    from jointcompress.models import LeNet300

    torch.manual_seed(0)
    student = LeNet300(64)
    student.fc2 = torch.nn.Linear(300, 50)  # narrower hidden layer: needs a projection to 100
    student.fc3 = torch.nn.Linear(50, 10)
    teacher = copy.deepcopy(digits_teacher)
    recipe = {"training": {"epochs": 8, "lr": 2e-3},
              "techniques": [{"type": "distill_kd", "alpha": 0.8, "features": [{"student": "fc2", "teacher": "fc2"}]}]}
    res = compress(student, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test), teacher=teacher)
    kd = res.techniques[0]
    assert isinstance(kd.projections[0], torch.nn.Linear) and kd.projections[0].weight.shape == (100, 50)
    assert res.metrics["accuracy"] > 0.8
    for a, b in zip(teacher.parameters(), digits_teacher.parameters()):
        assert torch.equal(a, b)  # the teacher never changed

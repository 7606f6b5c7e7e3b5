import random

import torch

from jointcompress.coordination import GradientCoordinator, pcgrad
from jointcompress.recipe import Coordination


def test_pcgrad_removes_the_negative_component():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    p1, p2 = pcgrad([g1, g2], random.Random(0))
    assert torch.allclose(p1, torch.tensor([0.5, 0.5]))  # g1 - (g1.g2/|g2|^2) g2
    assert abs(float(p1 @ g2)) < 1e-6
    assert abs(float(p2 @ g1)) < 1e-6


def test_pcgrad_leaves_non_conflicting_gradients_untouched():
    g1, g2 = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.1])
    p1, p2 = pcgrad([g1, g2])
    assert torch.equal(p1, g1) and torch.equal(p2, g2)


def _setup(strategy, **kw):
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    coord = GradientCoordinator(Coordination(strategy=strategy, **kw), {"weights": [w]})
    # task pulls w toward (3, 0) (grad (-4, 2)); the sparsity term pulls both toward 0 (grad (3, 3)): they conflict
    terms = lambda: {"task": ((w - torch.tensor([3.0, 0.0])) ** 2).sum(), "sparsity": 3 * w.abs().sum()}  # noqa: E731
    return w, coord, terms


def test_none_is_the_plain_sum_and_measures_conflict():
    w, coord, terms = _setup("none")
    stats = coord.backward(terms(), step=0)
    assert torch.allclose(w.grad, torch.tensor([-4.0, 2.0]) + torch.tensor([3.0, 3.0]))
    assert stats.conflict_rate == 1.0 and stats.cosines["task|sparsity@weights"] < 0
    assert stats.changed == 0.0


def test_scale_damps_the_conflicting_auxiliary_term():
    w, coord, terms = _setup("scale", threshold=0.0, factor=0.5)
    stats = coord.backward(terms(), step=0)
    assert torch.allclose(w.grad, torch.tensor([-4.0, 2.0]) + 0.5 * torch.tensor([3.0, 3.0]))
    assert stats.damped == {"sparsity@weights": 0.5} and stats.changed > 0


def test_pcgrad_strategy_projects_conflicting_terms():
    w, coord, terms = _setup("pcgrad")
    coord.backward(terms(), step=0)
    gt, gs = torch.tensor([-4.0, 2.0]), torch.tensor([3.0, 3.0])
    expected = torch.stack(pcgrad([gt, gs], random.Random(0))).sum(0)
    assert torch.allclose(w.grad, expected)


def test_every_k_skips_measurement_between():
    w, coord, terms = _setup("pcgrad", every=3)
    assert coord.backward(terms(), step=1) is None
    assert torch.allclose(w.grad, torch.tensor([-1.0, 5.0]))  # plain sum
    w.grad = None
    assert coord.backward(terms(), step=3) is not None

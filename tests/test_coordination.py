import random

import pytest
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


def test_a_term_whose_gradient_is_float_noise_is_no_conflict():
    """At step 0 the student is the teacher: the distillation gradient is rounding noise, whose random sign made the
    run's conflict rate 1.0 (the summary's "conflict" read from one such step)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    coord = GradientCoordinator(Coordination(strategy="none", every=1), {"weights": [w]})
    noise = torch.tensor([3e-9, -1e-9])  # against the task gradient (-4, 2)
    stats = coord.backward({"task": ((w - torch.tensor([3.0, 0.0])) ** 2).sum(), "distill": (noise * w).sum()}, step=0)
    assert stats.conflict_rate == 0.0 and not stats.cosines
    stats = coord.backward({"task": ((w - torch.tensor([3.0, 0.0])) ** 2).sum(), "distill": (noise * 1e8 * w).sum()},
                           step=1)
    assert stats.conflict_rate == 1.0  # the same direction, a real gradient


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


def _pcgrad_weights_per_op(gram, rng):
    """PCGrad's coefficients with a tensor operation for every scalar (the formulation before
    the K x K scalars were read as floats): the reference the faster one must match bit for bit."""
    k = gram.shape[0]
    coeffs = torch.eye(k, dtype=gram.dtype)
    for i in range(k):
        c = coeffs[i].clone()
        others = [j for j in range(k) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = c @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                c[j] -= dot / gram[j, j]
        coeffs[i] = c
    return coeffs


def test_pcgrad_weights_are_bit_for_bit_those_of_the_per_op_formulation():
    from jointcompress.coordination import pcgrad_weights

    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        k = 2 + trial % 4
        g = torch.randn(k, 40, generator=gen) * torch.rand(k, 1, generator=gen) * 10 ** (trial % 7 - 3)
        if trial % 5 == 0:
            g[0] = 0  # a term that does not touch the group
        gram = (g @ g.T).double()
        got = pcgrad_weights(gram, random.Random(trial))
        assert torch.equal(got, _pcgrad_weights_per_op(gram, random.Random(trial)))


def test_measured_cosines_are_the_per_pair_quotients():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(30))
    coord = GradientCoordinator(Coordination(strategy="pcgrad"), {"weights": [w]})
    targets = torch.randn(3, 30)
    terms = {f"t{i}": ((w - targets[i]) ** 2).sum() * (i + 1) for i in range(3)}
    stats = coord.backward(terms, step=0)
    grads = torch.stack([torch.autograd.grad(t, w, retain_graph=True)[0] for t in terms.values()])
    gram = (grads @ grads.T).double()
    norms = gram.diag().clamp_min(0).sqrt()
    for a in range(3):
        for b in range(a + 1, 3):
            assert stats.cosines[f"t{a}|t{b}@weights"] == float(gram[a, b] / (norms[a] * norms[b]))


def _three_terms(**kw):
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    coord = GradientCoordinator(Coordination(strategy="pcgrad", **kw), {"weights": [w]})
    # task (grad (-4, 2)) and distillation (grad (2, -6)) conflict with each other; size (grad (3, 3)) with both
    terms = {"task": ((w - torch.tensor([3.0, 0.0])) ** 2).sum(), "distill": ((w - torch.tensor([0.0, 4.0])) ** 2).sum(),
             "size": 3 * w.abs().sum()}
    return w, coord, terms


def test_accuracy_as_one_resolves_accuracy_against_size_in_two_backwards(monkeypatch):
    gt, gd, gs = torch.tensor([-4.0, 2.0]), torch.tensor([2.0, -6.0]), torch.tensor([3.0, 3.0])
    w, coord, terms = _three_terms(accuracy_as_one=True)
    backwards = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or grad(*a, **k))
    stats = coord.backward(terms, step=0)
    assert len(backwards) == 2  # accuracy and size, not one per term
    assert set(stats.cosines) == {"accuracy|size@weights"}
    assert torch.allclose(w.grad, torch.stack(pcgrad([gt + gd, gs], random.Random(0))).sum(0))
    w2, per_term, terms2 = _three_terms(accuracy_as_one=False)
    per_term.backward(terms2, step=0)
    assert not torch.allclose(w.grad, w2.grad)  # per term, task and distillation are projected off each other too


def test_accuracy_as_one_leaves_the_steps_between_measurements_alone():
    w, coord, terms = _three_terms(accuracy_as_one=True, every=2)
    assert coord.backward(terms, step=1) is None
    w2, per_term, terms2 = _three_terms(every=2)
    per_term.backward(terms2, step=1)
    assert torch.equal(w.grad, w2.grad)


def test_scale_keeps_the_summed_accuracy_as_its_primary_objective():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    coord = GradientCoordinator(Coordination(strategy="scale", accuracy_as_one=True, threshold=0.0), {"weights": [w]})
    terms = {"task": ((w - torch.tensor([3.0, 0.0])) ** 2).sum(), "distill": ((w - torch.tensor([3.0, 0.0])) ** 2).sum(),
             "size": 3 * w.abs().sum()}
    stats = coord.backward(terms, step=0)
    assert stats.damped == {"size@weights": 0.5}  # the size term is damped, never the accuracy objective
    assert torch.allclose(w.grad, 2 * torch.tensor([-4.0, 2.0]) + 0.5 * torch.tensor([3.0, 3.0]))


def test_none_measures_every_term_apart_whatever_accuracy_as_one_says():
    """`none` changes no update: the switch must not change its numbers (the plain backward of one
    summed term and the sum of per-term gradients differ in float rounding), only its statistics' names."""
    grads = {}
    for grouped in (True, False):
        w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        coord = GradientCoordinator(Coordination(strategy="none", accuracy_as_one=grouped), {"weights": [w]})
        terms = {"task": ((w - torch.tensor([3.0, 0.0])) ** 2).sum(), "distill": ((w - torch.tensor([0.0, 4.0])) ** 2).sum()}
        stats = coord.backward(terms, step=0)
        assert set(stats.cosines) == {"task|distill@weights"}
        grads[grouped] = w.grad.clone()
    assert torch.equal(grads[True], grads[False])


def test_none_measures_only_the_steps_it_logs_unless_told_and_the_strategies_that_act_every_step():
    """Each measurement takes one backward per term; `none` changes no update, so by default it
    measures only where history logs (log_every), while scale and pcgrad act on every step."""
    def measured_steps(**kw):
        w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        coord = GradientCoordinator(Coordination(log_every=5, **kw), {"weights": [w]})
        out = []
        for step in range(12):
            w.grad = None
            terms = {"task": ((w - 3.0) ** 2).sum(), "size": w.abs().sum()}
            if coord.backward(terms, step=step) is not None:
                out.append(step)
        return out

    assert measured_steps(strategy="none") == [0, 5, 10]
    assert measured_steps(strategy="none", every=2) == [0, 2, 4, 6, 8, 10]
    assert measured_steps(strategy="pcgrad") == list(range(12))
    assert measured_steps(strategy="scale") == list(range(12))


def test_a_run_whose_strategy_changed_nothing_says_why(digits, digits_teacher):
    """pcgrad on task + distillation summed (accuracy_as_one) has one objective: it trains as `none` would,
    which the recipe did not ask for."""
    import copy

    import pytest

    from jointcompress import compress
    from jointcompress.data import evaluator

    recipe = {"training": {"epochs": 1, "batch_size": 256}, "coordination": {"strategy": "pcgrad"},
              "techniques": [{"type": "quant_lsq", "bits": 4}, {"type": "distill_kd", "temperature": 4, "alpha": 0.7}]}
    model = copy.deepcopy(digits_teacher)
    with pytest.warns(UserWarning, match="pcgrad changed no update in this run: it had one objective"):
        compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test),
                 teacher=digits_teacher)


@pytest.mark.parametrize("weight_before", [True, False])
def test_reentrant_activation_checkpointing_is_refused_with_its_fix(weight_before):
    """A measured step takes one gradient per term with torch.autograd.grad, and reentrant checkpointing hides
    the checkpointed layer's weights from it: with a trained weight before the checkpoint torch's RuntimeError
    came from deep inside the coordinator; without one (frozen embeddings, say) the layer's gradients came
    back as None, taken as zero: the measured steps did not train it, silently."""
    from torch.utils.checkpoint import checkpoint

    from jointcompress.errors import JointCompressError

    first, layer = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    params = [*first.parameters(), *layer.parameters()] if weight_before else list(layer.parameters())
    coord = GradientCoordinator(Coordination(strategy="pcgrad"), {"weights": params})
    x = torch.randn(5, 4, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    out = checkpoint(layer, first(x) if weight_before else x, use_reentrant=True)
    size = sum(p.abs().sum() for p in params)  # first, and its graph holds no checkpoint
    terms = {"size": size, "task": out.square().mean()}
    with pytest.raises(JointCompressError, match=r"use_reentrant=False"):
        coord.backward(terms, step=0)


def test_non_reentrant_activation_checkpointing_trains_on_measured_steps():
    from torch.utils.checkpoint import checkpoint

    layer = torch.nn.Linear(4, 3)
    coord = GradientCoordinator(Coordination(strategy="pcgrad"), {"weights": list(layer.parameters())})
    out = checkpoint(layer, torch.randn(5, 4), use_reentrant=False)
    coord.backward({"task": out.square().mean(), "size": out.sum()}, step=0)
    assert layer.weight.grad is not None and bool(layer.weight.grad.any())

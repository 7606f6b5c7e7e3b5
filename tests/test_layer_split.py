"""size_budget.layer_split: erk keeps each layer's bytes within a band around its ERK share of the budget."""
import copy

import pytest
import torch
import torch.nn as nn

from jointcompress.api import compress
from jointcompress.data import evaluator, load_digits
from jointcompress.pipeline import train_teacher
from jointcompress.recipe import SizeBudget as SizeBudgetConfig
from jointcompress.recipe import parse_recipe
from jointcompress.targets import erk_weights, target_bytes
from jointcompress.techniques.base import RunContext
from jointcompress.techniques.size_budget import SizeBudget
from jointcompress.techniques.size_estimate import sparse_layer_bytes_with_slopes
from jointcompress.techniques.zero_level import ZeroLevelLSQWeight


@pytest.fixture(scope="module")
def trained():
    split = load_digits()
    return split, train_teacher("lenet300", split, 3)


def _budget(model, teacher, example, band=2.0, ratio=30.0):
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", ZeroLevelLSQWeight(layer.weight.detach(), 2))
    model(example)  # initializes the steps
    goal = target_bytes(teacher, parse_recipe({"target": {"ratio": ratio}}).target)
    budget = SizeBudget(SizeBudgetConfig(type="size_budget", target_bytes=goal, penalty=30.0, layer_split="erk",
                                         layer_band=band))
    budget.setup(RunContext(model=model, example_inputs=example, total_steps=100))
    return budget


def test_the_erk_goals_share_the_budget_in_erk_proportion(trained):
    split, teacher = trained
    budget = _budget(copy.deepcopy(teacher), teacher, split.x_train[:2])
    erk = erk_weights({name: m for name, (m, _) in budget.layers.items()})
    numels = budget.split.numels
    for variable in (2_000.0, 8_000.0):
        goals = budget.split.goals(variable, [2.0] * len(numels))
        assert sum(goals) == pytest.approx(variable, rel=1e-3)
        # invert each layer's bytes to its kept count: the densities are ERK's weights times one factor
        densities = []
        for goal, n in zip(goals, numels):
            lo, hi = 1.0, float(n)
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if sparse_layer_bytes_with_slopes([mid], [n], [2.0])[0][0] <= goal else (lo, mid)
            densities.append(lo / n)
        factors = [d / w for d, w in zip(densities, erk.values()) if d < 1.0]
        assert max(factors) / min(factors) == pytest.approx(1.0, abs=1e-3)


def test_the_band_terms_gradient_is_autograds_and_pulls_each_layer_toward_its_share(trained):
    """The closed-form node (SizeTerm) against the same term written with autograd: the whole-file term plus,
    per layer, lam_hi * hi + penalty / 2 * max(0, hi)^2 (weight band * share) and the lower bound's likewise."""
    split, teacher = trained
    model = copy.deepcopy(teacher)
    band = 1.5
    budget = _budget(model, teacher, split.x_train[:2], band=band)
    n = len(budget.layers)
    budget.lam, budget.split.lams = 0.4, [0.3, 0.0, 0.2, 0.1, 0.5, 0.0][:2 * n]
    ctx = RunContext(model=model, example_inputs=split.x_train[:2], total_steps=100)
    ctx.step = 40
    params = [q.dead_zone_raw for _, q in budget.layers.values()]
    model(split.x_train[:32])
    closed = budget.loss_terms(ctx)["size"]
    closed_grads = torch.autograd.grad(closed, params)
    model(split.x_train[:32])
    goal, values = budget.goal(ctx.step), budget.layer_bytes(soft=True)
    held = [float(q.held_bits) for _, q in budget.layers.values()]
    shares = torch.tensor(budget.split.goals((goal - budget.fixed) / budget.scale, held), dtype=values.dtype)
    c = (budget.scale * values.sum() + budget.fixed) / goal - 1
    half = budget.config.penalty / 2
    hi, lo = values / (band * shares) - 1, 1 - band * values / shares
    lam_hi, lam_lo = torch.tensor(budget.split.lams[:n]), torch.tensor(budget.split.lams[n:])
    bounds = (band * shares * (lam_hi * hi + half * hi.clamp_min(0) ** 2)
              + shares / band * (lam_lo * lo + half * lo.clamp_min(0) ** 2)).sum()
    reference = budget.lam * c + half * c * c + budget.scale / goal * bounds
    assert float(closed.detach()) == pytest.approx(float(reference.detach()), rel=1e-4)
    for a, b in zip(closed_grads, torch.autograd.grad(reference, params)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-9)
    outside = (hi > 0) | (lo > 0)
    assert bool(outside.any())  # the band binds on some layer of this untrained-for-size state


def _run(trained, **budget):
    split, teacher = trained
    recipe = parse_recipe({"model": "lenet300", "mode": "joint", "target": {"ratio": 40.0}, "techniques": [
        {"type": "quant_lsq", "bits": 2, "zero_level": True, "learn_bits": False, "nonzero_grid": True},
        {"type": "size_budget", "end": 0.5, "freeze": 0.7, "penalty": 30.0, **budget},
        {"type": "distill_kd", "cache_teacher": True}],
        "training": {"epochs": 3, "batch_size": 32, "lr": 0.002}})
    return compress(copy.deepcopy(teacher), recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test),
                    teacher=teacher)


def test_a_run_keeps_every_layer_near_its_erk_share_where_the_learned_split_leaves_it(trained):
    """What the bound changes: on the digits the learned split moves a layer's bytes some 15% off its ERK share;
    under layer_split: erk with band 1 every layer ends on it (the landing's cuts may move a few weights)."""

    def spread(result):
        budget = next(t for t in result.techniques if t.kind == "size_budget")
        kept = budget.events[-1]["kept"]  # the last landing's kept weights per layer
        numels = {name: m.parametrizations.weight.original.numel() for name, (m, _) in budget.layers.items()}
        values = sparse_layer_bytes_with_slopes([float(kept[n]) for n in numels], list(numels.values()),
                                                [2.0] * len(numels))[0]
        shares = budget_split_goals(budget, sum(values), list(numels.values()))
        return [v / s for v, s in zip(values, shares)]

    learned = spread(_run(trained))
    bounded = spread(_run(trained, layer_split="erk", layer_band=1.0))
    assert max(max(learned), 1 / min(learned)) > 1.1, learned
    assert max(max(bounded), 1 / min(bounded)) < 1.03, bounded


def budget_split_goals(budget, variable: float, numels: list[int]) -> list[float]:
    from jointcompress.techniques.layer_split import ErkSplit

    shapes = [m.parametrizations.weight.original.shape for m, _ in budget.layers.values()]
    return ErkSplit(shapes).goals(variable, [2.0] * len(numels))


def test_a_band_without_the_erk_split_is_refused_by_name():
    from jointcompress.errors import RecipeError

    with pytest.raises(RecipeError, match="layer_band.*layer_split: erk"):
        parse_recipe({"mode": "joint", "target": {"ratio": 20}, "techniques": [
            {"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget", "layer_band": 3.0}]})


def test_the_bounds_multipliers_come_back_with_the_checkpoint(trained):
    split, teacher = trained
    example = split.x_train[:2]
    budget = _budget(copy.deepcopy(teacher), teacher, example)
    budget.split.ascend([0.5, -0.2, 0.1, 0.3, 0.0, -0.4], lr=2.0, bound=1e3)
    assert budget.split.lams == pytest.approx([1.0, 0.0, 0.2, 0.6, 0.0, 0.0])  # an inequality's multiplier stays >= 0
    resumed = _budget(copy.deepcopy(teacher), teacher, example)
    resumed.load_state_dict(budget.state_dict())
    assert resumed.split.lams == pytest.approx(budget.split.lams)

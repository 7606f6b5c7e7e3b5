"""The size budget's optional pieces: the Fisher (OBD) cost of pruned weights on the dead
zones, the cubic warm-up of the budget, and the fine-tuning phase after the freeze (with its
mid-way trim back onto the target)."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from jointcompress.api import compress
from jointcompress.artifact.store import save
from jointcompress.compare import FISHER_BUDGET, joint_recipe
from jointcompress.data import evaluator, load_digits
from jointcompress.errors import RecipeError
from jointcompress.finalize import finalize
from jointcompress.pipeline import train_teacher
from jointcompress.plan import joint_plan
from jointcompress.recipe import SizeBudget as SizeBudgetConfig, parse_recipe
from jointcompress.session.schedule import lr_factor
from jointcompress.targets import target_bytes
from jointcompress.techniques.saliency import FisherSaliency
from jointcompress.techniques.size_budget import SizeBudget
from jointcompress.techniques.zero_level import GATE_TEMPERATURE, ZeroLevelLSQWeight


def _layer(out_features=2, in_features=40, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=False)
    q = ZeroLevelLSQWeight(lin.weight.detach(), bits=4, learn_bits=False)
    parametrize.register_parametrization(lin, "weight", q)
    return lin, q


def test_fisher_sees_only_the_loss_through_the_quantized_weight():
    lin, q = _layer()
    sal = FisherSaliency(1.0)
    sal.attach({"fc": (lin, q)})  # from now on the quantizer's forward catches the gradient
    x = torch.randn(8, 40)
    task = lin(x).sum()
    size_like = (lin.parametrizations.weight.original ** 2).sum()  # pulls the shadow weights, not the output
    (task + size_like).backward()
    expected = x.sum(0).expand(2, 40)  # d sum(x W^T) / dW
    assert torch.allclose(q.fisher.pending, expected)
    sal.accumulate(batch_size=8)
    assert torch.allclose(sal.fisher["fc"], 8 * expected ** 2)
    assert q.fisher.pending is None


def test_fisher_cost_holds_back_the_dead_zone_of_the_channel_that_matters():
    lin, q = _layer()
    with torch.no_grad():
        q.dead_zone_raw.fill_(0.5)
    sal = FisherSaliency(2.0)
    sal.attach({"fc": (lin, q)})
    fisher = torch.zeros(2, 40)
    fisher[0] = 3.0  # channel 0 matters to the loss, channel 1 does not
    q.width_fisher.copy_(fisher)  # the quantizer holds the estimate the saliency reads
    q.width_fisher_seen.fill_(True)
    sal.add_gradient({"fc": (lin, q)})
    grad = q.dead_zone_raw.grad.flatten()
    assert grad[0] > 0  # widening channel 0's dead zone costs loss: gradient descent narrows it
    assert grad[1] == 0
    w = lin.parametrizations.weight.original.detach()[0]
    s = q.effective_step().detach().flatten()[0]
    v = (w / s).abs()
    sig = torch.sigmoid((v - q.dead_zone().flatten()[0]) / GATE_TEMPERATURE)
    level = torch.clamp(torch.round(v), min=1, max=q.qmax) * s
    dt_draw = torch.sigmoid(torch.tensor(0.5))  # d softplus / d raw
    analytic = (0.5 * 2.0 * 3.0 * level ** 2 * sig * (1 - sig) / GATE_TEMPERATURE).sum() * dt_draw
    assert torch.allclose(grad[0], analytic, rtol=1e-4)


def _saliency_by_autograd(q, w, fisher, weight):
    """The saliency's dead-zone gradient as autograd takes it: d/d raw of sum cost * (1 - gate)."""
    s = q.effective_step().detach()
    v = (w / s).abs()
    cost = 0.5 * weight * fisher * (torch.clamp(torch.round(v), min=1, max=q.qmax) * s) ** 2
    pruned = 1 - torch.sigmoid((v - q.dead_zone()) / GATE_TEMPERATURE)
    return torch.autograd.grad((cost * pruned).sum(), q.dead_zone_raw)[0]


def test_the_closed_form_saliency_gradient_is_autograds():
    lin, q = _layer(out_features=6, in_features=50, seed=3)
    with torch.no_grad():
        q.dead_zone_raw.copy_(torch.linspace(-2.0, 21.0, 6).view_as(q.dead_zone_raw))  # both sides of softplus' threshold
    sal = FisherSaliency(7.0)
    sal.attach({"fc": (lin, q)})
    fisher = torch.rand(6, 50, generator=torch.Generator().manual_seed(1)) * 4
    q.width_fisher.copy_(fisher)
    q.width_fisher_seen.fill_(True)
    sal.add_gradient({"fc": (lin, q)})
    expected = _saliency_by_autograd(q, lin.parametrizations.weight.original.detach(), fisher, 7.0)
    assert expected.abs().max() > 0
    assert torch.allclose(q.dead_zone_raw.grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def _two_budgeted_layers():
    layers = {}
    for name, (out_f, in_f, seed) in {"a": (6, 50, 3), "b": (4, 30, 4)}.items():
        lin, q = _layer(out_features=out_f, in_features=in_f, seed=seed)
        with torch.no_grad():
            q.dead_zone_raw.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed))
        q.track_fisher()
        q.width_fisher.copy_(torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(seed + 10)) * 4)
        q.width_fisher_seen.fill_(True)
        layers[name] = (lin, q)
    return layers


def test_rank_mode_keeps_the_fisher_ranking_but_not_its_pull_on_the_bytes():
    bytes_per_weight = {"a": 0.6, "b": 0.9}
    price, rank = _two_budgeted_layers(), _two_budgeted_layers()
    FisherSaliency(30.0).add_gradient(price)
    sal = FisherSaliency(30.0, "rank")
    sal.add_gradient(rank, bytes_per_weight)
    # the bytes' gradient on the dead zones, by autograd through the kept-weight counts the size term reads
    size_grad = {}
    for name, (lin, q) in rank.items():
        _ = lin.weight  # a forward pass: the count's surrogate
        count = q.kept_count(lin.parametrizations.weight.original)
        size_grad[name] = torch.autograd.grad(bytes_per_weight[name] * count, q.dead_zone_raw)[0]
        torch.testing.assert_close(sal._bytes_gradient(lin, q, bytes_per_weight[name]), size_grad[name],
                                   rtol=1e-5, atol=1e-7)
    g = {n: price[n][1].dead_zone_raw.grad for n in price}
    g_rank = {n: rank[n][1].dead_zone_raw.grad for n in rank}
    dot = sum(float((g[n] * size_grad[n]).sum()) for n in g)
    assert dot < 0  # the price pulls against the bytes: every pruned weight costs loss
    dot_rank = sum(float((g_rank[n] * size_grad[n]).sum()) for n in g)
    scale = math.sqrt(sum(float(g[n].pow(2).sum()) for n in g) * sum(float(size_grad[n].pow(2).sum()) for n in g))
    assert abs(dot_rank) < 1e-5 * scale  # no pull on the bytes left (to first order)
    alpha = dot / sum(float(size_grad[n].pow(2).sum()) for n in g)
    for n in g:  # what was removed is the bytes' direction only: the ranking between dead zones remains
        torch.testing.assert_close(g_rank[n], g[n] - alpha * size_grad[n], rtol=1e-5, atol=1e-7)
    assert any((g_rank[n] < 0).any() for n in g)  # dead zones whose weights cost less than the price now widen
    assert 0 < sal.last_neutralized < 1  # the share of the pull removed (size_budget's metric)


def test_rank_mode_needs_the_saliency():
    with pytest.raises(ValueError, match="saliency_mode"):
        SizeBudgetConfig(type="size_budget", saliency_mode="rank")
    assert SizeBudgetConfig(type="size_budget", saliency=30.0, saliency_mode="rank").saliency_mode == "rank"


@pytest.mark.parametrize("mode", ["price", "rank", "landing"])
def test_each_saliency_mode_through_the_budgets_step(mode):
    """landing keeps the estimate and leaves the dead zones as the task left them; price and rank add to them."""
    lin, q = _layer(out_features=4, in_features=30, seed=5)
    budget = SizeBudget(SizeBudgetConfig(type="size_budget", saliency=30.0, saliency_mode=mode, target_bytes=100.0))
    budget.layers = {"fc": (lin, q)}  # what setup does
    budget.saliency.attach(budget.layers)
    x = torch.randn(16, 30, generator=torch.Generator().manual_seed(0))
    lin(x).pow(2).sum().backward()
    task_grad = q.dead_zone_raw.grad.clone()
    budget.before_optimizer_step(SimpleNamespace(batch_targets=torch.zeros(16), batch_inputs=x, step=0, loss_scale=None))
    assert budget.saliency.fisher["fc"].sum() > 0  # the estimate the landing orders its cuts by
    assert torch.equal(q.dead_zone_raw.grad, task_grad) == (mode == "landing")
    if mode == "rank":  # projected with the budget's bytes per weight (the share removed: its saliency_neutralized)
        assert 0 < budget.saliency.last_neutralized < 1


def test_fisher_is_kept_in_the_model_state_and_old_budget_states_still_load():
    cfg = SizeBudgetConfig(type="size_budget", saliency=5.0, target_bytes=1000.0)
    lin, q = _layer(2, 3)
    budget = SizeBudget(cfg)
    budget.saliency.attach({"fc": (lin, q)})  # what setup does: the quantizer holds the estimate
    q.width_fisher.copy_(torch.arange(6.0).view(2, 3))
    q.width_fisher_seen.fill_(True)
    budget.frozen_at, budget.trimmed = 17, True
    state = budget.state_dict()
    assert not any(k.startswith("fisher.") for k in state)  # no second copy of it in the budget's state
    model_state = copy.deepcopy(lin.state_dict())
    assert torch.equal(model_state["parametrizations.weight.0.width_fisher"], torch.arange(6.0).view(2, 3))
    lin2, q2 = _layer(2, 3, seed=1)
    fresh = SizeBudget(cfg)
    fresh.saliency.attach({"fc": (lin2, q2)})
    fresh.load_state_dict(state)
    lin2.load_state_dict(model_state)
    assert torch.equal(fresh.saliency.fisher["fc"], torch.arange(6.0).view(2, 3)) and fresh.frozen_at == 17
    assert fresh.trimmed
    # a checkpoint from before the merge: the estimate in the budget's state, none in the model's
    old_model_state = {k: v for k, v in model_state.items() if "width_fisher" not in k}
    old_state = {**state, "fisher.fc": torch.full((2, 3), 7.0)}
    lin3, q3 = _layer(2, 3, seed=2)
    old = SizeBudget(cfg)
    old.saliency.attach({"fc": (lin3, q3)})
    lin3.load_state_dict(old_model_state)  # the model first (the loop's order) ...
    old.load_state_dict(old_state)
    assert torch.equal(old.saliency.fisher["fc"], torch.full((2, 3), 7.0))
    lin4, q4 = _layer(2, 3, seed=3)
    old4 = SizeBudget(cfg)
    old4.saliency.attach({"fc": (lin4, q4)})
    old4.load_state_dict(old_state)  # ... or the session's order: techniques, then the model
    lin4.load_state_dict(old_model_state)
    assert torch.equal(old4.saliency.fisher["fc"], torch.full((2, 3), 7.0))
    assert SizeBudget(SizeBudgetConfig(type="size_budget")).saliency is None  # off by default


def test_saliency_and_learned_width_share_one_fisher_estimate():
    torch.manual_seed(0)
    lin = nn.Linear(40, 2, bias=False)
    q = ZeroLevelLSQWeight(lin.weight.detach(), bits=4, learn_bits=True)
    parametrize.register_parametrization(lin, "weight", q)
    sal = FisherSaliency(1.0)
    sal.attach({"fc": (lin, q)})
    x = torch.randn(8, 40)
    out = lin(x)
    (out.sum() + (lin.parametrizations.weight.original ** 2).sum()).backward()
    expected = x.sum(0).expand(2, 40)
    assert torch.allclose(q.fisher.pending, expected)  # one hook, the forward's: the gradient counted once
    q.width_step(lin.parametrizations.weight.original, batch_size=8)  # folds it ...
    sal.accumulate(batch_size=8)  # ... and the saliency's fold does not fold it again
    assert sal.fisher["fc"] is q.fisher.estimate()
    assert torch.allclose(sal.fisher["fc"], 8 * expected ** 2)


def test_cubic_warm_up_lands_on_the_aim_and_slows_down_at_the_end():
    budgets = {}
    for schedule in ("log_linear", "cubic"):
        b = SizeBudget(SizeBudgetConfig(type="size_budget", schedule=schedule, target_bytes=1000.0, margin=0.0))
        b.window, b.start_bytes = (0, 100), 100_000.0
        budgets[schedule] = [b.goal(step) for step in range(0, 121)]
    lin, cub = budgets["log_linear"], budgets["cubic"]
    assert lin[0] == pytest.approx(100_000) and cub[0] == pytest.approx(100_000)
    assert lin[100] == cub[100] == pytest.approx(1000) and cub[120] == pytest.approx(1000)
    assert all(a >= b for a, b in zip(cub, cub[1:]))  # never rises
    assert cub[50] < lin[50]  # fast first ...
    assert cub[90] / cub[100] < lin[90] / lin[100]  # ... and slow at the end: the multiplier can catch up


def test_finetune_phase_restarts_the_learning_rate_at_the_freeze():
    plans = {}
    for flag in (False, True):
        t = SizeBudget(SizeBudgetConfig(type="size_budget", end=0.6, freeze=0.8, finetune_phase=flag))
        plans[flag] = joint_plan([t], 1000)
        assert plans[flag].freeze[id(t)] == 800
    assert [(p.name, p.start, p.end) for p in plans[False].phases] == [("joint", 0, 1000)]
    assert [(p.name, p.start, p.end) for p in plans[True].phases] == [("joint", 0, 800), ("finetune", 800, 1000)]
    assert lr_factor(800, plans[True], "cosine") == pytest.approx(1.0)
    assert lr_factor(800, plans[False], "cosine") < 0.11  # one cosine: a tenth of the rate left


def test_decide_steps_paces_the_window_and_the_freeze_by_the_runs_length():
    """size_budget.decide_steps: on target after ~decide_steps steps, frozen half a window later,
    the fine-tuning phase from there; a short run keeps the default window."""
    for total, (end, freeze) in ((4690, (1000, 1500)), (1000, (600, 800))):
        t = SizeBudget(SizeBudgetConfig(type="size_budget", decide_steps=1000, finetune_phase=True))
        plan = joint_plan([t], total)
        assert t.window == (0, end) and plan.freeze[id(t)] == freeze
        assert [(p.name, p.start, p.end) for p in plan.phases] == [("joint", 0, freeze), ("finetune", freeze, total)]
        assert round(t.config.freeze * total) == freeze
    with pytest.raises(RecipeError, match="decide_steps.*start"):
        parse_recipe({"mode": "joint", "target": {"ratio": 10}, "techniques": [
            {"type": "quant_lsq", "zero_level": True}, {"type": "size_budget", "start": 0.3, "decide_steps": 500}]})


def test_recipe_errors_name_the_new_fields_and_the_fix():
    base = {"mode": "joint", "target": {"ratio": 10}, "techniques": [{"type": "quant_lsq", "zero_level": True}]}
    with pytest.raises(RecipeError, match="saliency.*freeze"):
        parse_recipe({**base, "techniques": base["techniques"] + [
            {"type": "size_budget", "start": 0.8, "end": 0.8, "freeze": 0.8, "saliency": 10}]})
    with pytest.raises(RecipeError, match="finetune_phase.*freeze below 1.0"):
        parse_recipe({**base, "techniques": base["techniques"] + [
            {"type": "size_budget", "end": 0.6, "freeze": 1.0, "finetune_phase": True}]})
    with pytest.raises(RecipeError, match="schedule"):
        parse_recipe({**base, "techniques": base["techniques"] + [{"type": "size_budget", "schedule": "linear"}]})
    seq = parse_recipe({"mode": "sequential", "target": {"ratio": 40}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9}, {"type": "quant_lsq", "bits": 4}]})
    budget = joint_recipe(seq, **FISHER_BUDGET).technique("size_budget")
    assert (budget.saliency, budget.schedule, budget.finetune_phase) == (30.0, "cubic", True)
    default = joint_recipe(seq).technique("size_budget")  # the existing joint variants are unchanged
    assert (default.saliency, default.schedule, default.finetune_phase) == (0.0, "log_linear", False)


@pytest.fixture(scope="module")
def fisher_run():
    split = load_digits()
    teacher = train_teacher("lenet300", split, 3)
    recipe = parse_recipe({"model": "lenet300", "mode": "joint", "target": {"ratio": 30.0}, "techniques": [
        {"type": "quant_lsq", "bits": 4, "zero_level": True, "learn_bits": False},
        {"type": "size_budget", "end": 0.6, "freeze": 0.8, **FISHER_BUDGET},
        {"type": "distill_kd", "cache_teacher": True}],
        "training": {"epochs": 5, "batch_size": 16, "lr": 0.002}})
    model = copy.deepcopy(teacher)
    result = compress(model, recipe, (split.x_train, split.y_train), evaluator(split.x_test, split.y_test), teacher=teacher)
    return split, teacher, recipe, model, result


def test_trim_flips_the_weights_nearest_the_edge_until_back_on_the_aim(fisher_run):
    _, _, _, model, result = fisher_run
    budget = copy.copy(next(t for t in result.techniques if t.kind == "size_budget"))
    budget.events = []
    kept = lambda: sum(int(q.keep.sum()) for _, q in budget.layers.values())  # noqa: E731
    state = copy.deepcopy(model.state_dict())  # restored after: the next test saves the trained model
    try:
        budget.calibrate(model)
        now, before = budget.calibrated_hard(), kept()
        budget.config = budget.config.model_copy(update={"target_bytes": now * 0.9, "margin": 0.0})
        budget.trim(model)
        assert kept() < before and budget.events and {e["event"] for e in budget.events} == {"size_trim"}
        assert budget.calibrated_hard() <= now * 0.9 * 1.01
    finally:
        model.load_state_dict(state)
    assert kept() == before


def test_guard_lands_a_file_that_drifted_over_the_target_and_leaves_one_under_it(fisher_run):
    """After the trim the fine-tuned values keep moving the file; a guard step finds it over the
    target and lands it on the aim, and no epoch over the target counts as final."""
    from jointcompress.techniques.size_estimate import measured_bytes

    _, _, _, model, result = fisher_run
    budget = copy.copy(next(t for t in result.techniques if t.kind == "size_budget"))
    budget.events, budget.model = [], model
    state = copy.deepcopy(model.state_dict())
    try:
        now = measured_bytes(model)["total"]
        budget.config = budget.config.model_copy(update={"target_bytes": now * 1.05})
        budget.guard(model)  # under the target: untouched
        assert budget.events == [] and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert budget.at_target()
        budget.config = budget.config.model_copy(update={"target_bytes": now * 0.9})
        assert not budget.at_target()  # over the target: not a state the loop may keep
        budget.guard(model)
        assert [e["event"] for e in budget.events] == ["size_guard"]
        assert measured_bytes(model)["total"] <= now * 0.9 and budget.at_target()
    finally:
        model.load_state_dict(state)
    steps = budget.guard_steps(1000)
    trim = budget.trim_step(1000)
    assert len(steps) == 8 and min(steps) > trim and max(steps) == 999


def test_fisher_run_lands_on_target(fisher_run, tmp_path):
    split, teacher, recipe, model, result = fisher_run
    budget = next(t for t in result.techniques if t.kind == "size_budget")
    assert budget.saliency.fisher and all(f.min() >= 0 and f.max() > 0 for f in budget.saliency.fisher.values())
    assert all(q.fisher.estimate() is budget.saliency.fisher[n] for n, (_, q) in budget.layers.items())
    assert budget.trimmed and budget.at_target()
    best = next(e for e in result.history.epochs if e["epoch"] == result.history.best_epoch)
    assert best["step"] > budget.trim_step(result.history.epochs[-1]["step"])  # the kept state is after the trim
    spec = finalize(model, result.example_inputs)
    manifest = save(model, spec, tmp_path / "a", example_inputs=result.example_inputs)
    goal = target_bytes(teacher, recipe.target)
    assert abs(manifest["weights_file_bytes"] - goal) / goal < 0.02
    assert result.metrics["accuracy"] > 0.8


def test_anti_windup_lets_the_multiplier_go_once_the_state_is_under_the_budget():
    """Under the budget, plain dual ascent lowers a positive multiplier by lr * |c| a step (it keeps
    pushing the state down long after the descent); with anti_windup it also decays geometrically.
    Over the budget both rise the same."""
    from types import SimpleNamespace

    def run(anti_windup: bool, bytes_now: float, steps: int = 100) -> float:
        b = SizeBudget(SizeBudgetConfig(type="size_budget", target_bytes=1000.0, margin=0.0, anti_windup=anti_windup))
        b.window, b.span, b.lam, b.start_bytes, b.last_hard = (0, 100), 100, 2.0, 1000.0, bytes_now
        for step in range(200, 200 + steps):
            b.after_optimizer_step(SimpleNamespace(step=step))
        return b.lam

    plain, damped = run(False, 980.0), run(True, 980.0)  # 2% under the aim
    assert plain == pytest.approx(2.0 - 100 * 0.5 * 0.02)  # 1.0: still pushing after 100 steps
    assert damped < 0.1 * plain
    assert run(True, 1020.0) == pytest.approx(run(False, 1020.0)) == pytest.approx(3.0)  # over: unchanged

"""Holding the size budget from below (size_budget.hold, techniques/size_hold.py): a state under
its budget stops the multiplier pushing the dead zones wider, and between the window's end and
the freeze it re-grows the pruned weights nearest their edge onto the aim, a share at a time."""
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from jointcompress.recipe import SizeBudget as SizeBudgetConfig
from jointcompress.techniques.base import RunContext
from jointcompress.techniques.size_budget import SizeBudget
from jointcompress.techniques.size_hold import hold
from jointcompress.techniques.zero_level import ZeroLevelLSQWeight


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _budget(hold_on: bool = True) -> tuple[nn.Module, SizeBudget]:
    torch.manual_seed(0)
    model = _Mlp()
    for m in (model.fc1, model.fc2):
        q = ZeroLevelLSQWeight(m.weight.detach(), bits=4, learn_bits=False)
        parametrize.register_parametrization(m, "weight", q)
        m(torch.randn(2, m.in_features))  # initializes the step
        with torch.no_grad():
            q.dead_zone_raw.fill_(1.5)  # a wide dead zone: most weights pruned
    budget = SizeBudget(SizeBudgetConfig(type="size_budget", target_bytes=1e9, hold=hold_on))
    budget.window = (0, 10)
    budget.setup(RunContext(model=model, example_inputs=torch.randn(2, 64), total_steps=20))
    return model, budget


def _kept(budget: SizeBudget) -> int:
    return sum(int(q.hard_keep(m.parametrizations.weight.original).sum()) for m, q in budget.layers.values())


def test_hold_regrows_a_state_under_its_aim_nearest_the_edge_first_and_stops_the_multiplier():
    model, budget = _budget()
    start = budget.calibrated_hard()
    budget.config.target_bytes = 1.5 * start / (1 - budget.config.margin)  # the state is a third under its aim
    budget.lam = 2.0  # wound up while the budget fell
    kept, before = _kept(budget), budget.calibrated_hard()
    pruned_margin = {n: q.edge_distance(m.parametrizations.weight.original).detach().clone()
                     for n, (m, q) in budget.layers.items()}
    hold(budget, 12)  # window (0, 10), freeze at 16: a share of the deficit now
    assert budget.lam == 0.0
    budget.calibrate(model)
    after = budget.calibrated_hard()
    assert before < after < budget.aim()  # a step toward the aim, not past it
    assert _kept(budget) > kept
    (event,) = budget.events
    assert event["event"] == "size_regrow" and event["revived_weights"] == _kept(budget) - kept
    for name, (m, q) in budget.layers.items():  # the revived ones were the pruned weights nearest the edge
        now = q.hard_keep(m.parametrizations.weight.original)
        was = pruned_margin[name] >= 0
        revived = now & ~was
        if revived.any() and (~now).any():  # ranked per byte across layers: within a layer, nearest first
            assert pruned_margin[name][revived].min() >= pruned_margin[name][~now & ~was].max() - 1e-6
    assert not any(q.pattern_fixed for _, q in budget.layers.values())  # training still decides


def test_hold_leaves_a_state_on_its_aim_alone_and_only_clamps_the_multiplier_inside_the_window():
    model, budget = _budget()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    budget.config.target_bytes = budget.calibrated_hard() / (1 - budget.config.margin)
    budget.lam = 2.0
    hold(budget, 12)  # on its aim: nothing
    assert budget.lam == 2.0 and not budget.events
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    budget.config.target_bytes *= 1.5
    hold(budget, 5)  # under the budget inside the window: the multiplier stops, no weight moves
    assert budget.lam == 0.0 and not budget.events
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    budget.lam = 2.0
    hold(budget, budget.freeze_step)  # at the freeze the projection takes over
    assert not budget.events


def test_hold_is_off_unless_asked():
    model, budget = _budget(hold_on=False)
    budget.config.target_bytes = 2 * budget.calibrated_hard()
    budget.lam = 2.0
    ctx = RunContext(model=model, example_inputs=torch.randn(2, 64), total_steps=20)
    ctx.step = 12
    budget.on_step(ctx)
    assert budget.lam == 2.0 and not [e for e in budget.events if e["event"] == "size_regrow"]


def test_the_hold_variant_turns_it_on_over_learned_widths_and_the_others_stay_off():
    from jointcompress.compare import HOLD_BUDGET, JOINT_OPTIONS, joint_recipe
    from jointcompress.recipe import parse_recipe

    seq = parse_recipe({"mode": "sequential", "target": {"ratio": 40}, "techniques": [
        {"type": "prune_unstructured", "sparsity": 0.9}, {"type": "quant_lsq", "bits": 4}]})
    held = joint_recipe(seq, **HOLD_BUDGET)
    assert held.technique("size_budget").hold and held.technique("quant_lsq").learn_bits
    assert JOINT_OPTIONS["joint-hold-none"] is HOLD_BUDGET
    assert not joint_recipe(seq, **JOINT_OPTIONS["joint-bits-none"]).technique("size_budget").hold
    assert not joint_recipe(seq).technique("size_budget").hold

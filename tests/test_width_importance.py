"""What a cut loses (width_importance): the measured held-out loss ranks groups by how much
accuracy they carry, not by how many channels they have, and the allocator follows it. Fake
latency tables, no timing."""
import pytest
import torch
import torch.nn as nn

from jointcompress.graph import discover_groups
from jointcompress.latency_targets import allocate_latency, allowed_widths, relative_importance, shrunk_to
from jointcompress.models import build_model
from jointcompress.recipe import Target
from jointcompress.width_importance import LossImportance, held_out_loss, loss_importance, spread

from test_latency_targets import mac_table


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model("lenet5").eval(), torch.randn(2, 1, 28, 28)


def test_norm_importance_is_the_sum_of_the_weakest_relative_norms(lenet):
    model, x = lenet
    groups = discover_groups(model, x)[0]
    imp = relative_importance(model, groups)
    rel = imp.sorted_relative["conv2"]
    assert imp.lost("conv2", 50, 40) == pytest.approx(float(rel[:10].sum()))
    assert imp.lost("conv2", 40, 32) == pytest.approx(float(rel[10:18].sum()))


def test_spread_keeps_the_ends_and_leans_narrow():
    ws = allowed_widths(500)
    picked = spread(ws, 6)
    assert picked[0] == ws[0] and picked[-1] == 500 and len(picked) <= 6
    assert picked[1] - picked[0] < picked[-1] - picked[-2]  # geometric: denser at the narrow end
    assert spread([8, 12, 16, 20], 6) == [8, 12, 16, 20]


def test_loss_curve_is_monotone_and_interpolated():
    imp = LossImportance({"a": {8: 1.0, 16: 0.5, 32: 0.1}}, 0.1, {"a": {8: 1.0, 16: 0.5, 32: 0.1}})
    assert imp.at("a", 24) == pytest.approx(0.3) and imp.at("a", 4) == 1.0 and imp.at("a", 64) == 0.1
    assert imp.lost("a", 32, 16) == pytest.approx(0.4) and imp.lost("a", 16, 32) == 0.0


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_measured_loss_is_the_loss_of_the_cut_model_and_never_falls_when_narrower(lenet):
    model, x = lenet
    groups = discover_groups(model, x)[0]
    held = _data()
    options = {g.name: allowed_widths(g.channels) for g in groups}
    imp = loss_importance(model, x, groups, held, options, points=4)
    assert imp.base_loss == pytest.approx(held_out_loss(model, *held))
    w = min(imp.raw_loss["conv2"])
    assert imp.raw_loss["conv2"][w] == pytest.approx(held_out_loss(shrunk_to(model, x, {"conv2": w}), *held))
    for g in imp.loss:
        ws = sorted(imp.loss[g])
        assert len(ws) <= 4 and ws[-1] == dict((k.name, k.channels) for k in groups)[g]
        assert all(imp.loss[g][a] >= imp.loss[g][b] for a, b in zip(ws, ws[1:]))
    calls = []
    loss_importance(model, x, groups, held, options, recover=lambda m: calls.append(m), recover_steps=5, points=3)
    assert calls and all(isinstance(m, nn.Module) for m in calls)  # each cut copy is recovered before its loss


def test_a_recovering_model_is_measured_against_itself_recovered(lenet):
    """recover_base: the reference is the uncut model after the same recovery (here: a
    "recovery" that zeroes the classifier, so every loss is log 10), else the model as it is."""
    import math

    model, x = lenet
    groups = [g for g in discover_groups(model, x)[0] if g.name == "conv2"]
    held = _data()

    def flatten(m):
        nn.init.zeros_(m.fc2.weight)
        nn.init.zeros_(m.fc2.bias)
    options = {"conv2": allowed_widths(50)}
    as_is = loss_importance(model, x, groups, held, options, recover=flatten, points=2)
    recovered = loss_importance(model, x, groups, held, options, recover=flatten, points=2, recover_base=True)
    assert as_is.base_loss == pytest.approx(held_out_loss(model, *held)) and as_is.base_loss != pytest.approx(math.log(10))
    assert recovered.base_loss == pytest.approx(math.log(10))
    assert model.fc2.weight.abs().sum() > 0  # the model itself is untouched


def test_allocator_spends_the_budget_where_the_loss_says(lenet):
    """Same table, same target: with channel norms the many cheap fc1 units weigh as much as
    conv2's channels; a measured loss saying fc1 cuts are free and conv2 cuts costly sends the
    cut to fc1 first (as far as its narrowest width) and keeps more of conv2."""
    model, x = lenet
    table, sites, channels = mac_table(model, x)
    target = Target(latency_ms=0.3 * table.predict(sites, channels, channels), batch=1)
    flat = {w: 0.1 for w in allowed_widths(500)}
    steep = {w: 0.1 + (50 - w) for w in allowed_widths(50)}
    mild = {w: 0.1 + 0.001 * (20 - w) for w in allowed_widths(20)}
    curves = {"fc1": flat, "conv2": steep, "conv1": mild}
    imp = LossImportance(curves, 0.1, curves)
    by_loss = allocate_latency(model, x, target, table=table, measure=False, importance=imp)
    by_norm = allocate_latency(model, x, target, table=table, measure=False)
    assert by_loss.predicted_ms <= target.latency_ms and by_norm.predicted_ms <= target.latency_ms
    assert by_loss.widths["fc1"] == allowed_widths(500)[0] < by_norm.widths["fc1"]
    assert by_loss.widths["conv2"] > by_norm.widths["conv2"]

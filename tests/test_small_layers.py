"""Scope `layer` never empties a small layer or channel group: each keeps at least max(1, min_keep of
its units) (techniques/masks.py layer_floor), and ordinary layers keep exactly what the rounding of
the sparsity gives, as before the floor existed."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import jointcompress
from jointcompress.models import LeNet5, LeNet300
from jointcompress.techniques.masks import allocate, layer_floor, layer_keep_count


def _train(model, session, x, y, steps, batch):
    opt = torch.optim.Adam(session.param_groups(lr=1e-3))
    session.bind(opt)
    for i in range(steps):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        terms = session.loss(model(xb), (xb, yb))
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()


def test_structured_layer_scope_keeps_a_channel_of_a_small_group_and_finalizes():
    """Conv(3->8) at channel sparsity 0.95: round(8 * 0.05) = 0 channels used to be kept, the model trained
    with a constant output and finalize failed on a [0, 3, 3, 3] weight, leaving the model broken."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.95, "criterion": "magnitude", "end": 0.5}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = jointcompress.prepare(m, recipe, total_steps=4, example_inputs=x[:2])
    _train(m, s, x, y, steps=4, batch=16)
    for i in (0, 2):
        assert int((m[i].weight.detach().flatten(1).abs().sum(1) != 0).sum()) >= 1, i
    assert s.techniques[0].at_target()
    m.eval()
    with torch.no_grad():
        before = m(x).clone()
    s.finalize()
    m.eval()
    with torch.no_grad():
        after = m(x)
    assert m[0].weight.shape[0] >= 1 and m[2].weight.shape[0] >= 1
    assert m[0].weight.shape[0] == 1 and m[2].weight.shape[0] == 1  # 0.95 of 8 and of 16: one channel each
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert before.std(0).max() > 0  # the output still depends on the input
    floor = [str(w.message) for w in caught if str(w.message).startswith("prune_structured: ")]
    assert len(floor) == 1 and "'0' keeps 1 of its 8 channels (the sparsity alone: 0)" in floor[0], floor
    assert "'2'" not in floor[0]  # 16 channels: round(16 * 0.05) = 1 >= the floor, not named


def test_unstructured_layer_scope_keeps_the_weight_of_a_one_weight_layer():
    """A Linear(1, 1) gate at sparsity 0.7: round(1 * 0.3) = 0 weights used to be kept, and the model's
    output no longer depended on its input."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(64, 1)
    y = (x[:, 0] > 0).long()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = jointcompress.prepare(m, {"techniques": [{"type": "prune_unstructured", "sparsity": 0.7, "end": 0.0}]},
                                  total_steps=2)
        _train(m, s, x, y, steps=2, batch=32)
        s.finalize()
    assert m[0].weight.item() != 0
    assert int((m[1].weight != 0).sum()) == 2 and int((m[3].weight != 0).sum()) == 10  # round(n * 0.3)
    m.eval()
    with torch.no_grad():
        assert not torch.equal(m(torch.tensor([[-5.0]])), m(torch.tensor([[5.0]])))
    said = [str(w.message) for w in caught]
    assert not [w for w in said if "no nonzero weight" in w or "not finite" in w], said
    floor = [w for w in said if w.startswith("prune_unstructured: ")]
    assert len(floor) == 1 and "'0' keeps 1 of its 1 weights (the sparsity alone: 0)" in floor[0], said
    assert "'1'" not in floor[0]  # Linear(1, 8): round(8 * 0.3) = 2 >= the floor, not named


def test_layer_allocation_floor():
    assert layer_floor(1, 0.01) == 1 and layer_floor(8, 0.05) == 1 and layer_floor(500, 0.05) == 25
    assert layer_floor(7, 0.0) == 1 and layer_floor(0, 0.5) == 0
    assert layer_keep_count(1, 0.7, 0.0) == 1 and layer_keep_count(8, 0.95, 0.05) == 1
    assert layer_keep_count(1000, 0.9, 0.01) == 100  # the rounding, above the floor of 10
    for scores in ([torch.rand(1, 1)], [torch.rand(8)], [torch.rand(3, 2)]):
        for min_keep in (0.0, 0.01, 0.05):
            (keep,) = allocate(scores, 0.99, "layer", min_keep)
            assert int(keep.sum()) == 1
    assert int(allocate([torch.rand(40)], 0.99, "layer", 0.25)[0].sum()) == 10  # min_keep of the entries


# kept counts in scope layer, as the code kept them before the floor (and keeps them now); the one
# configuration here where the floor binds is prune_structured at 0.99 (below)
LAYER_COUNTS = {
    ("lenet5", "prune_unstructured"): {
        0.5: {"conv1": 250, "conv2": 12500, "fc1": 200000, "fc2": 2500},
        0.9: {"conv1": 50, "conv2": 2500, "fc1": 40000, "fc2": 500},
        0.95: {"conv1": 25, "conv2": 1250, "fc1": 20000, "fc2": 250},
        0.99: {"conv1": 5, "conv2": 250, "fc1": 4000, "fc2": 50}},
    ("lenet5", "prune_structured"): {
        0.5: {"conv1": 10, "conv2": 25, "fc1": 250},
        0.9: {"conv1": 2, "conv2": 5, "fc1": 50},
        0.95: {"conv1": 1, "conv2": 3, "fc1": 25}},
    ("lenet300", "prune_unstructured"): {
        0.5: {"fc1": 117600, "fc2": 15000, "fc3": 500},
        0.9: {"fc1": 23520, "fc2": 3000, "fc3": 100},
        0.95: {"fc1": 11760, "fc2": 1500, "fc3": 50},
        0.99: {"fc1": 2352, "fc2": 300, "fc3": 10}},
    ("lenet300", "prune_structured"): {
        0.5: {"fc1": 150, "fc2": 50},
        0.9: {"fc1": 30, "fc2": 10},
        0.95: {"fc1": 15, "fc2": 5}},
}
# prune_structured at 0.99 (min_keep 0.05): round(c * 0.01) is under max(1, round(c * 0.05)) in every group
FLOORED = {"lenet5": {"conv1": 1, "conv2": 2, "fc1": 25}, "lenet300": {"fc1": 15, "fc2": 5}}
MODELS = {"lenet5": LeNet5, "lenet300": LeNet300}


def _kept(model_name, tech, scope, sparsity):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    recipe = {"techniques": [{"type": tech, "sparsity": sparsity, "scope": scope, "end": 0.0, "criterion": "magnitude"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = jointcompress.prepare(model, recipe, total_steps=2, example_inputs=torch.randn(2, 1, 28, 28))
    t = s.techniques[0]
    return t, {k: int(m.hard.sum()) for k, m in t.masks.items()}, [str(w.message) for w in caught]


@pytest.mark.parametrize("model_name", ["lenet5", "lenet300"])
@pytest.mark.parametrize("tech", ["prune_unstructured", "prune_structured"])
def test_ordinary_layers_keep_what_they_kept_before_the_floor(model_name, tech):
    for scope in ("layer", "global"):
        for sparsity in (0.5, 0.9, 0.95, 0.99):
            t, kept, said = _kept(model_name, tech, scope, sparsity)
            where = (model_name, tech, scope, sparsity)
            floored = scope == "layer" and tech == "prune_structured" and sparsity == 0.99
            if floored:
                assert kept == FLOORED[model_name], where
                assert [w for w in said if w.startswith(f"{tech}: ")], where
                continue
            assert not [w for w in said if w.startswith(f"{tech}: ")], (where, said)
            if scope == "layer":  # the rounding alone, as before the floor (global scope's code is unchanged)
                assert kept == {k: round(m.hard.numel() * (1 - sparsity)) for k, m in t.masks.items()}, where
                assert kept == LAYER_COUNTS[(model_name, tech)][sparsity], where


def test_at_target_counts_the_floor():
    """Where the floor keeps groups less sparse than asked, the technique is still at its target once its
    masks are final (compress picks its best checkpoint among epochs at target)."""
    t, kept, _ = _kept("lenet300", "prune_structured", "layer", 0.99)
    assert kept == {"fc1": 15, "fc2": 5} and t.at_target()
    t, kept, _ = _kept("lenet300", "prune_unstructured", "layer", 0.99)
    assert t.at_target()

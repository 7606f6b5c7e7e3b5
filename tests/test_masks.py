import pytest
import torch
import torch.nn as nn

from jointcompress import compress, finalize
from jointcompress.techniques.masks import ScoredMask, allocate, topk_keep


def test_topk_keep_is_exact_with_ties():
    s = torch.zeros(10, 10)  # all tied
    assert int(topk_keep(s, 37).sum()) == 37


def test_layer_allocation_hits_each_layer():
    scores = [torch.rand(300, 64), torch.rand(100, 300), torch.rand(10, 100)]
    keeps = allocate(scores, 0.9, "layer", 0.0)
    for s, k in zip(scores, keeps):
        assert int(k.sum()) == round(s.numel() * 0.1)


def test_global_allocation_is_exact_and_keeps_minimum():
    scores = [torch.rand(300, 64) * 10, torch.rand(100, 300), torch.rand(10, 100) * 0.01]
    keeps = allocate(scores, 0.95, "global", 0.05)
    total = sum(s.numel() for s in scores)
    assert sum(int(k.sum()) for k in keeps) == round(total * 0.05)
    assert int(keeps[2].sum()) >= 50  # the tiny-score layer still keeps 5%


def test_soft_mask_sharpens_to_exact_binary():
    m = ScoredMask(torch.randn(1000), learned=True)
    keep = topk_keep(m.scores, 100)
    m.set_keep(keep, temperature=0.5)
    soft = m.mask()
    assert ((soft > 0) & (soft < 1)).float().mean() > 0.9  # genuinely soft
    assert int((soft > 0.5).sum()) == 100  # its 0.5 level keeps exactly the top-k
    m.set_keep(keep, temperature=0.0)
    m.eval()
    hard = m.mask()
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and int(hard.sum()) == 100


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _fit(model, recipe, digits):
    from jointcompress.data import evaluator

    return compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test))


def test_unstructured_per_layer_sparsity_is_exactly_the_target(digits):
    model = _mlp()
    recipe = {"training": {"epochs": 2, "batch_size": 128},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.8, "scope": "layer", "criterion": "learned", "end": 0.5}]}
    res = _fit(model, recipe, digits)
    for name in ("1", "3"):
        layer = dict(model.named_modules())[name]
        w = layer.weight.detach()
        assert int((w == 0).sum()) == w.numel() - round(w.numel() * 0.2), name
    mask = res.techniques[0].masks["1"]
    assert float(mask.temperature) == 0.0
    assert set(mask.hard.unique().tolist()) == {0.0, 1.0}


def test_unstructured_global_sparsity_is_exactly_the_target(digits):
    model = _mlp()
    recipe = {"training": {"epochs": 2}, "techniques": [{"type": "prune_unstructured", "sparsity": 0.9, "scope": "global"}]}
    _fit(model, recipe, digits)
    finalize(model)
    ws = [model[1].weight, model[3].weight]
    total = sum(w.numel() for w in ws)
    assert sum(int((w == 0).sum()) for w in ws) == total - round(total * 0.1)
    assert not any("parametrizations" in k for k in model.state_dict())


def test_structured_pruning_shrinks_layers_and_keeps_function(digits):
    from jointcompress.data import accuracy
    from jointcompress.models import SmallResNet

    torch.manual_seed(0)
    model = SmallResNet(width=8)
    recipe = {"training": {"epochs": 1, "batch_size": 256},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}]}
    res = _fit(model, recipe, digits)
    model.eval()
    x = digits.x_test[:32]
    before = model(x).detach()
    acc_before = accuracy(model, digits.x_test, digits.y_test)
    finalize(model, res.example_inputs)
    after = model(x).detach()
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    assert accuracy(model, digits.x_test, digits.y_test) == acc_before
    # residual coupling: the stem and every block output in the first stage shrink together
    assert model.stem.out_channels == model.bn.num_features == model.layer1.conv2.out_channels == model.layer1.bn2.num_features == 4
    assert model.layer1.conv1.in_channels == 4 and model.layer1.conv1.out_channels == 4
    assert model.fc.out_features == 10  # the classifier's outputs are never pruned


def _frozen_backbone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    for layer in (model[0], model[2]):
        for p in layer.parameters():
            p.requires_grad_(False)
    x = torch.randn(256, 20, generator=torch.Generator().manual_seed(1))
    return model, x, x[:, :4].argmax(1)


def test_a_frozen_backbone_is_pruned_structurally_and_stays_frozen(tmp_path):
    """The channel graph is traced through autograd, which recorded nothing of frozen layers fed by
    inputs that need no gradient: every frozen layer was refused as 'coupled with a layer that is
    not pruned'. Freezing is about training, not structure: the layers shrink and stay frozen,
    in the finalized model and in the one loaded from the artifact."""
    from jointcompress.artifact import load, save

    model, x, y = _frozen_backbone()
    recipe = {"training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}]}
    res = compress(model, recipe, (x, y), lambda m: {"accuracy": 0.0})
    model.eval()
    before = model(x[:16]).detach()
    spec = finalize(model, res.example_inputs)
    assert model[0].out_features == model[2].in_features == 32 and model[2].out_features == model[4].in_features == 32
    assert torch.allclose(model(x[:16]), before, atol=1e-5)
    frozen = [False, False, False, False, True, True]
    assert [p.requires_grad for p in model.parameters()] == frozen
    save(model, spec, tmp_path / "a", example_inputs=res.example_inputs)
    loaded = load(tmp_path / "a", lambda: _frozen_backbone()[0])
    assert [p.requires_grad for p in loaded.parameters()] == frozen
    assert torch.allclose(loaded(x[:16]), before, atol=1e-5)


def test_frozen_weights_are_masked_and_quantized_but_not_trained():
    model, x, y = _frozen_backbone()
    first = model[0].weight.detach().clone()
    recipe = {"training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.8}, {"type": "quant_lsq", "bits": 4}]}
    res = compress(model, recipe, (x, y), lambda m: {"accuracy": 0.0})
    assert torch.equal(model[0].parametrizations.weight.original, first)  # the optimizer never moved it
    finalize(model, res.example_inputs)
    kept = model[0].weight != 0
    assert abs(float(kept.float().mean()) - 0.2) < 0.01
    for row in model[0].weight:  # each row on its channel's 4-bit grid: at most levels +-1..+-7
        assert len(torch.unique(row[row != 0])) <= 14
    assert not model[0].weight.requires_grad and model[4].weight.requires_grad


def test_a_structured_layer_sparsity_naming_no_group_is_warned():
    import jointcompress

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "scope": "layer", "layer_sparsity": {"0": 0.5, "fc_1": 0.5}}]}
    with pytest.warns(UserWarning, match=r"layer_sparsity names 'fc_1', no channel group it prunes.*its groups: 0\)"):
        jointcompress.prepare(model, recipe, total_steps=4, example_inputs=torch.randn(2, 8))


def test_a_bare_layer_as_the_model_is_pruned_to_its_sparsity():
    """prepare(nn.Linear(...)) with prune_unstructured failed inside torch ("module name can't be empty string"):
    the model itself is the layer, and its mask's key was its name, ''."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x, y = torch.randn(64, 16), torch.randint(0, 8, (64,))
    compress(layer, {"techniques": [{"type": "prune_unstructured", "sparsity": 0.75, "scope": "layer"}],
                     "training": {"epochs": 2, "batch_size": 16}}, (x, y), lambda m: 0.0)
    finalize(layer)
    assert int((layer.weight == 0).sum()) == 96  # 75% of 128

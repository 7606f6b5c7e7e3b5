"""prune_blocks together with prune_structured: a residual block removed whole while channels are
removed around it. The trunk channel group runs through the dropped block (its last conv adds into
the trunk); its name and finalize's root must be a layer that stays, and the same name the model
without the block gives it (what the latency allocator keys `layer_sparsity` by)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jointcompress.api import compress
from jointcompress.artifact import store
from jointcompress.block_drop import allocation_base
from jointcompress.data import evaluator
from jointcompress.finalize import finalize
from jointcompress.graph import discover_groups

X2 = torch.randn(2, 1, 8, 8)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResCNN(nn.Module):
    """The re-check's model: the trunk group is traced with `block1.c2` as its root."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Block(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block2 = Block(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(self.pool(x).view(x.size(0), -1))


def _build():
    torch.manual_seed(1)
    return ResCNN()


def _recipe(**structured):
    return {"mode": "joint", "training": {"epochs": 1, "batch_size": 32, "lr": 2e-3, "seed": 0},
            "techniques": [{"type": "prune_structured", "criterion": "magnitude", "sparsity": 0.5, **structured},
                           {"type": "distill_kd", "temperature": 4.0, "alpha": 0.7},
                           {"type": "prune_blocks", "blocks": ["block1"], "end": 0.5}]}


def _run(recipe):
    torch.manual_seed(0)
    model, x, y = _build(), torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    res = compress(model, recipe, (x, y), evaluator(x[:32], y[:32]), teacher=copy.deepcopy(model).eval())
    return model, res, x


def test_the_trunk_group_is_named_as_the_model_without_the_block_names_it():
    full = {g.name for g in discover_groups(_build(), X2)[0]}
    base = {g.name for g in discover_groups(allocation_base(_build(), _recipe(), X2), X2)[0]}
    assert "block1.c2" in full and "block1.c2" not in base and "stem.0" in base  # the premise of this file
    model, res, _ = _run(_recipe())
    prune = next(t for t in res.techniques if t.kind == "prune_structured")
    names = {g.name for g in prune.groups}
    # the groups that reach the trunk take the block-less names; block1.c1's own group stays (masked while the
    # block fades, as before: the stored runs with a dropped block trained so) and leaves with the block
    assert names == base | {"block1.c1"}


def test_blocks_and_channels_finalize_shrinks_keeps_the_logits_and_the_artifact_loads(tmp_path):
    model, res, x = _run(_recipe())
    model.eval()
    with torch.no_grad():
        masked = model(x[:16])
    with warnings.catch_warnings():  # the parity check read its outputs with gradients on: torch warned each finalize
        warnings.filterwarnings("error", message="Converting a tensor with requires_grad")
        spec = finalize(model, res.example_inputs)
    assert isinstance(model.block1, nn.Identity) and spec.dropped_blocks == ["block1"]
    assert not any(n.startswith("block1.") for n, _ in model.named_parameters())
    assert model.stem[0].weight.shape[0] == 8 and model.down[0].weight.shape[1] == 8  # the trunk really shrunk
    assert model.block2.c1.weight.shape[0] == 16 and model.fc.weight.shape == (10, 16)  # the classes are kept
    with torch.no_grad():
        torch.testing.assert_close(model(x[:16]), masked, atol=1e-5, rtol=0)
    store.save(model, spec, tmp_path / "art", example_inputs=res.example_inputs, builder=_build)
    loaded = store.load(tmp_path / "art", _build)
    assert isinstance(loaded.block1, nn.Identity) and loaded.stem[0].weight.shape[0] == 8
    with torch.no_grad():
        assert torch.equal(loaded(x[:16]), model(x[:16]))


def test_a_per_group_sparsity_keyed_by_the_block_less_name_applies_to_that_group():
    base_groups = {g.name: g.channels for g in discover_groups(allocation_base(_build(), _recipe(), X2), X2)[0]}
    assert base_groups["stem.0"] == 16
    model, res, x = _run(_recipe(scope="layer", layer_sparsity={"stem.0": 0.75, "block2.c1": 0.25}))
    prune = next(t for t in res.techniques if t.kind == "prune_structured")
    kept = {g.name: int(prune.masks[g.name.replace(".", "__")].hard.sum()) for g in prune.groups}
    # block2.c2 and block1.c1 (inside the dropped block): unlisted, the overall 0.5
    assert kept == {"stem.0": 4, "block2.c1": 24, "block2.c2": 16, "block1.c1": 8}
    model.eval()
    with torch.no_grad():
        masked = model(x[:16])
    finalize(model, res.example_inputs)
    assert model.stem[0].out_channels == 4 and model.block2.c1.out_channels == 24
    assert model.block2.c2.out_channels == 16 and model.down[0].out_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(model(x[:16]), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("blocks", [["block2"], ["block1", "block2"]])
def test_other_blocks_dropped_with_channels_keep_the_logits(blocks):
    recipe = _recipe()
    recipe["techniques"][2]["blocks"] = blocks
    model, res, x = _run(recipe)
    model.eval()
    with torch.no_grad():
        masked = model(x[:16])
    spec = finalize(model, res.example_inputs)
    assert spec.dropped_blocks == blocks
    with torch.no_grad():
        torch.testing.assert_close(model(x[:16]), masked, atol=1e-5, rtol=0)


def test_a_block_dropped_from_the_first_step_still_lets_the_group_feeding_it_shrink():
    """prune_blocks `end: 0` fades the block fully (the identity) before prune_structured traces its groups; a
    trace at fade 1 never reached the block's layers, so the stem's removal left block1.c1 reading 16 channels of
    8, its check failed and the allocated stem cut was skipped (with a warning only). The block still runs while
    it fades: the graph is traced with it whole, and the stem shrinks to its width, logits unchanged."""
    recipe = _recipe(scope="layer", layer_sparsity={"stem.0": 0.75})
    recipe["techniques"][2]["end"] = 0.0
    model, res, x = _run(recipe)
    prune = next(t for t in res.techniques if t.kind == "prune_structured")
    assert "stem.0" not in {name for name, _ in prune.skipped}
    assert int(prune.masks["stem__0"].hard.sum()) == 4
    model.eval()
    with torch.no_grad():
        masked = model(x[:16])
    spec = finalize(model, res.example_inputs)
    assert spec.dropped_blocks == ["block1"] and isinstance(model.block1, nn.Identity)
    assert model.stem[0].out_channels == 4 and model.stem[1].num_features == 4 and model.down[0].in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x[:16]), masked, atol=1e-5, rtol=0)


def test_the_channel_groups_do_not_depend_on_how_far_a_block_has_faded():
    """The groups traced at fade 1 are those at fade 0 (block_drop.traced_whole), and the fade is left as it was."""
    from jointcompress.block_drop import BlockFade

    def groups_at(fade):
        model, hook = _build(), BlockFade("block1")
        model.block1.register_forward_hook(hook)
        hook.fade = fade
        groups = discover_groups(model, X2)[0]
        assert hook.fade == fade
        return {g.name: sorted((m.module, m.kind) for m in g.members) for g in groups}

    whole = groups_at(0.0)
    assert any(("block1.c1", "in") in members for members in whole.values())
    assert groups_at(1.0) == whole


def test_save_takes_the_example_inputs_finalize_traced_with(tmp_path):
    """A loop that gave prepare() its example_inputs had to give them to save() again for a model whose channels
    finalize removed ("save() needs example_inputs to record how to replay the pruning history")."""
    from jointcompress.artifact import load, save
    from session_helpers import train_in_own_loop

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 3))

    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    model = build()
    spec = train_in_own_loop(model, {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}]},
                             x, y, steps=3).finalize()
    assert spec.pruning_history and model[0].out_channels < 8
    save(model, spec, tmp_path / "a", builder=build)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a", build)(x), model.eval()(x))

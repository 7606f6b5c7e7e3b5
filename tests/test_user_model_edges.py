"""A user's own model and recipe at the edges, each once a raw error or a silent loss: a parametrization
of their own on another layer, a sparse embedding, a layer pruned but not quantized, a module's extra
state, a graph ONNX Runtime refuses, uint8 images into a convolution, the recipe missing from the
manifest, per-layer settings naming no layer, two entries of one technique on the same layer."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

from jointcompress import compress, finalize
from jointcompress.artifact import load, save
from jointcompress.errors import ArtifactError, DataError, UnsupportedModelError
from session_helpers import train_in_own_loop


def _with_weight_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    weight_norm(model[2])  # no technique selects the transposed convolution
    return model


def test_a_users_own_parametrization_on_an_untouched_layer_survives_finalize_and_the_artifact(tmp_path):
    """finalize removed it too, so the saved state's keys no longer matched the builder's model: load failed."""
    torch.manual_seed(0)
    model, x = _with_weight_norm(), torch.randn(16, 3, 8, 8)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    session = train_in_own_loop(model, recipe, x, torch.arange(len(x)) % 4, steps=4)
    with torch.no_grad():
        trained = model.eval()(x)
    spec = session.finalize(x[:2])
    assert "2.parametrizations.weight.original0" in model.state_dict()
    save(model, spec, tmp_path, builder=_with_weight_norm, example_inputs=x[:2])
    with torch.no_grad():
        assert torch.equal(model(x), trained)
        assert torch.equal(load(tmp_path, _with_weight_norm)(x), trained)


def test_a_sparse_embedding_is_refused_by_the_built_in_loop_naming_the_table():
    class Recommender(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.fc = nn.Embedding(50, 16, sparse=True), nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc(self.table(ids).mean(1))

    x, y = torch.randint(0, 50, (32, 5)), torch.randint(0, 4, (32,))
    with pytest.raises(UnsupportedModelError, match=r"table: an embedding with sparse=True .* set sparse=False"):
        compress(Recommender(), {"techniques": [{"type": "quant_lsq", "bits": 4}]}, (x, y), lambda m: {})


def test_pruning_a_layer_that_is_not_quantized_warns_that_the_file_keeps_it_dense():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    for recipe, expected in (([{"type": "prune_unstructured", "sparsity": 0.9, "end": 0.5}], 2),
                             ([{"type": "prune_unstructured", "sparsity": 0.9, "end": 0.5}, {"type": "quant_lsq", "bits": 4}], 0),
                             ([{"type": "prune_unstructured", "sparsity": 0.0}], 0)):  # no zeros: nothing to say
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        session = train_in_own_loop(model, {"techniques": recipe}, x, torch.arange(len(x)) % 4, steps=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session.finalize()
        said = [str(w.message) for w in caught if "are not quantized" in str(w.message)]
        assert len(said) == min(expected, 1) and (not said or f"{expected} pruned layer(s)" in said[0])


def test_a_modules_extra_state_is_refused_by_save_naming_the_key(tmp_path):
    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x)

        def get_extra_state(self):
            return {"vocab": ["a", "b"]}

        def set_extra_state(self, state):
            pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), WithState())
    spec = finalize(model)
    with pytest.raises(ArtifactError, match=r"2\._extra_state: the model's state dict holds a dict .*get_extra_state"):
        save(model, spec, tmp_path / "a")
    # compress() met it in its first snapshot, after an epoch, with "'dict' object has no attribute 'detach'"
    from jointcompress.errors import RecipeError

    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with pytest.raises(RecipeError, match=r"2\._extra_state: the model's state dict holds a dict .*prepare\(\) carries it"):
        compress(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), WithState()),
                 {"techniques": [{"type": "quant_lsq", "bits": 8}]}, (x, y), lambda m: 0.0)
    from session_helpers import train_in_own_loop  # a loop of the user's has no snapshots: it trains

    own = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), WithState())
    train_in_own_loop(own, {"techniques": [{"type": "quant_lsq", "bits": 8}]}, x, y, steps=2).finalize()
    assert own.state_dict()["2._extra_state"] == {"vocab": ["a", "b"]}


def test_a_graph_onnx_runtime_refuses_is_a_clear_error(tmp_path):
    from jointcompress.deploy import export_and_check

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same", dilation=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    with pytest.raises(UnsupportedModelError, match=r"ONNX Runtime cannot run the exported graph .*Dilation"):
        export_and_check(model, tmp_path / "m.onnx", torch.randn(2, 3, 12, 12))


def test_uint8_images_into_a_convolution_are_told_the_conversion():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 3, 8, 8))
    x, y = torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(DataError, match=r"x\.float\(\) / 255 for uint8 images"):
        compress(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, (x, y), lambda m: {})


def test_result_finalize_keeps_the_recipe_in_the_artifacts_manifest(tmp_path):
    """The README's quick start (finalize(model, inputs), then save) wrote a manifest with recipe null."""
    from jointcompress.artifact import read_manifest

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :4].argmax(1)
    recipe = {"training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    result = compress(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), recipe, (x, y), lambda m: 0.0)
    spec = result.finalize()
    save(result.model, spec, tmp_path, example_inputs=result.example_inputs)
    recorded = read_manifest(tmp_path)["recipe"]
    assert recorded == result.recipe.model_dump() and recorded["techniques"][1]["bits"] == 4


@pytest.mark.parametrize("technique", [{"type": "prune_unstructured", "scope": "layer", "sparsity": 0.5,
                                        "layer_sparsity": {"fc_1": 0.9}},
                                       {"type": "quant_lsq", "bits": 4, "layer_bits": {"fc_1": 8}}])
def test_a_per_layer_setting_naming_no_layer_is_refused(technique):
    """A typo in layer_sparsity / layer_bits was ignored: the layer ran at the default."""
    from jointcompress.errors import RecipeError

    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(8, 16))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(16, 4))
    x, y = torch.randn(16, 8), torch.zeros(16, dtype=torch.long)
    with pytest.raises(RecipeError, match=r"names 'fc_1', not a layer it compresses; those are 'fc1', 'fc2'"):
        compress(model, {"techniques": [technique]}, (x, y), lambda m: 0.0)


def test_two_entries_of_one_technique_on_the_same_layer_are_refused():
    """Two prune_unstructured entries (0.5 and 0.7) on the same layers ran to 70% without a word."""
    from jointcompress.errors import RecipeError

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(16, 8), torch.zeros(16, dtype=torch.long)
    both = [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "prune_unstructured", "sparsity": 0.7}]
    with pytest.raises(RecipeError, match=r"techniques\[0\] and techniques\[1\] \(prune_unstructured\) both select layer '0'"):
        compress(model, {"techniques": both}, (x, y), lambda m: 0.0)
    apart = [{**both[0], "targets": ["0"]}, {**both[1], "targets": ["2"]}]
    result = compress(model, {"techniques": apart, "training": {"epochs": 3, "batch_size": 4}}, (x, y), lambda m: 0.0)
    result.finalize()
    assert [float((result.model[i].weight == 0).float().mean()) for i in (0, 2)] == [0.5, pytest.approx(0.7, abs=0.02)]


def test_two_channel_pruning_entries_are_refused_by_the_recipe():
    """Two prune_structured entries on disjoint layers crashed in torch's deepcopy (the second traced a model
    the first had reparametrized), and the overlap refusal above pointed users there."""
    from jointcompress.errors import RecipeError
    from jointcompress.recipe import parse_recipe

    entries = [{"type": "prune_structured", "sparsity": 0.5, "targets": ["0"]},
               {"type": "prune_structured", "sparsity": 0.5, "targets": ["3"]}]
    with pytest.raises(RecipeError, match=r"'prune_structured' appears 2 times \(techniques.0, techniques.1\); use it once; per-group sparsities go in"):
        parse_recipe({"techniques": entries})


class _Lazy(nn.Module):
    """Lazy layers: sized on the first call."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.LazyLinear(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))


def test_a_model_of_lazy_layers_compresses_and_its_own_builder_loads_the_artifact(tmp_path):
    """A builder of lazy layers returns them unsized: save(builder=...) and load(path, builder) failed in torch's
    "Can't access the shape of an uninitialized parameter", so the artifact could never be loaded; the recorded
    example inputs now size them. prepare() without example_inputs, which attached nothing, names the layer."""
    from jointcompress import prepare
    from jointcompress.errors import RecipeError

    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}],
              "training": {"epochs": 1, "batch_size": 32}}
    model = _Lazy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compress(model, recipe, (x, y), lambda m: {"accuracy": 0.0})
    spec = result.finalize()
    with torch.no_grad():
        finalized = model.eval()(x)
    save(model, spec, tmp_path / "a", builder=_Lazy, example_inputs=x[:2])
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a", _Lazy)(x), finalized)
    with pytest.raises(RecipeError, match="'fc1.weight' belongs to a lazy layer that is not sized yet.*example_inputs"):
        prepare(_Lazy(), recipe, total_steps=4)
    save(model, spec, tmp_path / "b")  # finalize's batch recorded: save needs none of its own
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "b", _Lazy)(x), finalized)
    spec.example_inputs = None  # a spec finalized without example inputs: said at load, with the way to record them
    save(model, spec, tmp_path / "c")
    with pytest.raises(ArtifactError, match="lazy layers not sized yet .*save with example_inputs"):
        load(tmp_path / "c", _Lazy)


def test_load_makes_the_recorded_example_inputs_only_where_it_needs_them(tmp_path, monkeypatch):
    """Every load made zeros of the recorded example shape (of its whole batch) that only a pruning
    history's replay or a lazy layer uses."""
    import jointcompress.artifact.store as store

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    spec = finalize(model, torch.randn(2, 12))
    save(model, spec, tmp_path, example_inputs=torch.randn(2, 12))
    monkeypatch.setattr(store, "inputs_of_records", lambda *a, **k: pytest.fail("inputs made without a use"))
    assert torch.equal(load(tmp_path, lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)))[0].weight,
                       model[0].weight)


def test_an_expanded_buffer_is_refused_before_training():
    """A buffer registered as `t.expand(n)` (stride 0) trained to the end, then restoring the best epoch failed
    inside load_state_dict and the run was lost; it is named before training, with the fix. A non-persistent one,
    which no state dict holds, is no problem."""
    from jointcompress import prepare
    from jointcompress.errors import RecipeError

    class Offset(nn.Module):
        def __init__(self, persistent=True):
            super().__init__()
            self.fc = nn.Linear(12, 4)
            self.register_buffer("offset", torch.full((1,), 0.25).expand(4), persistent=persistent)

        def forward(self, x):
            return self.fc(x) + self.offset

    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5}], "training": {"epochs": 1}}
    calls = []
    with pytest.raises(RecipeError, match=r"'offset' is an expanded view .*\.clone\(\)"):
        compress(Offset(), recipe, (x, y), lambda m: calls.append(1) or {"accuracy": 0.0})
    assert not calls  # nothing trained or evaluated
    with pytest.raises(RecipeError, match="'offset' is an expanded view"):
        prepare(Offset(), recipe, total_steps=4)
    compress(Offset(persistent=False), recipe, (x, y), lambda m: 0.0)  # never loaded into: it trains as it is


class _DenseBlock(nn.Module):
    """DenseNet-like: concatenations feed a 1x1 convolution whose output a residual add ties to them, so that
    conv `c3`'s 48 outputs fall in three channel groups."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c2, self.c3 = nn.Conv2d(32, 16, 3, padding=1), nn.Conv2d(48, 48, 1)
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        x0 = torch.relu(self.stem(x))
        x01 = torch.cat([x0, torch.relu(self.c1(x0))], 1)
        x3 = torch.cat([x01, torch.relu(self.c2(x01))], 1)
        return self.head((torch.relu(self.c3(x3)) + x3).mean((2, 3)))


def test_a_layer_whose_outputs_several_channel_groups_share_keeps_one_step_per_kept_channel(tmp_path):
    """Channels and per-channel steps together: `c3`'s steps were trimmed a group at a time, each group's indices
    read against steps an earlier group had shortened, and finalize failed after training (32 steps for 24 kept
    channels; with no bias, save refused the spec instead)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    recipe = {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5},
                             {"type": "quant_lsq", "bits": 8}]}
    model = _DenseBlock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = train_in_own_loop(model, recipe, x, y, steps=4).finalize(x[:2])
    assert model.c3.out_channels < 48 and spec.layers["c3"].scale.numel() == model.c3.out_channels
    with torch.no_grad():
        finalized = model.eval()(x)
    save(model, spec, tmp_path / "a", builder=_DenseBlock, example_inputs=x[:2])
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a", _DenseBlock)(x), finalized)


def test_a_torchscript_model_is_refused_naming_the_eager_module():
    """compress() of a torch.jit.script'ed model failed in a check with "'OrderedDictWrapper' object has no
    attribute 'get'"; prepare() too."""
    from jointcompress import prepare

    scripted = torch.jit.script(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)))
    x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 4}], "training": {"epochs": 1}}
    with pytest.raises(UnsupportedModelError, match="TorchScript module .*Pass the nn.Module it was made from"):
        compress(scripted, recipe, (x, y), lambda m: {"accuracy": 0.0})
    with pytest.raises(UnsupportedModelError, match="TorchScript module"):
        prepare(scripted, recipe, total_steps=2)


def test_a_batch_larger_than_the_training_set_is_said():
    """batch_size 100,000 on 1,348 images trained one step an epoch, without a word."""
    x, y = torch.randn(40, 6), torch.randint(0, 2, (40,))
    recipe = {"techniques": [{"type": "quant_lsq", "bits": 8}], "training": {"epochs": 1, "batch_size": 64}}
    with pytest.warns(UserWarning, match=r"training.batch_size 64 is more than the 40 training samples: each epoch is one step"):
        compress(nn.Sequential(nn.Linear(6, 2)), recipe, (x, y), lambda m: {"accuracy": 0.0})

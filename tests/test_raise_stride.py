"""raise_stride: a convolution's stride raised so every later map is smaller; finalize records it, the
artifact stores it, load sets it again, and a model whose head needs the full-size maps is refused."""
import json

import pytest
import torch

from jointcompress import compress
from jointcompress.artifact.store import load, manifest_digest, save
from jointcompress.bench import count_macs
from jointcompress.data import evaluator
from jointcompress.errors import ArtifactError, RecipeError, UnsupportedModelError
from jointcompress.finalize import finalize
from jointcompress.models import LeNet5, SmallResNet
from jointcompress.recipe import parse_recipe
from jointcompress.spec import PRIOR_STRUCTURE
from jointcompress.strides import raise_stride

X = torch.randn(2, 1, 28, 28)


def test_the_stem_at_stride_2_quarters_every_later_map():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    dense = count_macs(model, X)
    assert raise_stride(model, X, None, 2) == {"stem": [2, 2]}  # the first stride-1 convolution
    assert model.stem.stride == (2, 2) and model(X).shape == (2, 10)
    assert 0.2 < count_macs(model, X) / dense < 0.3  # every conv after the stem sees a quarter of the positions


def test_a_head_that_needs_the_full_maps_is_refused_and_the_model_left_as_built():
    model = LeNet5()
    with pytest.raises(UnsupportedModelError, match=r"'conv1' at stride 2.*a flatten into a Linear"):
        raise_stride(model, X, None, 2)
    assert model.conv1.stride == (1, 1) and model(X).shape == (2, 10)
    with pytest.raises(UnsupportedModelError, match=r"layer 'fc' is a Linear"):
        raise_stride(SmallResNet(), X, "fc", 2)
    with pytest.raises(UnsupportedModelError, match=r"'layer2.conv1' already runs at stride \(2, 2\); give a stride above 2"):
        raise_stride(SmallResNet(), X, "layer2.conv1", 2)  # a raise that would change nothing (or lower it) is refused
    with pytest.raises(UnsupportedModelError, match=r"layer 'nope' is not a module"):
        raise_stride(SmallResNet(), X, "nope", 2)


def test_a_convolution_on_a_1x1_map_is_not_the_default_and_is_refused_by_name():
    """MobileNetV3's first stride-1 convolution is a squeeze-and-excitation block's, after global pooling: the
    default raised it, changing nothing, while dry-run promised every later map half as long and the spec
    recorded the stride."""
    import torch.nn as nn

    class SqueezeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.se = nn.Conv2d(8, 8, 1)
            self.body = nn.Conv2d(8, 16, 3, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
            return self.fc(self.body(x).mean((2, 3)))

    model = SqueezeFirst().eval()
    assert raise_stride(model, X, None, 2) == {"body": [2, 2]} and model.se.stride == (1, 1)
    with pytest.raises(UnsupportedModelError, match=r"'se' gives a 1x1 map on the example input, which no stride"):
        raise_stride(SqueezeFirst(), X, "se", 2)


def test_a_target_is_allocated_for_the_downsampled_model():
    from jointcompress.block_drop import allocation_base

    model = SmallResNet()
    recipe = {"techniques": [{"type": "raise_stride"}, {"type": "prune_blocks", "blocks": ["layer1"]}]}
    base = allocation_base(model, recipe, X)
    assert base.stem.stride == (2, 2) and not hasattr(base.layer1, "conv1")  # the latency tables' model
    assert model.stem.stride == (1, 1) and hasattr(model.layer1, "conv1")  # the user's model is not touched
    assert allocation_base(model, {"techniques": [{"type": "raise_stride", "stride": 4}]}, X).stem.stride == (4, 4)


def test_the_recipe_checks_its_fields():
    with pytest.raises(RecipeError, match="stride"):
        parse_recipe({"techniques": [{"type": "raise_stride", "stride": 1}]})
    with pytest.raises(RecipeError, match="'raise_stride' appears 2 times"):
        parse_recipe({"techniques": [{"type": "raise_stride"}, {"type": "raise_stride", "layer": "stem"}]})


@pytest.fixture(scope="module")
def strided_run():
    """A short joint run (raise_stride + channels + 8-bit LSQ + KD) of the small ResNet, finalized."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    teacher, model = SmallResNet().eval(), SmallResNet()
    model.load_state_dict(teacher.state_dict())
    recipe = {"techniques": [{"type": "raise_stride"}, {"type": "prune_structured", "sparsity": 0.5, "end": 0.5},
                             {"type": "quant_lsq", "bits": 8, "start": 0.3}, {"type": "distill_kd"}],
              "training": {"epochs": 1, "batch_size": 32}}
    res = compress(model, recipe, (x, y), evaluator(x[:32], y[:32]), teacher=teacher)
    model.eval()
    with torch.no_grad():
        masked = model(x[:8])
    spec = finalize(model, res.example_inputs)
    return model, spec, res.example_inputs, x[:8], masked


def test_a_run_trains_the_strided_model_and_finalize_keeps_its_logits(strided_run):
    model, spec, _, x, masked = strided_run
    assert spec.strides == {"stem": [2, 2]} and model.stem.stride == (2, 2)
    assert model.layer1.conv1.out_channels == 8  # channels removed as well
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)


def test_the_artifact_stores_the_stride_and_load_sets_it_again(strided_run, tmp_path):
    model, spec, example, x, _ = strided_run
    manifest = save(model, spec, tmp_path / "a", builder=SmallResNet, example_inputs=example)
    assert manifest["strides"] == {"stem": [2, 2]}
    loaded = load(tmp_path / "a", SmallResNet)
    assert loaded.stem.stride == (2, 2) and getattr(loaded, PRIOR_STRUCTURE)["strides"] == {"stem": [2, 2]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    again = finalize(loaded, example)  # a further run's finalize keeps the stride in its spec
    assert again.strides == {"stem": [2, 2]}


@pytest.mark.parametrize("strides, words", [({"stem": [0, 2]}, r"field strides\['stem'\]\[0\]"),
                                            ({"stem": "2"}, r"field strides\['stem'\] must be a list"),
                                            ({"layer1": [2, 2]}, r"layer 'layer1' is a BasicBlock")])
def test_a_manifest_with_bad_strides_is_refused(strided_run, tmp_path, strides, words):
    model, spec, example, _, _ = strided_run
    save(model, spec, tmp_path / "a", example_inputs=example)
    path = tmp_path / "a" / "manifest.json"
    m = json.loads(path.read_text())
    m["strides"] = strides
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=words):
        load(tmp_path / "a", SmallResNet)

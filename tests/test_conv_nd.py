"""1-D and 3-D convolutions (audio and sensor series, video) are compressed like Conv2d.

The stage-by-stage parity (compress -> finalize -> save -> load -> ONNX) runs in the
architecture matrix (tests/test_arch_matrix.py, architectures `conv1d` and `conv3d`); here:
what a user of such a model also relies on beyond the matrix.
"""
import math

import pytest
import torch
import torch.nn as nn

from arch_models import build, data
from jointcompress import compress, finalize
from jointcompress.bench import count_macs
from jointcompress.graph import discover_groups
from jointcompress.latency_targets import _rebuilt, layer_sites


@pytest.mark.parametrize("arch", ["conv1d", "conv3d"])
def test_the_joint_mode_selects_every_convolution(arch):
    """Before, only the Linear head was selected: a size target on a Conv1d model was refused as
    unreachable, its convolutions counted as stored as they are."""
    model = build(arch)
    x, y = data(arch)
    recipe = {"mode": "joint", "target": {"ratio": 6}, "training": {"epochs": 1, "batch_size": 4},
              "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    res = compress(model, recipe, (x, y), lambda m: 0.0)
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d))}
    assert convs and convs <= set(res.techniques[0].quantizers)


def test_structured_groups_follow_the_residual_and_batchnorm1d():
    """The residual addition couples the stem and the block's last conv; BatchNorm1d rides with its conv."""
    model = build("conv1d")
    groups, _ = discover_groups(model, data("conv1d")[0][:2])
    members = {g.name: {m.module for m in g.members} for g in groups}
    coupled = next(ms for ms in members.values() if "stem.0" in ms)
    assert {"stem.0", "stem.1", "block.3", "block.4"} <= coupled, members


def test_int8_onnxruntime_keeps_a_shrunk_conv1d_model(tmp_path):
    from jointcompress.deploy.int8 import int8_parity, quantize_int8

    model = build("conv1d")
    x, y = data("conv1d", n=32)
    recipe = {"training": {"epochs": 1, "batch_size": 8},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": "magnitude", "end": 0.5},
                             {"type": "quant_lsq", "bits": 8}]}
    res = compress(model, recipe, (x, y), lambda m: 0.0)
    spec = finalize(model, res.example_inputs)
    assert model.stem[0].out_channels < 24  # channels really removed
    int8 = quantize_int8(model, spec, (x, y), x[:1], workdir=tmp_path)
    assert int8.trained_scales >= 3  # the trained per-channel steps reach the int8 weights
    report = int8_parity(model, int8, (x, y))
    with torch.no_grad():
        assert report.max_abs_logit_diff <= 0.1 * float(model.eval()(x).abs().max())


@pytest.mark.parametrize("arch", ["conv1d", "conv3d"])
def test_macs_count_every_kernel_axis(arch):
    model = build(arch)
    x = data(arch, n=1)[0]
    expected = 0
    hooks = []

    def by_hand(mod, inp, out):
        nonlocal expected
        per_out = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels // mod.groups * math.prod(mod.kernel_size)
        expected += out.numel() * per_out

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(by_hand))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert count_macs(model, x) == expected > 0


@pytest.mark.parametrize("arch", ["conv1d", "conv3d"])
def test_latency_tables_rebuild_the_same_convolution(arch):
    """The latency allocator times each layer alone at other widths: a Conv1d is rebuilt as a Conv1d."""
    model = build(arch)
    x = data(arch, n=2)[0]
    groups, _ = discover_groups(model, x)
    site = layer_sites(model, x, groups)["block.0"]
    layer, shape = _rebuilt(site, site.cin, site.cout // 2)
    assert type(layer) is type(model.block[0])
    out = layer(torch.randn(1, *shape))
    full = model.block[0](torch.randn(1, *shape))
    assert out.shape[1] == site.cout // 2 and out.shape[2:] == full.shape[2:]


def test_hidden_states_of_a_conv1d_stack_are_matched_over_channels():
    """[batch, channels, length] maps from a Conv1d stack: the feature axis is the channels (a 1x1
    Conv1d maps a narrower student onto the teacher), not the length as for [batch, tokens, hidden]."""
    from jointcompress.techniques.distill_kd import _projection, feature_axis, feature_loss

    model = build("conv1d")
    x = data("conv1d", n=2)[0]
    with torch.no_grad():
        maps = model.stem[:2](x)  # conv + BatchNorm1d, before the ReLU (no all-zero position)
    assert feature_axis(model.stem, maps) == 1
    tokens = torch.randn(2, 5, 8)
    assert feature_axis(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), tokens) == -1
    proj = _projection(12, maps.shape[1], spatial_dims=1)
    assert isinstance(proj, nn.Conv1d)
    student = proj(maps[:, :12])
    assert student.shape == maps.shape
    # cosine over channels: a map scaled per position is perfectly aligned, one scaled per channel is not
    per_position = maps * torch.linspace(0.5, 2.0, maps.shape[2])
    assert float(feature_loss(per_position, maps, "cosine", axis=1)) < 1e-6
    assert float(feature_loss(per_position, maps, "cosine", axis=-1)) > 1e-3


def test_transposed_convolutions_are_named_as_left_in_fp32():
    """A transposed convolution ([in, out / groups, *kernel]) is a layer type no technique compresses:
    the run warns with its name, and a size target under its bytes is refused naming it."""
    import warnings

    from jointcompress.targets import TargetError

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 8, 2, stride=2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.up(x)).mean((2, 3)))

    torch.manual_seed(0)
    x, y = torch.randn(16, 4, 3, 3), torch.randint(0, 3, (16,))
    plain = {"training": {"epochs": 1, "batch_size": 8}, "techniques": [{"type": "quant_lsq", "bits": 8}]}
    with pytest.warns(UserWarning, match=r"transposed convolutions .*\('up'\): they are stored in fp32"):
        compress(Decoder(), plain, (x, y), lambda m: 0.0)
    joint = {"mode": "joint", "target": {"ratio": 8}, "training": {"epochs": 1, "batch_size": 8},
             "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TargetError, match=r"up.weight 512 B.*transposed convolutions .*\('up'\)"):
            compress(Decoder(), joint, (x, y), lambda m: 0.0)


def test_weights_of_other_modules_are_named_once_and_listed_by_dry_run(monkeypatch, capsys):
    """A layer's own nn.Parameter (called with F.linear) and an nn.Bilinear held 99.9% of a model: pruning at 0.9
    reported 0.901 on the head it did select, the file was 0.05% under fp32, and nothing said so; dry-run's table of
    the layers not pruned left out transposed convolutions and these."""
    import warnings

    import jointcompress
    from jointcompress.commands.dryrun_cmd import _tables
    from jointcompress.conversions import other_weights

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 16))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.own, self.bil, self.head = Own(), nn.Bilinear(64, 64, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.own(x))
            return self.head(self.bil(h, h))

    names, share = other_weights(Net())
    assert names == ["bil", "own"] and share > 0.99
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = Net()
        jointcompress.prepare(model, {"techniques": [{"type": "prune_unstructured", "sparsity": 0.9},
                                                     {"type": "quant_lsq", "bits": 4}]},
                              total_steps=4, example_inputs=torch.randn(2, 16))
    assert other_weights(model)[0] == ["bil", "own"]  # the quantizer's per-channel steps are not named
    hints = [str(w.message) for w in said if "no technique acts on" in str(w.message)]
    assert len(hints) == 1 and "('bil' and 1 more): they are stored in fp32, whole (100% of" in hints[0], hints
    _, _, _, skipped = _tables("net", Net(), torch.randn(1, 16), ("*",), ())
    assert {"bil", "own"} <= {name for name, _ in skipped}
    small = nn.Sequential(nn.Linear(16, 64), Own(), nn.Linear(64, 3))  # 64x16 of 2,371 parameters: not named
    small[1].weight = nn.Parameter(torch.randn(2, 16))
    assert other_weights(small)[0] == []

"""Structured pruning never prunes channels whose removal would change the logits at finalize.

Each model here has one hidden block whose channels pass through something where a zeroed
channel and a removed one differ (a normalization over the channels, a functional norm,
a residual from the model input, an embedding, a loose parameter); its group must be left
out with a reason that names the module, while a plain hidden block stays prunable, and
compress -> finalize must give the masked model's logits.
"""
import functools

import pytest
import torch
import torch.nn as nn

from jointcompress import compress, finalize
from jointcompress.errors import JointCompressError, UnsupportedModelError
from jointcompress.graph import build_graph, discover_groups


class Block(nn.Module):
    """fc1 -> (something over fc1's channels) -> fc2, next to a plain fc3 -> relu -> fc4 branch."""

    def __init__(self, inner: str):
        super().__init__()
        torch.manual_seed(0)
        self.inner = inner
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.fc3, self.fc4 = nn.Linear(8, 12), nn.Linear(12, 4)
        norms = {"layernorm": nn.LayerNorm(16), "rmsnorm": nn.RMSNorm(16), "groupnorm": nn.GroupNorm(4, 16),
                 "batchnorm_no_affine": nn.BatchNorm1d(16, affine=False)}
        self.norm = norms.get(inner, nn.Identity())
        self.scale = nn.Parameter(torch.zeros(16)) if inner == "parameter" else None

    def forward(self, x):
        h = self.fc1(x)
        if self.inner == "functional":  # a hand-written norm: no module to see, only the trace
            h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, keepdim=True) + 1e-5).sqrt()
        elif self.inner == "parameter":
            h = h + self.scale
        else:
            h = self.norm(h)
        return self.fc2(torch.relu(h)) + self.fc4(torch.relu(self.fc3(x)))


def _skipped(model, x):
    groups, skipped = discover_groups(model, x)
    return [g.name for g in groups], dict(skipped)


@pytest.mark.parametrize("inner, named", [
    ("layernorm", "LayerNorm 'norm'"), ("rmsnorm", "RMSNorm 'norm'"), ("groupnorm", "GroupNorm 'norm'"),
    ("parameter", "parameter 'scale'"), ("functional", "zeroed and removed channels disagree"),
    ("batchnorm_no_affine", "BatchNorm1d 'norm' has no weight and bias (affine=False)"),
])
def test_group_through_channel_mixing_op_is_left_out_with_reason(inner, named):
    model = Block(inner)
    groups, skipped = _skipped(model, torch.randn(2, 8))
    assert "fc3" in groups, "the plain branch stays prunable"
    assert "fc1" not in groups and named in skipped["fc1"], skipped


def test_plain_block_is_prunable():
    groups, _ = _skipped(Block("identity"), torch.randn(2, 8))
    assert {"fc1", "fc3"} <= set(groups)


class InputResidual(nn.Module):
    """y = head(x + fc2(relu(fc1(x)))): fc2's channels are the input's, which cannot be removed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def test_channels_of_the_model_input_are_left_out():
    groups, skipped = _skipped(InputResidual(), torch.randn(2, 8))
    assert groups == ["fc1"] and "fc2" in skipped, skipped


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Embedding(4, 8)
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x) + self.pos.weight[0] + self.pos(torch.zeros(x.shape[0], dtype=torch.long))))


def test_embedding_dimensions_are_left_out():
    groups, skipped = _skipped(Embedded(), torch.randn(2, 8))
    assert "fc1" not in groups and "Embedding 'pos'" in skipped["fc1"], skipped


@pytest.mark.parametrize("inner", ["layernorm", "functional", "batchnorm_no_affine", "identity"])
def test_compress_finalize_keeps_logits(inner):
    model = Block(inner)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    recipe = {"training": {"epochs": 2, "batch_size": 8},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}]}
    res = compress(model, recipe, (x, y), lambda m: 0.0)
    model.eval()
    masked = model(x).detach()
    finalize(model, res.example_inputs)
    assert model.fc3.out_features < 12, "the prunable branch really shrank"
    if inner == "identity":
        assert model.fc1.out_features < 16, "a plain block shrinks too"
    else:
        assert model.fc1.out_features == 16, "the unsafe block kept all its channels"
    gap = (model(x).detach() - masked).abs().max() / masked.abs().max()
    assert gap <= 1e-4, gap


def test_finalize_refuses_silently_changed_logits(monkeypatch):
    """With the safety check off, the functional norm's group is pruned; finalize must say so, not hide it."""
    import jointcompress.techniques.prune_structured as ps

    monkeypatch.setattr(ps, "discover_groups", functools.partial(discover_groups, verify=False))
    model = Block("functional")
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    recipe = {"training": {"epochs": 1, "batch_size": 8},
              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.5}]}
    res = compress(model, recipe, (x, y), lambda m: 0.0)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    with pytest.raises(UnsupportedModelError, match=r"finalize: removing the pruned channels of group 'fc1' changed "
                                                    r"the model .*keeps every channel") as refused:
        finalize(model, res.example_inputs)
    assert "fc3" not in str(refused.value)  # fc3's group shrinks as it should: only the failing group is named
    assert model.fc1.out_features == 16  # tried on a copy: the trained model is whole (it was left shrunk)
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-6)


def test_a_loop_stopped_before_the_ramp_ends_finalizes_its_channels_as_they_stand():
    """With learned masks still soft (early stopping at step 3 of 10), the channels finalize removed had been
    scaled, not zeroed: the shrunk model differed, finalize refused, and the model was left shrunk. The masks are
    made binary at their current keep first, as the end of the ramp makes them."""
    import warnings

    import jointcompress

    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    session = jointcompress.prepare(model, {"techniques": [{"type": "prune_structured", "sparsity": 0.5, "end": 0.6}]},
                                    total_steps=10, example_inputs=x[:2])
    opt = torch.optim.SGD(session.param_groups(lr=0.01))
    session.bind(opt)
    for _ in range(3):
        terms = session.loss(model(x[:32]), (x[:32], y[:32]))
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    group = next(t for t in session.techniques if t.kind == "prune_structured")
    kept = [int(m.hard.sum()) for m in group.masks.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "finalize at step 3 of the 10 prepare() planned"
        session.finalize()
    widths = [m.out_features for m in model if isinstance(m, nn.Linear)]
    assert widths[:2] != [64, 64] and widths[2] == 3 and sorted(widths[:2]) == sorted(kept)  # as the masks stood


def test_untraceable_model_is_a_clear_error():
    """GPT-2's attention concatenates tensors whose channels Torch-Pruning cannot infer (was a TypeError)."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))

    class LastToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = gpt2.eval()

        def forward(self, x):
            return self.hf(inputs_embeds=x).logits[:, -1]

    with pytest.raises(UnsupportedModelError, match=r"cannot trace LastToken: .* fails at .*TypeError") as err:
        build_graph(LastToken(), torch.randn(2, 5, 32))
    assert isinstance(err.value, JointCompressError)


def test_dry_run_shows_the_reason_for_a_users_model(tmp_path):
    from typer.testing import CliRunner

    from jointcompress.cli import app

    builder = tmp_path / "mymodel.py"
    builder.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_norm_groups import Block\n"
        "def build():\n    return Block('layernorm')\n"
    )
    r = CliRunner().invoke(app, ["dry-run", "--model", f"{builder}:build", "--input-shape", "2,8"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "fc3" in text and "LayerNorm" in text and "statistics" in text


def test_dry_run_user_model_needs_input_shape():
    from jointcompress.commands.dryrun_cmd import dry_run_tables
    from jointcompress.errors import RecipeError

    with pytest.raises(RecipeError, match="--input-shape"):
        dry_run_tables("torch.nn:Identity")  # a builder that imports: its shape is asked for
    for shape in (None, [1, 8]):  # one that does not is named first, with or without a shape
        with pytest.raises(RecipeError, match="cannot import"):
            dry_run_tables("no_such_package_xyz.models:build", input_shape=shape)


def test_looping_trace_is_a_clear_error_not_a_hang(monkeypatch):
    """Torch-Pruning's group search never ends on Llama attention (grouped-query heads): a named error."""
    transformers = pytest.importorskip("transformers")
    import jointcompress.graph as graph

    monkeypatch.setattr(graph, "GROUP_SECONDS", 2.0)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()

    class LastToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = llama

        def forward(self, x):
            return self.hf(inputs_embeds=x).logits[:, -1]

    x = torch.randn(2, 5, 32)
    with pytest.raises(UnsupportedModelError, match=r"channel group of 'hf\.model\.layers\.0\.self_attn\.\w+_proj'.* 2 s"):
        discover_groups(LastToken(), x)
    groups, _ = discover_groups(LastToken(), x, exclude=["*self_attn*"])  # the advice in the message works
    assert [g.name for g in groups] == ["hf.model.layers.0.mlp.up_proj"]


def test_model_with_nothing_safe_to_prune_names_the_reason():
    from jointcompress.errors import RecipeError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    recipe = {"training": {"epochs": 1, "batch_size": 4}, "techniques": [{"type": "prune_structured", "sparsity": 0.5}]}
    with pytest.raises(RecipeError, match=r"no prunable channel group .* 0: its channels pass through LayerNorm '1'"):
        compress(model, recipe, (x, y), lambda m: 0.0)


def test_the_trace_limit_outlasts_an_alarm_that_is_swallowed(monkeypatch):
    """The alarm's exception can land in code that swallows it (a finalizer the garbage collector
    runs mid-search): it is raised again until it gets out, so the search still ends, named."""
    import time

    import jointcompress.graph as graph

    monkeypatch.setattr(graph, "GROUP_SECONDS", 0.2)

    def get_all_groups():  # named as Torch-Pruning's generator, whose frame the alarm reads
        m = "root"
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3:
                pass
        except Exception:
            pass  # the first alarm lands here and is swallowed
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            pass
        yield m  # reached only if no later alarm interrupts the search

    with pytest.raises(UnsupportedModelError, match="channel group of 'the root'"):
        list(graph._time_limited(get_all_groups(), {"root": "the root"}))


def test_a_group_feeding_a_grouped_convolution_names_it_as_the_reason():
    """The reason read "an operation that mixes channels (a normalization written as functions, ...)"."""
    import torch.nn.functional as F

    from jointcompress.graph import discover_groups

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.head = torch.nn.Conv2d(16, 5, 1)

        def forward(self, x):
            h = F.relu(self.c1(x))
            return self.head(h + F.relu(self.c2(h)))

    torch.manual_seed(0)
    _, skipped = discover_groups(Residual(), torch.randn(2, 3, 8, 8), ["*"], [])
    reasons = dict(skipped)
    assert "grouped convolution 'c2' (groups=4)" in reasons["c2"]
    # said of c2's own channels too: "they feed the grouped convolution 'c2'" read as if c2 fed itself
    assert "'c2' (groups=4) reads or writes these channels in 4 groups" in reasons["c2"], reasons["c2"]


def test_a_depthwise_convolution_with_a_channel_multiplier_is_named_as_the_reason():
    """A depthwise conv making 2 outputs per input channel left its feeder and itself out with the general reason
    ("an operation mixes the channels ... a normalization written as functions"), which named nothing in the model."""
    from jointcompress.graph import discover_groups

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.dw = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1, groups=8)
            self.pw, self.head = nn.Conv2d(16, 16, 1), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.c1(x))))))
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    groups, skipped = discover_groups(Net(), torch.randn(2, 3, 8, 8), ["*"], [])
    reasons = dict(skipped)
    assert [g.name for g in groups] == ["pw"]
    for name in ("c1", "dw"):
        assert "depthwise convolution 'dw' (groups=8, 8 inputs, 16 outputs) has a channel multiplier of 2" in reasons[name]


def test_a_layer_the_model_returns_in_a_dict_is_left_out_without_advice_to_exclude_it():
    """Its reason ended "(exclude the layer)", for a layer already left out: there was nothing to do."""
    from jointcompress.graph import discover_groups

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return {"logits": self.fc(torch.relu(self.fc1(x)))}

    torch.manual_seed(0)
    groups, skipped = discover_groups(Net(), torch.randn(4, 8), ["*"], [])
    reason = dict(skipped)["fc"]
    assert [g.name for g in groups] == ["fc1"]
    assert "returned by the model" in reason or "model output" in reason, reason
    assert "exclude the layer" not in reason


class ScaledConv(nn.Module):
    """A learned per-channel scale reshaped to broadcast over a conv's maps."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 16, 3), nn.Linear(16, 10)
        self.scale = nn.Parameter(torch.ones(32))

    def forward(self, x):
        x = torch.relu(self.c1(x) * self.scale.view(1, 32, 1, 1))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def test_a_broadcast_per_channel_parameter_is_named_as_such_not_as_attention_heads():
    """Its reshape [32] -> [1, 32, 1, 1] was called a split "into attention heads", pointing to prune_heads."""
    names, skipped = _skipped(ScaledConv(), torch.zeros(1, 1, 8, 8))
    assert "c1" not in names and "c2" in names
    assert "per-channel tensor of 32 values is broadcast" in skipped["c1"] and "heads" not in skipped["c1"]


def test_a_conv_feeding_a_grouped_convolution_is_skipped_whatever_the_trial_draw():
    """The trial removal draws half the channels with a fixed seed; for this model the draw fell evenly
    across the grouped conv's two groups and passed, the run trained to its end and finalize refused."""
    from jointcompress.graph import discover_groups

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.head = nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).flatten(2).mean(2))

    torch.manual_seed(0)
    groups, skipped = discover_groups(Net().eval(), torch.randn(2, 1, 8, 8), ["*"], [])
    assert not groups and "grouped convolution 'c2' (groups=2)" in dict(skipped)["c1"]


def test_a_group_through_instance_norm_is_left_out_for_its_shift_not_for_mixing_channels():
    """InstanceNorm normalizes each channel on its own; the reason said its statistics mix channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    groups, skipped = _skipped(model, torch.randn(2, 3, 12, 12))
    reason = skipped["0"]
    assert "InstanceNorm2d '1', which is not sliced with them" in reason and "mix channels" not in reason, skipped


class SqueezeExcite(nn.Module):
    """A squeeze-and-excitation gate broadcast over the map, written with view or with indexing."""

    def __init__(self, use_view: bool):
        super().__init__()
        torch.manual_seed(0)
        self.use_view = use_view
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1, stride=2), nn.Conv2d(16, 16, 3, padding=1)
        self.f1, self.f2, self.fc = nn.Linear(16, 4), nn.Linear(4, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        gate = torch.sigmoid(self.f2(torch.relu(self.f1(x.mean((2, 3))))))
        gate = gate.view(x.shape[0], x.shape[1], 1, 1) if self.use_view else gate[:, :, None, None]
        return self.fc(torch.relu(self.c2(x * gate)).mean((2, 3)))


def test_a_squeeze_excite_gate_written_with_view_is_pruned_as_the_indexed_one_is():
    """gate.view(b, c, 1, 1) was refused as a split into attention heads, so the trunk's channels it scales (c1, f2)
    stayed unpruned where gate[:, :, None, None] pruned them; finalize gives the masked model's logits either way."""
    x = torch.randn(8, 1, 12, 12)
    indexed, viewed = _skipped(SqueezeExcite(False), x), _skipped(SqueezeExcite(True), x)
    assert sorted(viewed[0]) == sorted(indexed[0]) and "f2" in viewed[0] and set(viewed[1]) == {"fc"}, viewed
    model = SqueezeExcite(True)
    compress(model, {"training": {"epochs": 1, "batch_size": 8},
                              "techniques": [{"type": "prune_structured", "sparsity": 0.5, "criterion": "magnitude"}]},
                      (x, torch.randint(0, 10, (8,))), lambda m: {"accuracy": 0.0})
    with torch.no_grad():
        masked = model.eval()(x)
        finalize(model, x[:2])
        assert model.c1.out_channels == 8 and torch.allclose(model(x), masked, atol=1e-5)

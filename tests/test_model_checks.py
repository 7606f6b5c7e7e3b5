"""Models as users hand them over: layers whose weight another library parametrizes, or that are not
float32, are refused before training with the layer named and the one-call fix (after which the
same model compresses); a model inside torch.compile's wrapper is compressed itself."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jointcompress
from jointcompress.errors import UnsupportedModelError

RECIPE = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5},
                         {"type": "quant_lsq", "bits": 4, "start": 0.3},
                         {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def weight_normed() -> Net:
    net = Net()
    net.a = nn.utils.parametrizations.weight_norm(net.a)
    return net


def hook_weight_normed() -> Net:
    net = Net()
    with pytest.warns(FutureWarning):  # torch.nn.utils.weight_norm is deprecated, and still in use
        net.a = nn.utils.weight_norm(net.a)
    return net


@pytest.mark.parametrize("build, words", [
    (weight_normed, r"layer 'a' .*parametrization \(_WeightNorm\).*remove_parametrizations\(layer, 'weight'\)"),
    (hook_weight_normed, r"layer 'a' .*weight_norm's hook.*remove_weight_norm\(layer\)"),
    (lambda: Net().to(torch.bfloat16), r"layer 'a' .*torch.bfloat16.*model.float\(\)"),
    (lambda: Net().double(), r"layer 'a' .*torch.float64.*model.float\(\)"),
], ids=["weight_norm", "hook_weight_norm", "bfloat16", "float64"])
def test_a_layer_the_techniques_cannot_carry_is_refused_with_the_fix(build, words):
    model = build()
    with pytest.raises(UnsupportedModelError, match=words):
        # no teacher: a model with the hook-based weight_norm cannot even be deep-copied
        jointcompress.prepare(model, {"techniques": RECIPE["techniques"][:2]}, total_steps=4)
    assert not any(hasattr(m, "parametrizations") and "weight" in m.parametrizations and len(m.parametrizations.weight) > 1
                   for m in model.modules())  # nothing was attached before the refusal


@pytest.mark.parametrize("fix", ["remove_parametrizations", "float"])
def test_after_the_named_fix_the_model_compresses_and_finalizes_to_the_same_logits(fix):
    torch.manual_seed(0)
    if fix == "float":
        model = Net().to(torch.bfloat16).float()
    else:
        model = weight_normed()
        nn.utils.parametrize.remove_parametrizations(model.a, "weight")
    teacher = copy.deepcopy(model)  # after the fix, as the message says
    x = torch.randn(64, 16)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    result = jointcompress.compress(model, {**RECIPE, "training": {"epochs": 2, "batch_size": 16}}, (x, y),
                                    lambda m: 0.0, teacher=teacher)
    assert float((result.model.a.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    result.model.eval()
    with torch.no_grad():
        masked = result.model(x)
        jointcompress.finalize(result.model, result.example_inputs)
        assert torch.equal(result.model(x), masked)


def test_a_compiled_model_is_compressed_itself_not_traced_through_its_wrapper():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(64, 16)
    y = (x[:, 0] > 0).long()
    result = jointcompress.compress(torch.compile(net), {"techniques": RECIPE["techniques"][:2],
                                                         "training": {"epochs": 2, "batch_size": 16}}, (x, y), lambda m: 0.0)
    assert result.model is net  # the module inside the wrapper, compressed in place
    assert float((net.a.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_a_model_compressed_before_is_refused_until_finalized():
    """A notebook cell run twice: compress() on a model that still carries the first run's masks and
    quantizers stacked a second mask and quantizer on every weight, silently."""
    from jointcompress.errors import RecipeError

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :3].argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    recipe = {"training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    result = jointcompress.compress(model, recipe, (x, y), lambda m: 0.0)
    before = [n for n, _ in model.named_parameters()]
    for again in (lambda: jointcompress.compress(model, recipe, (x, y), lambda m: 0.0),
                  lambda: jointcompress.prepare(model, recipe, total_steps=4)):
        with pytest.raises(RecipeError, match=r"already carries jointcompress masks or quantizers \('0', '2'\).*fresh copy"):
            again()
        assert [n for n, _ in model.named_parameters()] == before  # nothing stacked
    jointcompress.finalize(model, result.example_inputs)
    jointcompress.compress(model, recipe, (x, y), lambda m: 0.0)  # the finalized model compresses further
    assert len(model[0].parametrizations.weight) == 2  # one mask, one quantizer


def test_a_teacher_that_is_the_model_or_shares_its_layers_is_refused():
    """teacher=model (the same object) was masked, quantized and trained with the model, which was
    distilled toward itself; a teacher built from the model's own layers likewise."""
    from jointcompress.errors import RecipeError

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x[:, :3].argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    recipe = {"training": {"epochs": 1, "batch_size": 32},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.5}, {"type": "distill_kd"}]}
    reused = nn.Sequential(model[0], nn.ReLU(), nn.Linear(16, 3))
    for teacher, words in ((model, "is the model being compressed"), (reused, r"shares 2 parameters .*'0.weight'")):
        with pytest.raises(RecipeError, match=f"the teacher {words}.*copy.deepcopy"):
            jointcompress.compress(model, recipe, (x, y), lambda m: 0.0, teacher=teacher)
        with pytest.raises(RecipeError, match=f"the teacher {words}"):
            jointcompress.prepare(model, recipe, total_steps=4, teacher=teacher)
    assert not hasattr(model[0], "parametrizations")  # refused before anything was attached
    jointcompress.compress(model, recipe, (x, y), lambda m: 0.0, teacher=copy.deepcopy(model))


def test_a_layer_whose_output_the_model_returns_is_skipped_for_that_reason():
    """forward returns (logits, hidden): removing a's channels would change the hidden output's shape. The
    reason said 'an operation that mixes channels (a normalization, a reshape into heads)' and 'by inf'."""
    from jointcompress.errors import RecipeError

    class WithHidden(Net):
        def forward(self, x):
            h = F.relu(self.a(x))  # after an activation: the tracer's direct-output check does not see it
            return self.b(h), h

    with pytest.raises(RecipeError, match=r"a: the model's output 1 changes shape, \[4, 32\] -> \[4, 16\]: these channels "
                                          r"are returned by the model") as err:
        jointcompress.prepare(WithHidden(), {"techniques": [{"type": "prune_structured", "sparsity": 0.5}]},
                              total_steps=10, example_inputs=torch.randn(4, 16))
    assert "mixes channels" not in str(err.value)


def test_a_channel_group_behind_a_buffer_that_is_zero_at_setup_is_left_out_there_not_at_a_calibration():
    """A centering layer (x - offset, its offset buffer 0 at setup and updated in training) hid that a removed
    channel's output is not zero: the group passed the setup check and the run died at a size calibration, blaming
    every group. The check perturbs floating buffers too."""
    class Center(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("offset", torch.zeros(()))

        def forward(self, x):
            return x - self.offset

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.center = nn.Conv2d(3, 16, 3, padding=1), Center()
            self.c2, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(F.relu(self.c2(self.center(F.relu(self.c1(x))))).mean((2, 3)))

    torch.manual_seed(0)
    session = jointcompress.prepare(Net(), {"techniques": [{"type": "prune_structured", "sparsity": 0.5}]},
                                    total_steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    channels = next(t for t in session.techniques if t.kind == "prune_structured")
    assert [g.name for g in channels.groups] == ["c2"]
    assert any(name == "c1" and "non-zero output" in why for name, why in channels.skipped), channels.skipped

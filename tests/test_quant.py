import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from jointcompress import compress, finalize
from jointcompress.data import evaluator
from jointcompress.techniques.quant_lsq import LSQWeight, lsq_init_step


def test_lsq_channel_takes_at_most_2_to_the_b_values():
    w = torch.randn(16, 32)
    for bits in range(2, 9):
        q = LSQWeight(w, bits)
        out = q(w).detach()
        for row in out:
            assert row.unique().numel() <= 2**bits
        # and the values sit on the per-channel grid
        ints = out / q.scale()[:, None]
        assert torch.allclose(ints, ints.round(), atol=1e-4)


def test_lsq_step_gets_a_gradient_and_rounding_is_straight_through():
    w = torch.randn(8, 16, requires_grad=True)
    q = LSQWeight(w.detach(), 4)
    q(w).pow(2).sum().backward()
    assert q.log_step.grad is not None and q.log_step.grad.abs().sum() > 0
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_step_initialises_from_pruned_weights():
    w = torch.randn(4, 100)
    w[:, 50:] = 0  # half pruned
    s = lsq_init_step(w, 7, per_channel=True).flatten()
    expected = 2 * w[:, :50].abs().mean(1) / 7**0.5
    assert torch.allclose(s, expected)


def test_pruned_weights_stay_exact_zeros_after_joint_quantization(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    recipe = {"training": {"epochs": 2},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.7, "end": 0.5},
                             {"type": "quant_lsq", "bits": 3, "start": 0.2}]}
    res = compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test))
    layer = model[1]
    assert [type(p).__name__ for p in layer.parametrizations.weight] == ["ApplyMask", "LSQWeight"]
    mask = res.techniques[0].masks["1"].hard
    assert (layer.weight[mask == 0] == 0).all()
    spec = finalize(model)
    w = model[1].weight.detach()
    assert int((w == 0).sum()) >= round(w.numel() * 0.7)
    for row in w:
        assert row.unique().numel() <= 2**3
    assert spec.layers["1"].bits == 3 and spec.layers["1"].scale.shape == (32,)
    ints = w / spec.layers["1"].scale[:, None]
    assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.abs().max() <= 3


def test_fused_lsq_gradients_equal_the_unfused_autograd_reference():
    import math

    from jointcompress.techniques.quant_lsq import LSQFunction, grad_scale, round_ste

    torch.manual_seed(0)
    w = torch.randn(6, 20, dtype=torch.float64, requires_grad=True)
    log_s = torch.full((6, 1), math.log(0.3), dtype=torch.float64, requires_grad=True)
    g, qmax = 1 / math.sqrt(20 * 7), 7
    upstream = torch.randn(6, 20, dtype=torch.float64)
    s = grad_scale(log_s, g).exp()
    ref = round_ste(torch.clamp(w / s, -qmax, qmax)) * s
    ref_gw, ref_gs = torch.autograd.grad((ref * upstream).sum(), (w, log_s))
    out = LSQFunction.apply(w, log_s, qmax, g)
    gw, gs = torch.autograd.grad((out * upstream).sum(), (w, log_s))
    assert torch.allclose(out, ref) and torch.allclose(gw, ref_gw) and torch.allclose(gs, ref_gs)


def test_round_ste_and_grad_scale_are_exact_in_the_forward():
    from jointcompress.techniques.quant_lsq import grad_scale, round_ste

    x = torch.randn(10_000) * 7
    assert torch.equal(round_ste(x), x.round()) and torch.equal(grad_scale(x, 0.013), x)


def test_finalize_and_load_keep_the_trained_rounding_of_activations(digits, tmp_path):
    """quant_lsq activations: true trains each layer on rounded inputs; finalize and the artifact keep
    that rounding (they dropped it: logits moved by up to 5.7 at 2 bits), and the state dict stays plain."""
    from jointcompress.artifact import load, save
    from jointcompress.deploy import export_and_check

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    model = build()
    recipe = {"training": {"epochs": 1, "batch_size": 64},
              "techniques": [{"type": "quant_lsq", "bits": 4, "activations": True, "act_bits": 2}]}
    result = compress(model, recipe, (digits.x_train, digits.y_train), evaluator(digits.x_test, digits.y_test))
    x = torch.as_tensor(digits.x_test)
    with torch.no_grad():
        trained = model.eval()(x)
        spec = finalize(model, result.example_inputs)
        assert torch.equal(model(x), trained)
    assert spec.layers["1"].act_bits == 2 and set(model.state_dict()) == set(build().state_dict())
    assert spec.layers["1"].act_signed == bool((x < 0).any()) and spec.layers["3"].act_signed is False  # after a ReLU
    from jointcompress.session.checks import attached_layers

    assert attached_layers(model) == []  # frozen rounding is not a trainer left attached: it can be compressed again
    save(model, spec, tmp_path / "art", example_inputs=result.example_inputs)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "art", build)(x), trained)
    import json

    layers = json.loads((tmp_path / "art" / "manifest.json").read_text())["layers"]
    assert layers["3"]["act_signed"] is False and ("act_signed" in layers["1"]) == (not spec.layers["1"].act_signed)
    report = export_and_check(model, tmp_path / "m.onnx", x[:1], eval_data=x)
    assert report.max_abs_logit_diff <= 1e-4
    import pytest

    from jointcompress.deploy import quantize_int8
    from jointcompress.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="FX int8 drops; use backend='onnxruntime'"):  # it dropped them
        quantize_int8(model, spec, x[:64], x[:1], backend="torch")


def test_input_grid_is_unsigned_where_the_inputs_never_go_negative():
    """After a ReLU a signed grid spends half its levels on values that never come: 2-bit inputs
    had 3 levels (-1, 0, 1 step; only 0 and 1 used), now 4 (0..3 steps). Inputs that can be
    negative keep the symmetric grid, and a state dict written before `signed` loads as signed."""
    from jointcompress.techniques.quant_lsq import LSQActivation

    x = torch.relu(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)))
    after_relu = LSQActivation(bits=2)
    levels = torch.unique(torch.round(after_relu(x) / after_relu.step.detach()))
    assert not bool(after_relu.signed) and levels.tolist() == [0.0, 1.0, 2.0, 3.0]
    raw = LSQActivation(bits=2)
    levels = torch.unique(torch.round(raw(x - 0.5) / raw.step.detach()))
    assert bool(raw.signed) and levels.tolist() == [-1.0, 0.0, 1.0]
    later = LSQActivation(bits=2)
    later(x)  # first batch non-negative: unsigned ...
    with pytest.warns(UserWarning, match="signed from now on"):
        later(x - 0.5)  # ... a negative input later: signed, not clamped to 0 without a word
    assert bool(later.signed)
    old_state = {k: v for k, v in after_relu.state_dict().items() if k != "signed"}
    reloaded = LSQActivation(bits=2)
    reloaded.load_state_dict(old_state)
    assert bool(reloaded.signed) and bool(reloaded.initialized)


def test_finalize_names_a_compressed_layer_left_without_a_nonzero_weight():
    import pytest
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    for layer in (model[0], model[2]):
        parametrize.register_parametrization(layer, "weight", LSQWeight(layer.weight.detach(), 4))
    with torch.no_grad():
        model[2].parametrizations.weight.original.zero_()
    with pytest.warns(UserWarning, match=r"finalize: 1 layer\(s\) have no nonzero weight left \(2\).*Nothing pruned "
                                         r"them.*per_channel: true") as said:  # not the pruning's advice: none pruned
        finalize(model)
    assert not [w for w in said if "lower the sparsity" in str(w.message)]


def test_a_bias_past_float16s_range_is_said_with_the_fix():
    """bias_format fp16 (the default) stored a bias of 1e5 as 65,504 without a word: two classes tied, and every
    parity check passed, as they compare with the clamped model."""
    import jointcompress

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].bias[0] = 1e5
    with pytest.warns(UserWarning, match=r"layer '0''s bias reaches 100000, past float16's largest value .*bias_format: fp32"):
        jointcompress.prepare(model, {"techniques": [{"type": "quant_lsq", "bits": 4}]}, total_steps=2,
                              example_inputs=torch.randn(2, 8))


def test_finalize_says_a_layer_whose_rounding_zeroes_most_of_its_weights():
    """One weight of 1e4 among weights of about 0.05, quantized per tensor at 4 bits: the step follows it and
    nearly every other weight rounds to zero; finalize said nothing. Per channel, only that row is affected."""
    torch.manual_seed(0)
    for per_channel, said in ((False, True), (True, False)):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
        with torch.no_grad():
            model[0].weight.mul_(0.4)
            model[0].weight[0, 0] = 1e4
        parametrize.register_parametrization(model[0], "weight", LSQWeight(model[0].weight.detach(), 4, per_channel))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            finalize(model)
        found = [str(w.message) for w in caught if "rounding zeroes most weights" in str(w.message)]
        assert bool(found) == said, (per_channel, found)
        if said:
            assert "0 (" in found[0] and "one step for the layer" in found[0] and "per_channel: true" in found[0]

"""Scales and biases in low precision: trained as stored, stored exactly, loaded with the same logits."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from artifact_helpers import MLP, example_input
from jointcompress.artifact import load, precision, save
from jointcompress.finalize import finalize
from jointcompress.techniques.bias_quant import attach_bias_quant
from jointcompress.techniques.quant_lsq import LSQWeight


def test_scale_formats_are_chosen_smallest_and_exact():
    fp16 = torch.tensor([0.0123, 0.5, 0.031]).half().float()
    data, rec = precision.encode_scale(fp16)
    assert rec == {"channels": 3, "codec": "fp16"} and len(data) == 6
    assert torch.equal(precision.decode_scale(data, rec, 3), fp16)
    log8 = precision.round_step(torch.rand(40) * 0.1 + 1e-3, "log8")
    data, rec = precision.encode_scale(log8)
    assert rec["codec"] == "log8" and len(data) == 2 + 40
    assert torch.equal(precision.decode_scale(data, rec, 40), log8)
    fp32 = torch.tensor([0.1, 0.2, 0.3])  # not fp16 values
    data, rec = precision.encode_scale(fp32)
    assert rec["codec"] == "fp32" and torch.equal(precision.decode_scale(data, rec, 3), fp32)
    shared = torch.full((50,), 0.25)
    data, rec = precision.encode_scale(shared)
    assert rec["channels"] == 1 and len(data) == 2 and torch.equal(precision.decode_scale(data, rec, 50), shared)


@pytest.mark.parametrize("channels, stored", [(1, 3), (2, 4)])
def test_a_log8_step_that_is_no_fp16_value_takes_log8s_bytes_not_fp32s(channels, stored):
    """A per-tensor log8 step (2**(k/16), rarely an fp16 value) was stored as fp32, 4 bytes for log8's 3,
    while the size estimate counted 3 (estimate.SCALE_BYTES)."""
    step = precision.round_step(torch.tensor([0.0371, 0.0913][:channels]), "log8")
    assert not torch.equal(step.half().float(), step)  # not fp16 values: only log8 or fp32 hold them exactly
    wide = step.expand(7).clone() if channels == 1 else step
    data, rec = precision.encode_scale(wide)
    assert rec["codec"] == "log8" and len(data) == stored == precision.scale_nbytes(rec)
    assert torch.equal(precision.decode_scale(data, rec, wide.numel()), wide)


def test_bias_formats_are_chosen_smallest_and_exact():
    step = precision.round_step(torch.rand(30) * 0.05 + 0.01)
    on_grid = precision.round_bias(torch.randn(30) * 0.2, "int", step)
    data, rec = precision.encode_bias(on_grid, step)
    assert rec["codec"] == "int" and len(data) < 2 * 30
    assert torch.equal(precision.decode_bias(data, rec, step), on_grid)
    half = (torch.randn(30) * 0.3).half().float()
    data, rec = precision.encode_bias(half, step)
    assert rec["codec"] == "fp16" and torch.equal(precision.decode_bias(data, rec, step), half)
    data, rec = precision.encode_bias(torch.randn(30) * 0.3, step)
    assert rec["codec"] == "fp32"


def test_round_step_never_reaches_zero_and_is_idempotent():
    s = torch.tensor([1e-12, 3e-6, 0.02, 7.0])
    for fmt in ("fp16", "log8"):
        r = precision.round_step(s, fmt)
        assert (r > 0).all() and torch.equal(precision.round_step(r, fmt), r)


def _trained_mlp(step_format: str, bias_format: str) -> nn.Module:
    """An MLP with LSQ (4-bit) and bias quantization attached, trained a few steps so the
    latent steps and biases are off every storage grid."""
    torch.manual_seed(0)
    model = MLP()
    for layer in (model.fc1, model.fc2, model.fc3):
        q = LSQWeight(layer.weight.detach(), 4)
        q.step_format = step_format
        parametrize.register_parametrization(layer, "weight", q)
        attach_bias_quant(layer, q, bias_format)
        _ = layer.weight  # initialise the step
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = example_input(16), torch.randint(0, 10, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("step_format,bias_format", [("fp16", "fp16"), ("log8", "int"), ("fp16", "int"), ("log8", "fp16")])
def test_trained_formats_roundtrip_with_identical_logits(tmp_path, step_format, bias_format):
    model = _trained_mlp(step_format, bias_format)
    x = example_input(8)
    with torch.no_grad():
        trained = model(x)
    spec = finalize(model)
    with torch.no_grad():
        assert torch.equal(model(x), trained)  # finalize changes nothing
    manifest = save(model, spec, tmp_path, builder=MLP, example_inputs=x)
    loaded = load(tmp_path, MLP)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained)  # what was evaluated is what is stored
    for name in ("fc1", "fc2", "fc3"):
        parts = manifest["layers"][name]["parts"]
        assert parts["scale"]["format"] == step_format
        assert parts["bias"]["format"] == bias_format
    b = manifest["bytes"]
    assert b["scales"] <= (2 + 64 + 2 + 32 + 2 + 10 if step_format == "log8" else 2 * (64 + 32 + 10))
    assert b["biases"] <= 2 * (64 + 32 + 10)


def test_int_biases_cost_less_than_fp16(tmp_path):
    x = example_input(4)
    sizes = {}
    for fmt in ("fp16", "int"):
        model = _trained_mlp("fp16", fmt)
        sizes[fmt] = save(model, finalize(model), tmp_path / fmt, example_inputs=x)["bytes"]["biases"]
    assert sizes["int"] < sizes["fp16"] == 2 * (64 + 32 + 10)


def test_a_log8_step_stays_in_fp16s_range():
    """A step near zero stayed near zero on the log8 grid (down to 1e-30), and runs beside prune_structured,
    whose emptied channels have such steps, stopped on non-finite step-size gradients; fp16 clamps, and
    log8 now clamps alike."""
    tiny = torch.tensor([0.0, 1e-30, 1e-9, 1e9])
    log8 = precision.round_step(tiny, "log8")
    assert (log8 >= precision.FP16_MIN).all() and (log8 <= 2.0 ** 16).all()  # 65504's nearest grid value: 2**16
    assert torch.equal(precision.log8_value(precision.log8_code(log8)), log8)  # still on the grid
    assert log8[0] == log8[1] == precision.FP16_MIN  # 2**-24 is the grid's code -384

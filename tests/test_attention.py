"""torch's nn.MultiheadAttention converted to Linear projections (attention.mha_to_linear): the same
function, compressed like any Linear, and torch's module back after finalize (linear_to_mha)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from jointcompress import JointCompressError, compress, finalize
from jointcompress.attention import LinearMultiheadAttention, linear_to_mha, mha_to_linear
from jointcompress.models import build_model
from jointcompress.targets import TargetError
from jointcompress.techniques.base import selected_layers
from jointcompress.recipe import parse_recipe

B, L, S, E, HEADS = 3, 5, 7, 16, 4


def _inputs(batch_first: bool, kdim: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, E, generator=g)
    kv = torch.randn(B, S, kdim, generator=g)
    return (q, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1))


def _call_options():
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -2:] = True
    per_head = torch.rand(B * HEADS, L, S, generator=torch.Generator().manual_seed(1)) > 0.8
    per_head[..., 0] = False  # every query keeps one key (a fully masked row is NaN in both)
    return {
        "plain": {},
        "key padding": {"key_padding_mask": padding},
        "float mask": {"attn_mask": torch.randn(L, S)},
        "per-head bool mask and padding": {"attn_mask": per_head, "key_padding_mask": padding},
        "float mask and padding": {"attn_mask": torch.randn(B * HEADS, L, S), "key_padding_mask": padding.float() * -1e4},
        "no weights (SDPA)": {"need_weights": False, "attn_mask": torch.randn(L, S)},
        "per-head weights": {"average_attn_weights": False, "key_padding_mask": padding},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [E, 12])
@pytest.mark.parametrize("call", list(_call_options()))
def test_converted_attention_computes_what_torch_computes(batch_first, kdim, call):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    linear = mha_to_linear(copy.deepcopy(mha))
    assert isinstance(linear, LinearMultiheadAttention) and linear.k_proj.in_features == kdim
    q, kv = _inputs(batch_first, kdim)
    kwargs = _call_options()[call]
    out, weights = mha(q, kv, kv, **kwargs)
    out2, weights2 = linear(q, kv, kv, **kwargs)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    assert (weights is None) == (weights2 is None)
    if weights is not None:
        torch.testing.assert_close(weights2, weights, rtol=1e-5, atol=1e-6)
    back = linear_to_mha(copy.deepcopy(linear))
    assert type(back) is nn.MultiheadAttention
    torch.testing.assert_close(back(q, kv, kv, **kwargs)[0], out, rtol=1e-5, atol=1e-6)


def test_unbatched_causal_and_biasless_attention_convert():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, bias=False, batch_first=True).eval()
    linear = mha_to_linear(copy.deepcopy(mha))
    assert linear.q_proj.bias is None and linear.out_proj.bias is None
    x = torch.randn(L, E)  # one sequence, no batch axis
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    for kwargs in ({}, {"attn_mask": causal, "is_causal": True}):
        out, weights = mha(x, x, x, **kwargs)
        out2, weights2 = linear(x, x, x, **kwargs)
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights2, weights, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's own path, the reference
def test_a_converted_encoder_keeps_its_outputs_with_padding_in_eval():
    """torch's encoder takes a nested-tensor fast path in eval that reads the packed projection;
    the conversion turns it off, so padded batches still run, with the same outputs."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
    x = torch.randn(2, 6, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    with torch.no_grad():
        reference = encoder(x, src_key_padding_mask=padding)
        converted = mha_to_linear(copy.deepcopy(encoder))
        out = converted(x, src_key_padding_mask=padding)
    assert not converted.use_nested_tensor
    assert isinstance(converted.layers[1].self_attn, LinearMultiheadAttention)
    torch.testing.assert_close(out[~padding], reference[~padding], rtol=1e-5, atol=1e-5)


def test_attention_with_extra_key_rows_is_refused_by_name():
    model = nn.Sequential(nn.Linear(E, E), nn.MultiheadAttention(E, HEADS, add_bias_kv=True))
    with pytest.raises(JointCompressError, match=r"'1': nn.MultiheadAttention with add_bias_kv"):
        mha_to_linear(model)


class _Encoder(nn.Module):
    def __init__(self, convert: bool):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.encoder = mha_to_linear(encoder) if convert else encoder
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, L, E, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_unconverted_attention_is_named_with_the_fix():
    """A size target under the packed projections' bytes is refused with the conversion named;
    without a size target, the run warns once that they stay uncompressed."""
    joint = {"mode": "joint", "target": {"ratio": 4}, "training": {"epochs": 1, "batch_size": 8},
             "techniques": [{"type": "quant_lsq", "bits": 4, "zero_level": True}, {"type": "size_budget"}]}
    with pytest.warns(UserWarning, match="mha_to_linear"), \
            pytest.raises(TargetError, match=r"in_proj_weight .*'encoder.layers.0.self_attn' and 1 more.*mha_to_linear"):
        compress(_Encoder(convert=False), joint, _data(), lambda m: 0.0)
    plain = {"training": {"epochs": 1, "batch_size": 8}, "techniques": [{"type": "quant_lsq", "bits": 8}]}
    with pytest.warns(UserWarning, match="mha_to_linear"):
        compress(_Encoder(convert=False), plain, _data(), lambda m: 0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mha_to_linear")
        compress(_Encoder(convert=True), plain, _data(), lambda m: 0.0)


def test_converted_projections_are_compressed_and_go_back_to_torch_after_finalize():
    recipe = {"training": {"epochs": 2, "batch_size": 8},
              "techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5}, {"type": "quant_lsq", "bits": 4}]}
    model = _Encoder(convert=True)
    picked = selected_layers(model, parse_recipe(recipe).techniques[0])
    assert {f"encoder.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "k", "v", "out")} <= set(picked)
    x, y = _data()
    result = compress(model, recipe, (x, y), lambda m: 0.0)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    with pytest.raises(JointCompressError, match="finalize"):
        linear_to_mha(copy.deepcopy(model))
    finalize(model, result.example_inputs)
    q = model.encoder.layers[0].self_attn.q_proj.weight
    assert float((q == 0).float().mean()) >= 0.45  # the query projection was pruned
    torch_model = linear_to_mha(model)
    attention = torch_model.encoder.layers[0].self_attn
    assert type(attention) is nn.MultiheadAttention
    assert torch.equal(attention.in_proj_weight[:E], q)
    with torch.no_grad():
        torch.testing.assert_close(torch_model(x), masked, rtol=1e-4, atol=1e-5)


def test_the_builtin_vit_stores_no_position_table():
    for size in (28, 8):
        model = build_model("vit", image_size=size)
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert "position" not in model.state_dict()  # recomputed at build: not a byte of the file
    assert sum(isinstance(m, nn.MultiheadAttention) for m in model.modules()) == 0

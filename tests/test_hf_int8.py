"""Int8 export of HF classifiers stays within a stated logits tolerance of fp32."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_helpers import inputs, tiny_bert, tiny_distilbert  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from jointcompress.errors import ArtifactError  # noqa: E402
from jointcompress.hf.heads import prune_heads  # noqa: E402
from jointcompress.hf.int8 import (  # noqa: E402
    OrtClassifier,
    bake_parametrizations,
    check_logits,
    export_onnx,
    logits_over,
    quantize_onnx_int8,
    quantize_torch_int8,
    torch_logits_fn,
)

# Tiny random models have logits of order 0.1-1; int8 weight + activation rounding moves
# them by a few 1e-3. 0.05 is the stated tolerance for these tests.
ATOL = 0.05


def data(n=16, seq=12):
    x = inputs(batch=n, seq=seq, seed=3)
    return x


@pytest.mark.parametrize("make", [tiny_bert, tiny_distilbert])
def test_torch_int8_within_tolerance(make):
    model = make()
    prune_heads(model, [[0, 1], [2], [0, 1, 2, 3], [1, 3]])
    x = data()
    ref = logits_over(torch_logits_fn(model), x)
    q = quantize_torch_int8(model)
    assert any("quantized.dynamic" in type(m).__module__ for m in q.modules())
    stats = check_logits(ref, logits_over(torch_logits_fn(q), x), atol=ATOL)
    assert stats["max_abs_diff"] > 0  # it really is quantized


def test_onnx_int8_within_tolerance(tmp_path):
    model = tiny_bert()
    prune_heads(model, [[0, 1], [2], [0, 1, 2, 3], [1, 3]])
    x = data()
    ref = logits_over(torch_logits_fn(model), x)
    torch._C._jit_set_onnx_log_enabled(False)
    fp32 = export_onnx(model, tmp_path / "m.onnx", seq_len=12)
    assert not torch._C._jit_is_onnx_log_enabled()  # the exporter left it on: a later export printed its graph
    torch.testing.assert_close(logits_over(OrtClassifier(fp32), x), ref, atol=1e-4, rtol=1e-4)
    q = quantize_onnx_int8(fp32, tmp_path / "m.int8.onnx")
    assert q.stat().st_size < fp32.stat().st_size
    check_logits(ref, logits_over(OrtClassifier(q), x), atol=ATOL)


class _Round(nn.Module):
    """A stand-in fake-quantizer parametrization (the core's LSQ lives elsewhere)."""

    def forward(self, w):
        s = w.abs().max() / 127
        return torch.round(w / s) * s


def test_fake_quant_parametrization_is_baked_before_int8():
    model = tiny_bert()
    lin = model.bert.encoder.layer[0].attention.self.query
    parametrize.register_parametrization(lin, "weight", _Round())
    x = data()
    ref = logits_over(torch_logits_fn(model), x)
    q = quantize_torch_int8(model)
    check_logits(ref, logits_over(torch_logits_fn(q), x), atol=ATOL)
    baked = bake_parametrizations(model)
    assert not parametrize.is_parametrized(baked.bert.encoder.layer[0].attention.self.query)
    torch.testing.assert_close(logits_over(torch_logits_fn(baked), x), ref)


def test_check_logits_raises_past_tolerance():
    with pytest.raises(ArtifactError, match="tolerance"):
        check_logits(torch.zeros(2, 2), torch.ones(2, 2), atol=0.5)


def test_export_onnx_refuses_a_model_that_still_carries_its_masks(tmp_path):
    """Given a model mid-compression (head masks as forward pre-hooks), the baked copy export_onnx makes dropped the
    masks: the file was the unpruned network, silently (or, without quant_lsq, a raw "Cannot insert a Tensor that
    requires grad as a constant")."""
    import jointcompress

    model = tiny_bert()
    x = data()
    jointcompress.prepare(model, {"techniques": [{"type": "prune_heads", "sparsity": 0.5},
                                                 {"type": "quant_lsq", "bits": 8}]}, total_steps=4, example_inputs=x)
    with pytest.raises(ArtifactError, match="still carries its training masks"):
        export_onnx(model, tmp_path / "m.onnx", seq_len=12)
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_whose_heads_were_pruned_before_is_told_what_compresses_it_further():
    """An earlier run's model (layers of different head counts): the target's refusal said "set the prune_heads
    sparsity without a target", which prune_heads then refused too."""
    import jointcompress
    from jointcompress.errors import RecipeError

    model = tiny_bert()
    prune_heads(model, [[0, 1], [2], [0, 1, 2, 3], [1, 3]])  # the heads each layer keeps
    with pytest.raises(RecipeError, match=r"different head counts \[2, 1, 4, 2\].*further with prune_layers"):
        jointcompress.prepare(model, {"techniques": [{"type": "prune_heads", "sparsity": 0.5}]}, total_steps=4,
                              example_inputs=data())


def test_an_int8_model_that_disagrees_on_many_rows_is_said_though_within_the_logit_tolerance():
    """Small logits pass the absolute tolerance (1.0): an int8 MiniLM that disagreed with the fp32 student on 9% of
    the dev rows was printed as "ok" with no word."""
    from jointcompress.hf.int8 import check_logits
    from jointcompress.hf.pipeline import _say_low_agreement

    reference = torch.tensor([[0.01, 0.02]] * 10)
    candidate = reference.clone()
    candidate[0] = torch.tensor([0.03, 0.0])  # one row of ten flips: 90% agreement, 0.03 apart at most
    said = []
    _say_low_agreement(check_logits(reference, candidate, atol=1.0), said.append)
    assert len(said) == 1 and "differs from the fp32 student's on 10.0% of the dev rows" in said[0]
    said.clear()
    _say_low_agreement(check_logits(reference, reference, atol=1.0), said.append)
    assert not said

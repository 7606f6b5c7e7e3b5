"""compress() and the evaluation / deployment helpers on Hugging Face models, the way README.md and
docs/your-model.md show them: `result.finalize()` must finalize as `session.finalize()` does (FFN
neurons physically removed, mask hooks off, the artifact round-trips), and every place that reads a
model's outputs to evaluate it must read a transformers `ModelOutput` as training does (logits_of)."""
from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification  # noqa: E402

from jointcompress import compress  # noqa: E402
from jointcompress.artifact import load, save  # noqa: E402
from jointcompress.hf.causal import arithmetic_rows as rows, with_ffn_widths  # noqa: E402


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                        tie_word_embeddings=False)).eval()


def vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()


def images(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_result_finalize_removes_pruned_ffn_neurons_and_the_artifact_round_trips(tmp_path):
    """Result.finalize() went through the core finalize only: the FFN widths stayed, the mask pre-hooks
    stayed on the model (so the in-memory logits looked right), and save wrote the unmasked weights,
    whose loaded logits differed by ~0.1. It now takes session.finalize()'s path (hf.finalize)."""
    teacher = llama()
    model = copy.deepcopy(teacher)
    ids, mask = rows(32, 0)
    labels = ids.masked_fill(mask == 0, -100)
    data = torch.utils.data.DataLoader([{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
                                        for i in range(32)], batch_size=16)
    recipe = {"training": {"epochs": 2, "lr": 3e-3},
              "techniques": [{"type": "prune_ffn", "sparsity": 0.5, "end": 0.5},
                             {"type": "quant_lsq", "bits": 4, "exclude": ["lm_head"]}]}
    result = compress(model, recipe, data, lambda m: 0.0, distributed=False)
    x = {"input_ids": rows(8, 1)[0], "attention_mask": rows(8, 1)[1]}
    with torch.no_grad():
        masked = model.eval()(**x).logits
        spec = result.finalize()
        final = model(**x).logits
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert all(w < 64 for w in widths), widths  # the neurons are gone, not masked
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == widths
    assert not [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert torch.allclose(final, masked, atol=1e-4)  # finalize keeps what the masked model computed
    assert result.finalize() is spec  # a second call: the model is finalized already
    builder = with_ffn_widths(llama, model.config.intermediate_per_layer)
    save(model, spec, tmp_path / "art", builder=builder, example_inputs=result.example_inputs)
    with torch.no_grad():
        loaded = load(tmp_path / "art", builder).eval()(**x).logits
    assert torch.equal(loaded, final)


def test_evaluator_reads_the_logits_of_a_model_output():
    """accuracy() called `.argmax` on the model's outputs: a ViTForImageClassification (ImageClassifierOutput)
    trained, then crashed in the evaluator (compress, the CLI teacher training and bench --data)."""
    from jointcompress.data import accuracy, evaluator

    x, y = images(8)
    acc = evaluator(x, y)(vit())["accuracy"]
    assert 0.0 <= acc <= 1.0
    assert accuracy(vit(), x, y, batch_size=3) == acc


def test_export_and_check_compares_a_bare_hf_models_logits(tmp_path):
    """export_and_check exported a bare HF model, then failed in parity.compare on `ModelOutput.float()`."""
    pytest.importorskip("onnxruntime")
    from jointcompress.deploy import export_and_check

    x, y = images(4)
    report = export_and_check(vit(), tmp_path / "vit.onnx", x[:2], eval_data=(x, y))
    assert report.samples == 4 and report.max_abs_logit_diff < 1e-3
    assert report.metric_reference == report.metric_deployed


def test_the_core_finalize_refuses_a_model_that_still_carries_unit_masks():
    """jointcompress.finalize(model) left prune_ffn's hooks on: the neurons masked, not removed, and
    save wrote the unmasked weights without a word. It names the call that removes them now."""
    import jointcompress
    from jointcompress.errors import JointCompressError

    model = llama()
    x = {"input_ids": rows(4, 1)[0], "attention_mask": rows(4, 1)[1]}
    session = jointcompress.prepare(model, {"techniques": [{"type": "prune_ffn", "sparsity": 0.5}]},
                                    total_steps=4, example_inputs=x)
    with pytest.raises(JointCompressError, match=r"prune_ffn masks.*session.finalize\(\)"):
        jointcompress.finalize(model, x)
    session.finalize()
    assert all(layer.mlp.up_proj.out_features < 64 for layer in model.model.layers)
    assert not any(m._forward_pre_hooks for m in model.modules())

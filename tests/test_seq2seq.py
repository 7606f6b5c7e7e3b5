"""Encoder-decoder models (T5, BART) distilled through the session. Their teacher was called without the
labels, so its decoder had no inputs: T5 raised "You must specify exactly one of input_ids or inputs_embeds",
and BART built its decoder inputs from the encoder's input_ids, distilling other positions than the student's
(the distill term of an exact copy of the teacher read 0.006, not 0). The encoder's attention_mask was also the
token mask over the decoder's positions."""
from __future__ import annotations

import copy
import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers as T  # noqa: E402

import jointcompress  # noqa: E402
from jointcompress.session.outputs import decoder_token_mask, split_batch  # noqa: E402

V = 64


def t5():
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)).eval()


def bart():
    torch.manual_seed(0)
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
        decoder_start_token_id=2, forced_eos_token_id=None)).eval()


def batch(target_length: int):
    g = torch.Generator().manual_seed(0)
    source = torch.randint(5, V, (4, 10), generator=g)
    labels = source.flip(1)[:, :target_length].clone()
    labels[0, -3:] = -100  # a padded target row
    return {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": labels}


@pytest.mark.parametrize("build", [t5, bart])
@pytest.mark.parametrize("target_length", [10, 7])  # as long as the source, and shorter
def test_the_teacher_reads_the_students_decoder_positions(build, target_length):
    teacher = build()
    student = copy.deepcopy(teacher)
    session = jointcompress.prepare(student, {"techniques": [{"type": "distill_kd", "temperature": 1.0, "alpha": 1.0}]},
                                    total_steps=2, teacher=teacher)
    b = batch(target_length)
    b["attention_mask"][1, -2:] = 0  # a padded source row: the encoder's mask says nothing of the labels' padding
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        terms = session.loss(student(**b), b)
    assert float(terms["distill"]) == 0.0  # an exact copy of the teacher
    mask = session.ctx.batch_extra["token_mask"]
    assert mask.shape == b["labels"].shape and int(mask.sum()) == b["labels"].numel() - 3


def test_a_decoder_attention_mask_is_the_token_mask():
    b = batch(7)
    b["decoder_attention_mask"] = torch.ones(4, 7, dtype=torch.long)
    assert torch.equal(decoder_token_mask(split_batch(b)), b["decoder_attention_mask"])


@pytest.mark.parametrize("build", [t5, bart])
def test_a_compressed_encoder_decoder_saves_loads_and_generates_the_same(build, tmp_path):
    from jointcompress.artifact import load, save

    teacher = build()
    student = copy.deepcopy(teacher)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5, "exclude": ["lm_head"]},
                             {"type": "quant_lsq", "bits": 4, "exclude": ["lm_head"]},
                             {"type": "distill_kd", "temperature": 2.0, "alpha": 0.5}]}
    session = jointcompress.prepare(student, recipe, total_steps=4, teacher=teacher)
    opt = torch.optim.AdamW(session.param_groups(lr=3e-3))
    session.bind(opt)
    b = batch(7)
    student.train()
    for _ in range(4):
        terms = session.loss(student(**b), b)
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    student.eval()
    with torch.no_grad():
        masked = student(**b).logits
    spec = session.finalize()
    with torch.no_grad():
        assert torch.allclose(student(**b).logits, masked, atol=1e-5)
    save(student, spec, tmp_path / "artifact", builder=build, example_inputs=b)
    loaded = load(tmp_path / "artifact", build).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, student(**b).logits)
    prompt = b["input_ids"][:2]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5, do_sample=False),
                       student.generate(prompt, max_new_tokens=5, do_sample=False))

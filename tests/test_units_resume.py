"""Resuming a run with transformer unit pruning (prune_ffn / prune_heads, techniques/prune_units) ends
exactly where the uninterrupted run ends: the unit mask's schedule state (window open, hard, temperature)
travels in the session's state, because a resumed session does not re-run the schedule update of the
step it was saved at. Also the messages of the unit techniques on a model they do not support and of
an artifact loaded with a builder that builds a transformers model's unpruned FFN widths."""
from __future__ import annotations

import io

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_helpers import tiny_bert, tiny_llama as llama  # noqa: E402

import jointcompress  # noqa: E402
from jointcompress import ArtifactError, RecipeError  # noqa: E402
from jointcompress.artifact.store import check_shapes  # noqa: E402
from jointcompress.hf.causal import arithmetic_rows as rows, with_ffn_widths  # noqa: E402

STEPS = 12


def _lm_batches():
    ids, mask = rows(48, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": labels[i:i + 8]}
            for i in range(0, 48, 8)], {"input_ids": rows(8, 1)[0], "attention_mask": rows(8, 1)[1]}


def _cls_batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (48, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0
    labels = (ids[:, 1] > 30).long()
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": labels[i:i + 8]}
               for i in range(0, 48, 8)]
    return batches, {"input_ids": ids[:8], "attention_mask": mask[:8]}


def bert():
    """Without dropout: the resumed run's torch RNG is not the uninterrupted run's (the loop's business)."""
    model = tiny_bert(layers=2, seed=0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


CASES = {
    "llama_prune_ffn": (llama, {"type": "prune_ffn", "sparsity": 0.5, "end": 0.5}, _lm_batches),
    "bert_prune_heads": (bert, {"type": "prune_heads", "sparsity": 0.5, "end": 0.5}, _cls_batches),
}


def _make(build, technique):
    model = build()
    model.train()
    session = jointcompress.prepare(model, {"techniques": [technique]}, total_steps=STEPS)
    opt = torch.optim.Adam(session.param_groups(lr=3e-3))
    session.bind(opt)
    return model, session, opt


def _train(model, session, opt, batches, start, stop, save_at=None):
    saved = None
    for s in range(start, stop):
        if s == save_at:  # as a checkpoint holds it: saved and read back without unpickling objects
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "session": session.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
        b = batches[s % len(batches)]
        terms = session.loss(model(**b), b)
        opt.zero_grad()
        session.backward(terms)
        session.before_step()
        opt.step()
        session.after_step()
    return saved


def _mask_state(session):
    m = session.techniques[0].mask
    return m.active, m.hard, m.temperature, m.scores.detach().clone()


@pytest.mark.parametrize("save_at", [3, 8], ids=["inside_window", "after_window"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_unit_pruning_ends_where_the_uninterrupted_run_ends(case, save_at):
    build, technique, data = CASES[case]
    batches, probe = data()
    torch.manual_seed(1)
    m1, s1, o1 = _make(build, technique)
    saved = _train(m1, s1, o1, batches, 0, STEPS, save_at=save_at)
    m1.eval()

    # the mask right after the load is the uninterrupted run's at that step
    mid, sm, om = _make(build, technique)
    _train(mid, sm, om, batches, 0, save_at)
    m2, s2, o2 = _make(build, technique)
    s2.load_state_dict(saved["session"])
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    at_load, uninterrupted = _mask_state(s2), _mask_state(sm)
    assert at_load[:3] == uninterrupted[:3]
    assert torch.equal(at_load[3], uninterrupted[3])

    _train(m2, s2, o2, batches, save_at, STEPS)
    m2.eval()
    end1, end2 = _mask_state(s1), _mask_state(s2)
    assert end1[:3] == end2[:3] and end1[1] is True  # hard top-k at the end of both
    assert torch.equal(end1[3], end2[3])
    assert s1.techniques[0].kept() == s2.techniques[0].kept()
    with torch.no_grad():
        assert torch.equal(m1(**probe).logits, m2(**probe).logits)


def test_unit_pruning_on_an_unsupported_model_names_the_supported_ones_and_prune_structured():
    with pytest.raises(RecipeError) as ffn:
        jointcompress.prepare(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                              {"techniques": [{"type": "prune_ffn", "sparsity": 0.5}]}, total_steps=4)
    text = str(ffn.value)
    assert "prune_ffn" in text and "llama" in text and "gpt2" in text and "bert" in text
    assert "prune_structured" in text and "ViT" in text
    with pytest.raises(RecipeError) as heads:
        jointcompress.prepare(torch.nn.Linear(4, 2), {"techniques": [{"type": "prune_heads", "sparsity": 0.5}]},
                              total_steps=4)
    text = str(heads.value)
    assert "prune_heads" in text and "bert" in text and "llama" not in text and "prune_structured" in text


def _records(model):
    return {k: {"shape": list(v.shape)} for k, v in model.state_dict().items()}


def test_artifact_of_pruned_ffn_widths_with_the_plain_builder_says_how_to_rebuild():
    pruned = with_ffn_widths(llama, [31, 33])()
    with pytest.raises(ArtifactError) as err:
        check_shapes(llama(), {}, _records(pruned), "art")
    text = str(err.value)
    assert "with_ffn_widths(build, [31, 33])" in text and "load_hf_artifact" in text
    assert "--data" not in text and "images" not in text
    check_shapes(pruned, {}, _records(pruned), "art")  # the documented builder fits


def test_artifact_of_an_image_model_keeps_the_image_advice():
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))
    with pytest.raises(ArtifactError) as err:
        check_shapes(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 2, 1)), {}, _records(small), "art")
    text = str(err.value)
    assert "--data of the images" in text and "with_ffn_widths" not in text

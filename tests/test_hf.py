"""HF support: head/FFN/layer pruning, round-trip, student init, KD loss, export, int8."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hf_helpers import inputs, tiny_bert, tiny_deberta, tiny_distilbert, tiny_electra, tiny_roberta, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import jointcompress.hf  # noqa: E402,F401
from jointcompress.errors import ArtifactError, RecipeError  # noqa: E402
from jointcompress.hf.export import export_folder, load_pipeline  # noqa: E402
from jointcompress.hf.ffn import attach_ffn_mask, ffn_widths, new_ffn_mask, prune_ffn  # noqa: E402
from jointcompress.hf.heads import attach_head_mask, head_counts, new_head_mask, prune_heads  # noqa: E402
from jointcompress.hf.masks import UnitMask, temperature_schedule  # noqa: E402
from jointcompress.hf.modeling_pruned import ARCH, family, get_sub, layers  # noqa: E402
from jointcompress.hf.student import Distiller, kd_loss, make_student, student_layer_map  # noqa: E402

MAKERS = [tiny_bert, tiny_distilbert, tiny_roberta, tiny_electra, tiny_deberta]
HEADS_KEEP = [[0, 2], [1], [0, 1, 2, 3], [3]]
FFN_KEEP = [list(range(0, 64, 2)), [1, 5], list(range(64)), [7]]


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def binary_mask(keep, rows, cols):
    m = torch.zeros(rows, cols)
    for i, k in enumerate(keep):
        m[i, k] = 1.0
    return m


def fixed_mask(model_mask: UnitMask, values: torch.Tensor) -> UnitMask:
    model_mask.forward = lambda: values  # a constant 0/1 mask
    return model_mask


@pytest.mark.parametrize("make", MAKERS)
def test_head_pruning_changes_shapes_and_matches_masked_model(make):
    model, x = make(), inputs()
    mask = fixed_mask(new_head_mask(model, keep=8), binary_mask(HEADS_KEEP, 4, 4))
    handles = attach_head_mask(model, mask)
    masked = logits(model, x)
    for h in handles:
        h.remove()
    prune_heads(model, HEADS_KEEP)
    a = ARCH[family(model.config)]
    assert head_counts(model) == [2, 1, 4, 1]
    for layer, n in zip(layers(model), [2, 1, 4, 1]):
        assert get_sub(layer, a["q"]).weight.shape == (n * 8, 32)
        assert get_sub(layer, a["v"]).weight.shape == (n * 8, 32)
        assert get_sub(layer, a["o"]).weight.shape == (32, n * 8)
    assert model.config.heads_per_layer == [2, 1, 4, 1]
    torch.testing.assert_close(logits(model, x), masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", MAKERS)
def test_ffn_pruning_shrinks_intermediate_and_matches_masked_model(make):
    model, x = make(), inputs()
    mask = fixed_mask(new_ffn_mask(model, keep=100), binary_mask(FFN_KEEP, 4, 64))
    handles = attach_ffn_mask(model, mask)
    masked = logits(model, x)
    for h in handles:
        h.remove()
    prune_ffn(model, FFN_KEEP)
    assert ffn_widths(model) == [32, 2, 64, 1]
    assert model.config.intermediate_per_layer == [32, 2, 64, 1]
    torch.testing.assert_close(logits(model, x), masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", MAKERS)
def test_pruned_model_round_trips_with_identical_logits(make, tmp_path):
    model, x = make(), inputs()
    prune_heads(model, HEADS_KEEP)
    prune_ffn(model, FFN_KEEP)
    before = logits(model, x)
    export_folder(model, tiny_tokenizer(tmp_path), tmp_path / "out")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(model)
    assert head_counts(loaded) == [2, 1, 4, 1] and ffn_widths(loaded) == [32, 2, 64, 1]
    assert torch.equal(logits(loaded, x), before)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "again").eval()
    assert torch.equal(logits(again, x), before)


@pytest.mark.parametrize("make", MAKERS)
def test_exported_folder_works_in_pipeline(make, tmp_path):
    model = make()
    prune_heads(model, HEADS_KEEP)
    tok = tiny_tokenizer(tmp_path)
    out = export_folder(model, tok, tmp_path / "out")
    texts = ["good movie", "awful boring plot"]
    enc = tok(texts, return_tensors="pt", padding=True)
    probs = F.softmax(logits(model, {k: enc[k] for k in ("input_ids", "attention_mask")}), -1)
    for task in ("text-classification", "sentiment-analysis"):
        preds = load_pipeline(out, task)(texts)
        for p, row in zip(preds, probs):
            assert p["label"] == model.config.id2label[int(row.argmax())]
            assert p["score"] == pytest.approx(float(row.max()), abs=1e-5)


def test_export_refuses_model_with_mask_hooks(tmp_path):
    model = tiny_bert()
    attach_head_mask(model, new_head_mask(model, keep=8))
    with pytest.raises(ArtifactError, match="hooks"):
        export_folder(model, tiny_tokenizer(tmp_path), tmp_path / "out")


@pytest.mark.parametrize("make", MAKERS)
def test_student_has_the_chosen_teacher_layers(make):
    teacher = make(layers=6)
    keep = [1, 3, 5]
    student = make_student(teacher, keep)
    t_layers, s_layers = layers(teacher), layers(student)
    assert len(s_layers) == 3 and len(t_layers) == 6
    for s_idx, t_idx in enumerate(keep):
        t_state, s_state = t_layers[t_idx].state_dict(), s_layers[s_idx].state_dict()
        assert t_state.keys() == s_state.keys()
        for k in t_state:
            assert torch.equal(t_state[k], s_state[k])
            assert s_state[k].data_ptr() != t_state[k].data_ptr()  # a copy, not shared
    s_emb = student.base_model.embeddings.word_embeddings.weight
    assert torch.equal(s_emb, teacher.base_model.embeddings.word_embeddings.weight)
    assert student.config.to_dict()[ARCH[family(student.config)]["n_layers"]] == 3
    assert make_student(teacher, 2).config.jc_student_of_layers == [2, 5]
    assert make_student(student, [0, 2]).config.jc_student_of_layers == [keep[0], keep[2]]  # the original's layers
    logits(student, inputs())  # still runs


def test_kd_loss_equals_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    T, alpha = 3.0, 0.7
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, T, alpha), alpha * T * T * kl)
    assert float(kd_loss(t, t, T, alpha)) == pytest.approx(0.0, abs=1e-6)


def test_distiller_hidden_projection_gets_gradients():
    teacher = tiny_bert(layers=4, hidden=32).train()
    student = tiny_bert(layers=2, hidden=16, heads=2)
    dist = Distiller(teacher, hidden_weight=1.0, ce_weight=0.5, layer_map={1: 2, 2: 4},
                     student_dim=16, teacher_dim=32)
    batch = dict(inputs(), labels=torch.tensor([0, 1, 1]))
    loss = dist(student, batch)
    loss.backward()
    assert math.isfinite(loss.item())
    assert dist.projs["1"].proj.weight.grad is not None
    assert not any(p.grad is not None for p in teacher.parameters())
    # the user's teacher object is left as given: it set requires_grad False on every parameter
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert student_layer_map([1, 3, 5]) == {1: 2, 2: 4, 3: 6}


def test_distiller_reads_the_teachers_width_from_its_config():
    """student_dim alone made no projection (the teacher's width taken to be the student's), and the first call
    failed on hidden states of 16 and 32 features."""
    teacher, student = tiny_bert(layers=4, hidden=32), tiny_bert(layers=2, hidden=16, heads=2)
    dist = Distiller(teacher, hidden_weight=1.0, layer_map={1: 2}, student_dim=16)
    loss = dist(student, dict(inputs(), labels=torch.tensor([0, 1, 1])))
    assert math.isfinite(loss.item()) and dist.projs["1"].proj.weight.shape == (32, 16)


def test_unit_mask_topk_is_exact_and_keeps_one_per_layer():
    scores = torch.tensor([[5.0, 4.0, 3.0], [-9.0, -8.0, -7.0]])
    m = UnitMask(2, 3, keep=3, init=scores)
    hard = m.topk()
    assert hard.sum() == 3 and hard[1].sum() == 1 and hard[0, :2].sum() == 2
    assert m.kept() == [[0, 1], [2]]
    m.hard = True
    out = m()
    assert torch.equal(out.detach(), hard)
    out.sum().backward()  # straight-through: scores still get gradients
    assert m.scores.grad is not None and m.scores.grad.abs().sum() > 0
    with pytest.raises(RecipeError, match="keep"):
        UnitMask(4, 3, keep=2)


def test_temperature_schedule_anneals_then_goes_hard():
    t0, hard0 = temperature_schedule(0, 100, 1.0, 0.01, hard_from=0.5)
    t_mid, _ = temperature_schedule(25, 100, 1.0, 0.01, hard_from=0.5)
    t_end, hard_end = temperature_schedule(60, 100, 1.0, 0.01, hard_from=0.5)
    assert t0 == 1.0 and not hard0 and t_mid == pytest.approx(0.1) and hard_end and t_end == 0.01


def test_prune_errors_name_the_problem():
    model = tiny_bert()
    with pytest.raises(RecipeError, match="0 heads"):
        prune_heads(model, [[0], [], [0], [0]])
    with pytest.raises(RecipeError, match="layers"):
        prune_ffn(model, [[0]])


def test_centered_soft_mask_tends_to_the_topk_mask():
    torch.manual_seed(0)
    m = UnitMask(3, 5, keep=6, init=torch.randn(3, 5))
    m.temperature = 1e-4
    torch.testing.assert_close(m.soft(), m.topk())
    m.temperature = 1.0
    assert ((m.soft() > 0) & (m.soft() < 1)).all()


@pytest.mark.parametrize(("prune", "keep", "message"), [
    (prune_heads, [[0], [1], [4], [0]], r"layer 2: heads indices \[4\] out of range 0\.\.3"),
    (prune_heads, [[0], [1]], "keep lists heads for 2 layers but the model has 4"),
    (prune_ffn, [[0], [], [1], [2]], "layer 1: cannot keep 0 FFN neurons"),
    (prune_ffn, [[0], [1], [-1], [2]], "layer 2: FFN neurons indices"),
])
def test_bad_keep_lists_name_the_layer_and_leave_the_model_whole(prune, keep, message):
    """A bad keep list is a RecipeError naming the layer, raised before any layer is cut."""
    model = tiny_bert()
    before = (head_counts(model), ffn_widths(model))
    with pytest.raises(RecipeError, match=message):
        prune(model, keep)
    assert (head_counts(model), ffn_widths(model)) == before


def test_make_student_of_an_unsupported_family_is_named():
    """A plain ValueError about 'head/FFN/layer pruning' came out of make_student for a model type it does not know."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from jointcompress.errors import UnsupportedModelError

    teacher = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match="make_student: model_type 'gpt_neox' is not supported for a student"):
        make_student(teacher, 1)


def test_a_qwen2_student_keeps_the_attention_kind_of_each_layer_it_keeps(tmp_path):
    """Qwen2's config lists each layer's attention kind (layer_types): dropping layers left the list at the
    teacher's length, and the student's save_pretrained failed validation."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=32)).eval()
    student = make_student(teacher, [0, 2])
    assert len(student.config.layer_types) == 2
    student.save_pretrained(tmp_path / "s")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()(ids).logits, student(ids).logits)

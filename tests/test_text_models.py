"""Transformers' own sequence classifiers (tiny random configs) compressed as they are, with
dict batches through compress(): unstructured pruning + LSQ + KD, finalize keeps the logits.
ALBERT shares one layer across depth: its masks and quantizers act on every use of it."""
from __future__ import annotations

import copy

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from jointcompress import compress, finalize  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, num_labels=2)


def _build(name):
    cfgs = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification, {}),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification, {"pad_token_id": 1}),
        "electra": (transformers.ElectraConfig, transformers.ElectraForSequenceClassification, {"embedding_size": 16}),
        "deberta_v2": (transformers.DebertaV2Config, transformers.DebertaV2ForSequenceClassification, {}),
        "albert": (transformers.AlbertConfig, transformers.AlbertForSequenceClassification, {"embedding_size": 16}),
    }
    cfg_cls, model_cls, extra = cfgs[name]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**SMALL, **extra)).eval()


def _loader(n=32, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    labels = (ids[:, 1] > 30).long()
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["bert", "roberta", "electra", "deberta_v2", "albert"])
def test_sequence_classifier_compress_finalize_parity(name):
    teacher = _build(name)
    model = copy.deepcopy(teacher)
    recipe = {"techniques": [{"type": "prune_unstructured", "sparsity": 0.5, "end": 0.5, "targets": ["*encoder*"]},
                             {"type": "quant_lsq", "bits": 4, "targets": ["*encoder*"]},
                             {"type": "distill_kd", "alpha": 0.5}],
              "training": {"epochs": 2, "lr": 1e-3}}
    res = compress(model, recipe, _loader(), lambda m: {"accuracy": 0.0}, teacher=teacher)
    assert abs(res.summary()["prune_unstructured.sparsity"] - 0.5) < 0.01
    assert set(res.history.epochs[-1]["losses"]) == {"task", "distill"}
    batch = next(iter(_loader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        masked = model(**inputs).logits
    spec = finalize(model, res.example_inputs)
    assert spec.layers and all(ls.bits == 4 for ls in spec.layers.values())
    with torch.no_grad():
        final = model(**inputs).logits
    assert torch.allclose(masked, final, atol=1e-4), (masked - final).abs().max()

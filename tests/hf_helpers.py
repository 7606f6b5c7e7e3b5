"""Tiny random HF models and a tiny tokenizer for the HF tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

WORDS = "good bad great awful movie film fun boring plot acting love hate the a is was".split()
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


def tiny_bert(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=64, num_labels=2, id2label=LABELS,
                     label2id={v: k for k, v in LABELS.items()})
    return BertForSequenceClassification(cfg).eval()


def tiny_distilbert(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=64, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                           max_position_embeddings=64, num_labels=2, id2label=LABELS,
                           label2id={v: k for k, v in LABELS.items()})
    return DistilBertForSequenceClassification(cfg).eval()


def tiny_tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def inputs(batch: int = 3, seq: int = 10, seed: int = 1, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}

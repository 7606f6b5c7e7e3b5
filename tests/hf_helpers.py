"""Tiny random HF models and a tiny tokenizer for the HF tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

WORDS = "good bad great awful movie film fun boring plot acting love hate the a is was".split()
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


def _bert_like(config_cls, model_cls, layers: int, heads: int, hidden: int, ffn: int, seed: int, positions: int):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=positions, num_labels=2, id2label=LABELS,
                     label2id={v: k for k, v in LABELS.items()})
    return model_cls(cfg).eval()


def tiny_bert(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    return _bert_like(BertConfig, BertForSequenceClassification, layers, heads, hidden, ffn, seed, positions=64)


def tiny_distilbert(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=64, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                           max_position_embeddings=64, num_labels=2, id2label=LABELS,
                           label2id={v: k for k, v in LABELS.items()})
    return DistilBertForSequenceClassification(cfg).eval()


def tiny_roberta(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    # RoBERTa's positions start after its padding index: a few more of them than BERT's
    return _bert_like(RobertaConfig, RobertaForSequenceClassification, layers, heads, hidden, ffn, seed, positions=72)


def tiny_electra(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    # ELECTRA's embeddings narrower than its layers (projected up), as in its small models
    torch.manual_seed(seed)
    cfg = ElectraConfig(vocab_size=64, embedding_size=16, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64, num_labels=2,
                        id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return ElectraForSequenceClassification(cfg).eval()


def tiny_deberta(layers: int = 4, heads: int = 4, hidden: int = 32, ffn: int = 64, seed: int = 0):
    # relative attention with both position terms and their own projections (share_att_key false)
    torch.manual_seed(seed)
    cfg = DebertaV2Config(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=ffn, max_position_embeddings=64, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], share_att_key=False, position_buckets=16, num_labels=2,
                          id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return DebertaV2ForSequenceClassification(cfg).eval()


def tiny_llama():
    """A 2-layer Llama causal LM (64-token vocabulary, FFN width 64), seeded."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def tiny_tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    # `vocab` (transformers 5; its `vocab_file` was ignored: a 5-token tokenizer that read every word as [UNK])
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True)


def inputs(batch: int = 3, seq: int = 10, seed: int = 1, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def teacher_folder(tmp_path: Path, layers: int = 4, heads: int = 4, ffn: int = 64, seed: int = 2) -> Path:
    """A tiny random BERT classifier + tokenizer saved as a teacher folder (tmp_path/teacher)."""
    teacher_dir = tmp_path / "teacher"
    tiny_bert(layers=layers, heads=heads, ffn=ffn, seed=seed).save_pretrained(teacher_dir)
    tiny_tokenizer(tmp_path).save_pretrained(teacher_dir)
    return teacher_dir


def sst2_folder(tmp_path: Path, seed: int = 0, n: int = 40, n_train: int = 32, train_words: int | None = None) -> Path:
    """SST-2 style train.tsv / dev.tsv of random WORDS sentences; label = 'good' count >= 'bad' count.

    train_words limits the training rows to the first WORDS (so dev has words train never saw).
    """
    import random

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        pool = WORDS[:train_words] if train_words and i < n_train else WORDS
        words = [rnd.choice(pool) for _ in range(rnd.randint(2, 8))]
        rows.append((" ".join(words), int(words.count("good") >= words.count("bad"))))
    data = tmp_path / "sst2"
    data.mkdir()
    for name, part in (("train.tsv", rows[:n_train]), ("dev.tsv", rows[n_train:])):
        (data / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in part))
    return data


def logits_without_jointcompress(folder: Path, auto_class: str, inputs: dict, tmp_path: Path) -> torch.Tensor:
    """The logits of the model in `folder` on `inputs`, loaded with transformers' `auto_class` and
    trust_remote_code=True in a fresh process where jointcompress cannot be imported: the folder's own code
    builds it."""
    import subprocess
    import sys

    torch.save(inputs, tmp_path / "inputs.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['jointcompress'] = None  # prove jointcompress is not needed\n"
        f"from transformers import {auto_class} as A\n"
        f"m = A.from_pretrained(r'{folder}', trust_remote_code=True).eval()\n"
        f"x = torch.load(r'{tmp_path / 'inputs.pt'}')\n"
        "with torch.no_grad(): print(repr(m(**x).logits.tolist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "HF_MODULES_CACHE": str(tmp_path / "mods")})
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.tensor(eval(res.stdout.strip().splitlines()[-1]))

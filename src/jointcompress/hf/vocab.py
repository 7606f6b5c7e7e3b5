"""Vocabulary trimming: keep only the word-piece rows a task's training text uses.

Why: in small BERTs the word-embedding matrix is most of the model (MiniLM-L6-H384:
30,522 x 384 = 11.7 M of 22.7 M parameters), and int8 on it alone already exceeds an 8x
size budget. SST-2 training text uses about a third of the vocabulary. Greedy
longest-match WordPiece on a subset of the vocabulary tokenizes every word made of kept
pieces exactly as before, so trimming is lossless on the text it was built from; we also
keep all ASCII single characters (and their ## forms) so unseen words fall back to
characters instead of [UNK]. Only dev/test words never seen in training can change.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from torch import nn

from jointcompress.errors import ArtifactError


def used_ids(tokenizer, texts: list[str]) -> set[int]:
    """Token ids produced for texts (untruncated), plus all special token ids."""
    ids: set[int] = set(tokenizer.all_special_ids)
    for i in range(0, len(texts), 4096):
        for row in tokenizer(texts[i:i + 4096], add_special_tokens=True, truncation=False)["input_ids"]:
            ids.update(row)
    return ids


def check_trimmable(tokenizer) -> None:
    """Before training: trim_vocab's tokenizer is one it can trim (a run refused after training, whose checkpoint
    then could not resume without trim_vocab, was lost)."""
    _wordpiece_json(tokenizer)


def _wordpiece_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ArtifactError("vocabulary trimming needs a fast (tokenizers-backed) tokenizer; set hf.trim_vocab: false")
    data = json.loads(backend.to_str())
    if data["model"]["type"] != "WordPiece":
        raise ArtifactError(
            f"hf.trim_vocab: vocabulary trimming supports WordPiece tokenizers (BERT, DistilBERT), not "
            f"{data['model']['type']}; set hf.trim_vocab: false in the recipe"
        )
    return data


def trim_tokenizer(tokenizer, keep_ids: list[int]):
    """A new tokenizer whose vocabulary is keep_ids (in that order) of the old one."""
    data = _wordpiece_json(tokenizer)
    old_vocab = data["model"]["vocab"]
    id_to_tok = {i: t for t, i in old_vocab.items()}
    new_of = {old: new for new, old in enumerate(keep_ids)}
    data["model"]["vocab"] = {id_to_tok[old]: new for new, old in enumerate(keep_ids)}
    for tok in data.get("added_tokens", []):
        if tok["id"] not in new_of:
            raise ArtifactError(f"special token {tok['content']!r} is not kept; keep all special tokens")
        tok["id"] = new_of[tok["id"]]
    post = data.get("post_processor") or {}
    for spec in post.get("special_tokens", {}).values():
        spec["ids"] = [new_of[i] for i in spec["ids"]]
    if data.get("padding"):
        data["padding"]["pad_id"] = new_of[data["padding"]["pad_id"]]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        vocab_txt = Path(tmp, "vocab.txt")
        if vocab_txt.exists():
            vocab_txt.write_text("\n".join(id_to_tok[i] for i in keep_ids) + "\n", encoding="utf-8")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tmp)


def trim_vocab(model: nn.Module, tokenizer, texts: list[str], extra_ascii: bool = True):
    """Keep only embedding rows used by texts (+ specials, + ASCII chars); in place on model.

    Returns (model, new_tokenizer, kept_old_ids). Raises ArtifactError if the new
    tokenizer does not reproduce the old ids on texts (so a wrong trim never ships).
    """
    ids = used_ids(tokenizer, texts)
    if extra_ascii:
        vocab = tokenizer.get_vocab()
        for ch in string.ascii_letters + string.digits + string.punctuation:
            for tok in (ch, "##" + ch):
                if tok in vocab:
                    ids.add(vocab[tok])
    keep = sorted(ids)
    new_tok = trim_tokenizer(tokenizer, keep)
    remap = torch.full((max(keep) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    sample = texts[: min(len(texts), 2000)]
    old = tokenizer(sample, truncation=False)["input_ids"]
    new = new_tok(sample, truncation=False)["input_ids"]
    for o, n in zip(old, new):
        if remap[torch.tensor(o)].tolist() != n:
            raise ArtifactError("trimmed tokenizer does not reproduce the original ids; report this as a bug")
    emb = model.get_input_embeddings()
    pad = model.config.pad_token_id
    new_pad = int(remap[pad]) if pad is not None else None
    new_emb = nn.Embedding(len(keep), emb.embedding_dim, padding_idx=new_pad,
                           device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight[torch.tensor(keep)])
    model.set_input_embeddings(new_emb)
    model.config.vocab_size = len(keep)
    if pad is not None:
        model.config.pad_token_id = new_pad
    return model, new_tok, keep

"""SST-2 style TSV reading and tokenization to tensors.

Kept separate from the model code so the same loader serves the teacher fine-tune, the
distillation loop and evaluation, and so data problems surface as DataError with the
file and line that is wrong rather than as a shape error deep inside training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from jointcompress.errors import DataError

MAX_LENGTH = 64


@dataclass
class TextDataset:
    """Sentences and integer labels, in file order."""

    sentences: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.sentences)

    def subset(self, n: int | None, seed: int = 0) -> "TextDataset":
        """A reproducible random subset of n rows (all rows if n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].tolist()
        return TextDataset([self.sentences[i] for i in idx], [self.labels[i] for i in idx])


def read_tsv(path: str | Path) -> TextDataset:
    """Read a `sentence<TAB>label` file with a header line (the GLUE SST-2 layout).

    Splits on the last tab so a sentence containing a tab still parses.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; set the recipe's data path to an SST-2 style TSV")
    sentences: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header[:1] != ["sentence"] or header[-1:] != ["label"]:
            raise DataError(f"{path}: header is {header!r}; expected 'sentence<TAB>label'")
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise DataError(f"{path}:{lineno}: no tab separating sentence and label")
            try:
                labels.append(int(label))
            except ValueError:
                raise DataError(f"{path}:{lineno}: label {label!r} is not an integer") from None
            sentences.append(text.strip())
    if not sentences:
        raise DataError(f"{path}: no rows after the header")
    return TextDataset(sentences, labels)


def tokenize(tokenizer, data: TextDataset, max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Tokenize every sentence padded to max_length (fixed shapes make latency comparable)."""
    enc = tokenizer(
        data.sentences,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    out["labels"] = torch.tensor(data.labels, dtype=torch.long)
    return out


def batches(tensors: dict[str, torch.Tensor], batch_size: int, shuffle: bool = False, seed: int = 0,
            trim: bool = True, bucket: int = 0):
    """Yield dict batches; with trim, cut padding to the longest row in the batch.

    Trimming is exact for BERT-style encoders (padded positions are masked out) and makes
    CPU training several times cheaper on SST-2, whose sentences are mostly short. With
    bucket > 0, rows are sorted by length inside windows of bucket*batch_size rows (after
    the shuffle) so batches hold similar lengths; batch order is then shuffled again.
    """
    n = tensors["labels"].shape[0]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    if bucket > 0:
        lengths = tensors["attention_mask"].sum(1)
        window = bucket * batch_size
        chunks = []
        for s in range(0, n, window):
            w = order[s:s + window]
            chunks.append(w[torch.argsort(lengths[w], stable=True)])
        order = torch.cat(chunks)
    starts = list(range(0, n, batch_size))
    if shuffle and bucket > 0:
        starts = [starts[i] for i in torch.randperm(len(starts), generator=g).tolist()]
    for start in starts:
        idx = order[start:start + batch_size]
        batch = {k: v[idx] for k, v in tensors.items()}
        if trim:
            length = int(batch["attention_mask"].sum(1).max())
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                if k in batch:
                    batch[k] = batch[k][:, :length]
        yield batch

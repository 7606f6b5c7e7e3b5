"""Text-classification rows (TSV, CSV, JSON lines) read and tokenized to tensors.

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


# single-text columns tried in this order when hf.text_column is not set
TEXT_COLUMNS = ("sentence", "text")
# column pairs of sentence-pair tasks (GLUE's MRPC / RTE / QNLI / QQP / MNLI, SuperGLUE's BoolQ)
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                ("question1", "question2"), ("question", "passage"))
FORMATS = (".tsv", ".csv", ".jsonl")


def read_rows(path: str | Path, text_column: str | None = None, label_column: str = "label",
              label_names: list[str] | None = None) -> TextDataset:
    """Read a text-classification file: `.tsv` (GLUE's layout, no quoting), `.csv` or `.jsonl`,
    with a header naming its columns (a JSON object per line for `.jsonl`).

    The text is `text_column`, else the first of TEXT_COLUMNS the header has; other columns (an
    index, a source) are ignored. A label is a class index, or one of `label_names` (the
    classifier's label names: "entailment", "positive"), mapped to its index. Why so general:
    results are re-checked on other data than SST-2, saved by other tools (pandas writes CSV,
    `datasets` writes JSON lines, GLUE ships TSV)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give a folder with train and dev files ({', '.join(FORMATS)})")
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unknown format {path.suffix!r}; save the rows as one of {', '.join(FORMATS)}")
    sentences: list[str] = []
    labels: list[int] = []
    text_key = None
    for lineno, header, row in _records(path):
        if text_key is None:
            text_key = _text_column(path, header, text_column, label_column)
        if text_key not in row or label_column not in row:
            missing = text_key if text_key not in row else label_column
            raise DataError(f"{path}:{lineno}: no {missing!r} value in this row")
        sentences.append(str(row[text_key]).strip())
        labels.append(_label(path, lineno, row[label_column], label_names))
    if not sentences:
        raise DataError(f"{path}: no rows after the header")
    return TextDataset(sentences, labels)


def read_tsv(path: str | Path) -> TextDataset:
    """A GLUE SST-2 style `sentence<TAB>label` file (read_rows with its defaults)."""
    return read_rows(path)


def _records(path: Path):
    """(line number, header, {column: value}) per non-empty row."""
    import csv
    import json

    with path.open(encoding="utf-8-sig", newline="") as fh:  # -sig: a spreadsheet's byte-order mark is not a column name
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{lineno}: a JSON object per line expected, got {type(row).__name__}")
                    yield lineno, list(row), row
            return
        if path.suffix == ".tsv":  # GLUE's TSVs are not quoted: a quote is part of the text
            lines = ((i, line.rstrip("\r\n").split("\t")) for i, line in enumerate(fh, start=1))
        else:
            reader = csv.reader(fh)
            lines = ((reader.line_num, fields) for fields in reader)
        lineno, header = next(lines, (1, []))
        for lineno, fields in lines:
            if fields and any(f.strip() for f in fields):
                yield lineno, header, dict(zip(header, _fit(path, lineno, header, fields)))


def _fit(path: Path, lineno: int, header: list[str], fields: list[str]) -> list[str]:
    """The row's fields, one per column; a 2-column file with the text first keeps tabs inside
    its text (everything before the last field is the text, as GLUE's SST-2 reader does)."""
    if len(fields) > len(header) == 2:
        return ["\t".join(fields[:-1]) if path.suffix == ".tsv" else ",".join(fields[:-1]), fields[-1]]
    if len(fields) != len(header):
        sep = "tab" if path.suffix == ".tsv" else "comma"
        raise DataError(f"{path}:{lineno}: {len(fields)} field(s) where the header has {len(header)} "
                        f"({', '.join(header)}){f'; no {sep} separating them' if len(fields) == 1 else ''}")
    return fields


def _text_column(path: Path, header: list[str], text_column: str | None, label_column: str) -> str:
    """The column holding the text (hf.text_column, else the first of TEXT_COLUMNS in the header)."""
    if label_column not in header:
        raise DataError(f"{path}: header is {header!r}, with no {label_column!r} column; name the label column "
                        "with hf.label_column")
    if text_column is not None:
        if text_column not in header:
            raise DataError(f"{path}: header is {header!r}, with no {text_column!r} column (hf.text_column)")
        return text_column
    pair = next((p for p in PAIR_COLUMNS if set(p) <= set(header)), None)
    if pair is not None:
        raise DataError(
            f"{path}: columns {pair[0]!r} and {pair[1]!r} look like a sentence-pair task, which `jointcompress "
            "compress` does not read (it feeds one text per row); compress such a model from Python, where the "
            "session takes the tokenizer's dict batches as they are, or with the transformers Trainer "
            "(docs/your-model.md), or set hf.text_column to classify one column alone")
    found = next((c for c in TEXT_COLUMNS if c in header), None)
    if found is None:
        raise DataError(f"{path}: header is {header!r}; expected a text column ({' or '.join(TEXT_COLUMNS)}) and "
                        f"{label_column!r}, or name the text column with hf.text_column")
    return found


def _label(path: Path, lineno: int, value, names: list[str] | None) -> int:
    """A class index from an integer, an integer string or one of the label names."""
    if isinstance(value, bool) or value is None or isinstance(value, float) and not value.is_integer():
        raise DataError(f"{path}:{lineno}: label {value!r} is not an integer class index")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    if names and text in names:
        return names.index(text)
    known = f" nor one of the label names {names}" if names else ""
    raise DataError(f"{path}:{lineno}: label {text!r} is not an integer class index{known}; list the classes' "
                    "names in hf.labels (in index order) or write the labels as 0..n-1")


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

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
    """Texts and integer labels, in file order; `pairs`: the second text of each row for a
    sentence-pair task (None for single texts)."""

    sentences: list[str]
    labels: list[int]
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.sentences)

    def rows(self, idx: list[int]) -> "TextDataset":
        return TextDataset([self.sentences[i] for i in idx], [self.labels[i] for i in idx],
                           None if self.pairs is None else [self.pairs[i] for i in idx])

    def subset(self, n: int | None, seed: int = 0) -> "TextDataset":
        """A reproducible random subset of n rows (all rows if n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        return self.rows(torch.randperm(len(self), generator=g)[:n].tolist())

    def hold_out(self, n: int, seed: int = 0) -> tuple["TextDataset", "TextDataset"]:
        """(the rows left to train on, n rows held out): a fixed random draw, the same for every run,
        rank and resume, as data.hold_out draws images."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.rows(sorted(order[n:])), self.rows(order[:n])

    def head(self, n: int | None) -> "TextDataset":
        """The first n rows (all if n is None)."""
        return self if n is None else self.rows(list(range(min(n, len(self)))))

    @property
    def texts(self) -> list[str]:
        """Every text of the rows (both of a pair): what a vocabulary must cover."""
        return self.sentences + (self.pairs or [])


# single-text columns tried in this order when hf.text_column is not set
TEXT_COLUMNS = ("sentence", "text")
# column pairs of sentence-pair tasks (GLUE's MRPC / RTE / QNLI / QQP / MNLI, SuperGLUE's BoolQ)
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                ("question1", "question2"), ("question", "passage"))
FORMATS = (".tsv", ".csv", ".jsonl")


def read_rows(path: str | Path, text_column: str | None = None, label_column: str = "label",
              label_names: list[str] | None = None, pair_column: str | None = None,
              columns: list[str] | None = None) -> TextDataset:
    """Read a text-classification file: `.tsv` (GLUE's layout, no quoting), `.csv` or `.jsonl`,
    with a header naming its columns (a JSON object per line for `.jsonl`), or `columns` naming
    them where the file has no header row (GLUE's CoLA).

    The text is `text_column`, else the first of TEXT_COLUMNS the header has; a sentence pair's
    second text is `pair_column`, else, with no text column named, found by PAIR_COLUMNS (GLUE's
    premise / hypothesis, question / sentence, ...). Other columns (an index, a source) are ignored.
    A label is a class index, or one of `label_names` (the classifier's label names: "entailment",
    "positive"), mapped to its index. Why so general: results are re-checked on other data than
    SST-2, saved by other tools (pandas writes CSV, `datasets` writes JSON lines, GLUE ships TSV)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give a folder with train and dev files ({', '.join(FORMATS)})")
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unknown format {path.suffix!r}; save the rows as one of {', '.join(FORMATS)}")
    if columns is not None and path.suffix == ".jsonl":
        raise DataError(f"{path}: hf.columns names the columns of a .tsv / .csv file without a header; a JSON "
                        "object names its own, so remove hf.columns")
    if columns is not None and len(set(columns)) != len(columns):
        raise DataError(f"hf.columns {columns}: a name given twice; name each column once")
    sentences: list[str] = []
    labels: list[int] = []
    pairs: list[str] = []
    keys: tuple[str, str | None] | None = None
    for lineno, header, row in _records(path, label_column, columns):
        if keys is None:
            keys = _text_columns(path, header, text_column, pair_column, label_column, columns is not None)
            if columns is not None and str(row.get(label_column)).strip() in columns:
                raise DataError(f"{path}:{lineno}: this line names columns ({', '.join(map(str, row.values()))}): the file "
                                "has a header row, so remove hf.columns (it names the columns of files without one)")
        for key in (*[k for k in keys if k is not None], label_column):
            if key not in row:
                raise DataError(f"{path}:{lineno}: no {key!r} value in this row")
            if row[key] is None:  # JSON's null: it trained as the text "None"
                raise DataError(f"{path}:{lineno}: {key!r} is null in this row; give it a value (an empty text is \"\"), "
                                "or drop the row")
        sentences.append(str(row[keys[0]]).strip())
        if keys[1] is not None:
            pairs.append(str(row[keys[1]]).strip())
        labels.append(_label(path, lineno, row[label_column], label_names))
    if not sentences:
        raise DataError(f"{path}: no rows after the header")
    return TextDataset(sentences, labels, pairs if keys[1] is not None else None)


def read_tsv(path: str | Path) -> TextDataset:
    """A GLUE SST-2 style `sentence<TAB>label` file (read_rows with its defaults)."""
    return read_rows(path)


def _records(path: Path, label_column: str, columns: list[str] | None = None):
    """(line number, header, {column: value}) per non-empty row; `columns`: the header of a file
    that has none (its first line is a row)."""
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
        lineno, header = (0, list(columns)) if columns is not None else next(lines, (1, []))
        for lineno, fields in lines:
            if fields and any(f.strip() for f in fields):
                yield lineno, header, dict(zip(header, _fit(path, lineno, header, fields, label_column, columns is not None)))


def _fit(path: Path, lineno: int, header: list[str], fields: list[str], label_column: str,
         named: bool = False) -> list[str]:
    """The row's fields, one per column; a 2-column file with the label last keeps tabs (or commas)
    inside its text (everything before the last field is the text, as GLUE's SST-2 reader does)."""
    if len(fields) > len(header) == 2 and header[-1] == label_column:
        return ["\t".join(fields[:-1]) if path.suffix == ".tsv" else ",".join(fields[:-1]), fields[-1]]
    if len(fields) != len(header):
        sep = "tab" if path.suffix == ".tsv" else "comma"
        names = f"hf.columns names {len(header)}" if named else f"the header has {len(header)}"
        fix = "; give hf.columns one name per field" if named else (f"; no {sep} separating them" if len(fields) == 1 else "")
        raise DataError(f"{path}:{lineno}: {len(fields)} field(s) where {names} ({', '.join(header)}){fix}")
    return fields


def _text_columns(path: Path, header: list[str], text_column: str | None, pair_column: str | None,
                  label_column: str, named: bool = False) -> tuple[str, str | None]:
    """(the text's column, the pair's second text's column or None), as read_rows says; `named`: the
    header is hf.columns (the file has none)."""
    if label_column not in header and named:
        raise DataError(f"{path}: hf.columns is {header!r}, with no {label_column!r} column; name the label's column "
                        f"{label_column!r} in hf.columns, or set hf.label_column to the name you gave it")
    if label_column not in header:
        raise DataError(f"{path}: header is {header!r}, with no {label_column!r} column; name the label column "
                        "with hf.label_column (read_rows' label_column= in Python), or, for a file whose first line is "
                        "a row (no header), name its columns with hf.columns")
    for name, field in ((text_column, "hf.text_column"), (pair_column, "hf.pair_column")):
        if name is not None and name not in header:
            raise DataError(f"{path}: header is {header!r}, with no {name!r} column ({field})")
    if text_column is not None:
        return text_column, pair_column
    if pair_column is not None:
        raise DataError(f"{path}: hf.pair_column is {pair_column!r} but hf.text_column is not set; name the first text's "
                        "column too")
    pair = next((p for p in PAIR_COLUMNS if set(p) <= set(header)), None)
    if pair is not None:
        return pair
    found = next((c for c in TEXT_COLUMNS if c in header), None)
    if found is None:
        raise DataError(f"{path}: header is {header!r}; expected a text column ({' or '.join(TEXT_COLUMNS)}) and "
                        f"{label_column!r}, or name the text column with hf.text_column (and a pair's second with "
                        "hf.pair_column)")
    return found, None


def _label(path: Path, lineno: int, value, names: list[str] | None) -> int:
    """A class index from an integer, an integer string, a JSON true / false (BoolQ's: 1 / 0) or one
    of the label names."""
    if value is None or isinstance(value, float) and not value.is_integer():
        raise DataError(f"{path}:{lineno}: label {value!r} is not an integer class index")
    if isinstance(value, (bool, int, float)):
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    if names and text in names:
        return names.index(text)
    if names:  # the classes are known (the teacher's, or hf.labels): a name outside them is a class it has not
        raise DataError(f"{path}:{lineno}: label {text!r} is none of the classes {names} (nor an index 0..{len(names) - 1}); "
                        "drop those rows, or compress a teacher trained on that class (a base encoder's new head takes its "
                        "classes' names from hf.labels)")
    raise DataError(f"{path}:{lineno}: label {text!r} is not an integer class index; list the classes' "
                    "names in hf.labels (in index order) or write the labels as 0..n-1")


def trimmed_length(mask: torch.Tensor) -> int:
    """How many leading positions a batch keeps when its padding is cut off: up to the last position any row
    holds a real token. With right padding that is the longest row; with a tokenizer that pads on the left
    (padding_side: left) every row ends at the last position, so nothing is cut. Cutting to the longest
    row's length kept only [PAD] tokens of short rows there, and the run trained and chose its epoch on
    near-chance accuracy without a word."""
    real = mask.bool().any(0).nonzero()
    return max(1, int(real.max()) + 1) if real.numel() else 1


def tokenize(tokenizer, data: TextDataset, max_length: int = MAX_LENGTH, token_types: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize every row (a pair as two segments) padded to max_length (fixed shapes make latency comparable).
    `token_types`: False for a model with one token type (RoBERTa: type_vocab_size 1), whose embedding of the
    second segment's type 1 failed with an IndexError: its segments are told apart by the separator alone."""
    enc = tokenizer(
        data.sentences,
        data.pairs,  # a sentence pair: two segments ([SEP] between, token types 0 / 1), truncated longest first
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc and token_types:
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
            length = trimmed_length(batch["attention_mask"])
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                if k in batch:
                    batch[k] = batch[k][:, :length]
        yield batch

"""A one-tensor front for HF sequence classifiers, used by the HF recipe path.

The session reads dict batches and ModelOutputs directly (session/outputs.py), so an HF model
can be compressed as it is. The HF recipe path (hf/pipeline.py) still packs input_ids and
attention_mask into one int64 tensor [N, 2, L] (see `pack`): batches then trim to their
longest row (SequenceClassifier), sort into length buckets (BucketBatchSampler) and carry a
sample index for the teacher-logit cache. The output is the logits tensor; `.hf` is the
wrapped model (what gets pruned and exported).
"""

from __future__ import annotations

import torch
from torch import nn

from jointcompress.errors import DataError
from jointcompress.hf.data import trimmed_length
from jointcompress.model_call import call_model


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
         token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[N, L] ids and mask -> one int64 tensor [N, 2, L] (mask of ones when not given); with the
    token types (a sentence pair's segments) [N, 3, L]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = [input_ids, attention_mask] + ([token_type_ids] if token_type_ids is not None else [])
    if input_ids.dim() != 2 or any(r.shape != input_ids.shape for r in rows):
        raise DataError(
            f"pack: input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)}"
            f"{'' if token_type_ids is None else f' and token_type_ids {tuple(token_type_ids.shape)}'} "
            "must all be [batch, length]"
        )
    return torch.stack([r.long() for r in rows], dim=1)


def pair_types(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A tokenizer's token types where some row has a second segment (sentence pairs), else None:
    single texts go on without them (all zeros, the models' default), as they always did."""
    types = tensors.get("token_type_ids")
    return types if types is not None and bool(types.any()) else None


def pack_tokens(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """pack() of a tokenizer's dict (hf.data.tokenize), with the token types of sentence pairs
    (pair_types): [N, 3, L]; single texts stay [N, 2, L]."""
    return pack(tensors["input_ids"], tensors["attention_mask"], pair_types(tensors))


def model_inputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of pack, as the HF model's keyword arguments."""
    if x.dim() != 3 or x.shape[1] not in (2, 3):
        raise DataError(
            f"SequenceClassifier: inputs have shape {tuple(x.shape)}; expected [batch, 2, length] "
            "(input_ids and attention_mask stacked with jointcompress.hf.wrapper.pack; [batch, 3, length] with "
            "token_type_ids)"
        )
    names = ("input_ids", "attention_mask", "token_type_ids")[: x.shape[1]]
    return {name: x[:, i].long() for i, name in enumerate(names)}


def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a packed tensor."""
    inputs = model_inputs(x)
    return inputs["input_ids"], inputs["attention_mask"]


class SequenceClassifier(nn.Module):
    """forward(x [N, 2, L], or [N, 3, L] with token types) -> logits [N, num_labels] of the wrapped HF classifier.

    trim=True cuts the positions after each batch's last real token, its longest row with right padding
    (exact for BERT-style encoders, whose padded positions are masked out; several times cheaper on
    short-sentence data); with left padding nothing is cut (hf.data.trimmed_length).
    """

    def __init__(self, hf: nn.Module, trim: bool = True):
        super().__init__()
        self.hf = hf
        self.trim = trim

    @property
    def config(self):
        return self.hf.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = model_inputs(x)
        mask = inputs["attention_mask"]
        if self.trim and mask.numel():
            length = trimmed_length(mask)
            inputs = {k: v[:, :length] for k, v in inputs.items()}
        return self.hf(**inputs).logits

    def position_mask(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L'] bool: which positions of the hidden states of `forward(x)` are real tokens
        (distill_kd's hidden-state losses leave padding out). L' is the trimmed length."""
        _, mask = unpack(x)
        if self.trim and mask.numel():
            mask = mask[:, : trimmed_length(mask)]
        return mask.bool()


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a SequenceClassifier, or inside a user's own wrapper that holds it as `.hf` as the unit
    pruners read it (prune_units._hf_model; finalize failed on such a wrapper after the whole run had trained),
    or the model itself."""
    inner = getattr(model, "hf", None)
    return inner if isinstance(inner, nn.Module) else model


class BucketBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of similar length: rows are shuffled, sorted by length inside windows
    of `bucket` batches, cut into batches, and the batch order shuffled again (as
    hf.data.batches does). With SequenceClassifier's trimming, a batch costs its longest row,
    so this makes CPU training several times cheaper on short-sentence data. The shuffle
    draws from `generator` only, so the DataLoader's generator state replays an epoch exactly
    (the loop's mid-epoch resume relies on that).

    Data-parallel (world > 1): every rank draws the same global batches from an identically
    seeded generator and keeps rows rank::world of each, so `batch_size` stays the global
    batch and every rank runs the same number of steps as a single process would."""

    shards_itself = True  # distributed.shard_loader leaves a loader with this sampler alone

    def __init__(self, lengths: torch.Tensor, batch_size: int, bucket: int, generator: torch.Generator,
                 rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise DataError(f"BucketBatchSampler: rank {rank} is not in 0..{world - 1}")
        self.lengths, self.batch_size, self.bucket, self.generator = lengths, batch_size, bucket, generator
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n, bs = len(self.lengths), self.batch_size
        order = torch.randperm(n, generator=self.generator)
        window = self.bucket * bs
        chunks = []
        for s in range(0, n, window):
            w = order[s:s + window]
            chunks.append(w[torch.argsort(self.lengths[w], stable=True)])
        order = torch.cat(chunks)
        batches = [order[s:s + bs].tolist() for s in range(0, n, bs)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield self._shard(batches[i])

    def _shard(self, batch: list[int]) -> list[int]:
        if self.world == 1:
            return batch
        mine = batch[self.rank::self.world]
        return mine or [batch[self.rank % len(batch)]]  # a last batch smaller than the world: repeat a row


def tensor_loader(tensors: dict[str, torch.Tensor], batch_size: int, shuffle: bool = True, seed: int = 0,
                  bucket: int = 50, rank: int = 0, world: int = 1):
    """A DataLoader of (pack_tokens(tensors), labels, index) from tokenize()'s dict.

    Bypasses data.check_tensors (which wants float inputs): token ids are integers. With
    shuffle and bucket > 0, batches hold rows of similar length (BucketBatchSampler), sharded
    over `world` data-parallel ranks when world > 1 (batch_size is then the global batch).
    """
    if world > 1 and not (shuffle and bucket > 0):
        raise DataError("tensor_loader: data-parallel loading needs shuffle=True and bucket > 0 (BucketBatchSampler)")
    from torch.utils.data import DataLoader, TensorDataset

    x = pack_tokens(tensors)
    y = tensors["labels"].long()
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(x, y, torch.arange(len(y)))
    if shuffle and bucket > 0:
        sampler = BucketBatchSampler(x[:, 1].sum(1), batch_size, bucket, g, rank=rank, world=world)
        return DataLoader(ds, batch_sampler=sampler, generator=g)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> float:
    """Top-1 accuracy of a SequenceClassifier on packed inputs (eval mode, restored after)."""
    was = model.training
    model.eval()
    order = torch.argsort(x[:, 1].sum(1), stable=True)  # similar lengths per batch: less padding
    correct = 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        correct += int((call_model(model, x[idx]).argmax(-1).cpu() == y[idx].cpu()).sum())
    model.train(was)
    return correct / max(1, len(y))

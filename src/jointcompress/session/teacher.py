"""The teacher's logits for a batch: computed once under no_grad, cached per sample index.

Distillation needs the frozen teacher's logits on every batch. When the loader carries a
sample index (core loaders do) and distill_kd has `cache_teacher` without feature losses,
they are computed during the first epoch and reused after it; feature losses need the
teacher's intermediate outputs, so the teacher then runs on every batch.
"""
from __future__ import annotations

import torch

from .outputs import Batch, call_model, logits_of


class TeacherCache:
    """Teacher logits per sample index, filled during the first epoch and reused after it.

    Held as one tensor plus a "have" flag per index, so a batch is looked up with one
    gather instead of a Python loop over its samples.
    """

    def __init__(self):
        self.logits: torch.Tensor | None = None
        self.have = torch.zeros(0, dtype=torch.bool)

    def get(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.logits is None or int(idx.max()) >= len(self.have) or not bool(self.have[idx].all()):
            return None
        return self.logits[idx]

    def put(self, idx: torch.Tensor, out: torch.Tensor) -> None:
        need = int(idx.max()) + 1
        if self.logits is None or need > len(self.have):
            size = max(need, 2 * len(self.have))
            logits = out.new_zeros((size,) + tuple(out.shape[1:]))
            have = torch.zeros(size, dtype=torch.bool)
            if self.logits is not None:
                logits[: len(self.have)] = self.logits
                have[: len(self.have)] = self.have
            self.logits, self.have = logits, have
        self.logits[idx] = out.detach()
        self.have[idx] = True

    def state(self) -> dict | None:
        if self.logits is None or not bool(self.have.any()):
            return None
        idx = torch.nonzero(self.have).flatten()
        return {"idx": idx, "logits": self.logits[idx]}

    @classmethod
    def from_state(cls, state: dict | None) -> "TeacherCache":
        cache = cls()
        if state is not None and len(state["idx"]):
            cache.put(state["idx"].long(), state["logits"])
        return cache


def run_teacher(teacher, batch: Batch) -> torch.Tensor:
    """The teacher's logits for the batch (no gradient; the teacher is in eval mode)."""
    with torch.no_grad():
        return logits_of(call_model(teacher, batch.teacher_inputs))


def teacher_logits(teacher, batch: Batch, cache: TeacherCache, use_cache: bool) -> torch.Tensor:
    """From the cache when allowed and filled for the batch's indices, else a fresh forward."""
    if not use_cache or batch.index is None:
        return run_teacher(teacher, batch)
    cached = cache.get(batch.index)
    if cached is not None:
        return cached
    out = run_teacher(teacher, batch)
    cache.put(batch.index, out)
    return out

"""The teacher's logits for a batch: computed once under no_grad, cached per sample index.

Distillation needs the frozen teacher's logits on every batch. When the loader carries a
sample index (core loaders do) and distill_kd has `cache_teacher` without feature losses,
they are computed during the first epoch and reused after it; feature losses need the
teacher's intermediate outputs, so the teacher then runs on every batch.
"""
from __future__ import annotations

import warnings

import torch

from .outputs import Batch, call_model, decoder_inputs, logits_of

TEACHER_INPUT_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)  # what torch raises for inputs a model cannot take


class TeacherCache:
    """Teacher logits per sample index, filled during the first epoch and reused after it.

    Held as one tensor plus a "have" flag per index, so a batch is looked up with one
    gather instead of a Python loop over its samples.
    """

    # the share of the memory the cache may take (a GPU's free memory, or the machine's RAM per process): a
    # causal LM's logits, [tokens, vocabulary] per sample, outgrow any machine long before the data set ends
    MEMORY_SHARE = 0.25
    # reused batches between two checks of cached logits against a fresh forward (_reused): checked on the first
    # reuse only, a batch augmented now and then (a RandomApply, a rare per-sample transform) passed that one check
    # and the student got another view's logits from then on; a fresh forward every this many reuses costs the
    # cache a few percent of the teacher's work
    RECHECK_EVERY = 50

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes  # None: MEMORY_SHARE of the memory where the logits are
        self.logits: torch.Tensor | None = None
        self.have = torch.zeros(0, dtype=torch.bool)
        self.input_shapes: tuple | None = None  # per-sample shapes of the first cached batch's inputs
        self.off: str | None = None  # why the cache stopped (said once)
        self.checked = False  # the first reuse was checked against a fresh forward (_reused)
        self.reuses = 0  # batches served from the cache (every RECHECK_EVERY-th is checked again)

    def get(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.logits is None:
            return None
        if self.logits.device != idx.device:  # a checkpoint's cache (read on the CPU) joins a GPU run: once
            self.logits, self.have = self.logits.to(idx.device), self.have.to(idx.device)
        if int(idx.max()) >= len(self.have) or not bool(self.have[idx].all()):
            return None
        return self.logits[idx]

    def put(self, idx: torch.Tensor, out: torch.Tensor) -> None:
        """Keep `out`, the logits of samples `idx`, where the teacher's logits are (`get`, called first,
        has brought a checkpoint's cache there)."""
        idx = idx.to(out.device)
        need = int(idx.max()) + 1
        if self.logits is None or need > len(self.have):
            per_sample = max(1, out[0].numel() * out.element_size())
            room = (self.limit_bytes if self.limit_bytes is not None else _memory_share(out.device, self.MEMORY_SHARE))
            if need * per_sample > room:  # stop before the process is killed for memory, and free what it held
                cap = ("the cap given" if self.limit_bytes is not None else
                       f"the cap is {self.MEMORY_SHARE:.0%} of the {out.device.type.upper()} memory "
                       f"{'free' if out.device.type == 'cuda' else 'per process'})")
                self.off = (f"the teacher's logits would take more than {room / 2**30:.2f} GiB ({per_sample:,} bytes a "
                            f"sample, {need:,} samples so far; {cap})")
                self.logits, self.have = None, torch.zeros(0, dtype=torch.bool)
                return
            size = max(need, min(2 * len(self.have), room // per_sample))
            logits = out.new_zeros((size,) + tuple(out.shape[1:]))
            have = torch.zeros(size, dtype=torch.bool, device=out.device)
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


def _memory_share(device: torch.device, share: float) -> int:
    """`share` of the memory of `device`: of a GPU's free memory (the model and optimizer hold the rest),
    else of the machine's RAM divided among the processes torchrun started on it (unknown: no cap)."""
    import os

    if device.type == "cuda":
        return int(share * torch.cuda.mem_get_info(device)[0])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # a platform without sysconf
        return 2**63
    return int(share * ram / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def run_teacher(teacher, batch: Batch) -> torch.Tensor:
    """The teacher's logits for the batch, without gradient and in eval mode whatever mode the caller's loop
    left it in (`for m in (model, teacher): m.train()` ran it with dropout and moved its BatchNorm statistics)."""
    from ..model_call import evaluating

    with torch.no_grad(), evaluating(teacher):
        return logits_of(call_model(teacher, decoder_inputs(teacher, batch)), whose="teacher")


def teacher_logits(teacher, batch: Batch, cache: TeacherCache, use_cache: bool) -> torch.Tensor:
    """From the cache when allowed and filled for the batch's indices, else a fresh forward. Under no_grad (an
    evaluation, whose indices are another loader's) the cache is neither read, written nor judged: an
    evaluation batch without a sample index once switched the cache off for the rest of training."""
    if not use_cache or not torch.is_grad_enabled():
        return run_teacher(teacher, batch)
    if cache.off is None:
        _check_cacheable(batch, cache)
    if batch.index is None or cache.off is not None:
        return run_teacher(teacher, batch)
    index = batch.index.long()  # an int32 or uint8 column: torch reads uint8 as a mask, not as indices
    cached = cache.get(index)
    if cached is not None:
        cache.reuses += 1
        due = not cache.checked or cache.reuses % cache.RECHECK_EVERY == 0
        return _reused(teacher, batch, cache, cached) if due else cached
    out = run_teacher(teacher, batch)
    cache.put(index, out)
    if cache.off is not None:  # the cap was reached: said once, the teacher runs on every batch from now on
        _warn_off(cache)
    return out


def _reused(teacher, batch: Batch, cache: TeacherCache, cached: torch.Tensor) -> torch.Tensor:
    """A reuse of cached logits checked against a fresh forward (the first, and every RECHECK_EVERY-th): a sample
    whose inputs change from epoch to epoch (random augmentation) got the teacher's logits on the first epoch's view
    every epoch after it, without a word."""
    fresh = run_teacher(teacher, batch)
    gap = float((fresh.float() - cached.float()).abs().max())
    if gap <= 1e-3 * max(1.0, float(fresh.float().abs().max())):
        cache.checked = True
        return cached
    repeated = len(torch.unique(batch.index)) < len(batch.index)
    finite = bool(torch.isfinite(fresh).all() and torch.isfinite(cached).all())
    cache.off = ("the sample indices repeat within a batch (the batches' third element is no sample index), so one "
                 "index stood for several samples" if repeated else
                 f"a sample's teacher logits changed between epochs (by {gap:.3g}): its inputs differ from one epoch "
                 "to the next (random augmentation), so cached logits would be another view's" if finite else
                 "the teacher's logits hold NaN or inf for some samples of this batch (check the teacher and those "
                 "inputs), so they cannot be compared with the cached ones")
    cache.logits, cache.have = None, torch.zeros(0, dtype=torch.bool)
    _warn_off(cache)
    return fresh


def _check_cacheable(batch: Batch, cache: TeacherCache) -> None:
    """cache_teacher keeps one logits tensor per sample, of one shape: batches without a sample index
    (a map-style Dataset's loader) cannot use it, and inputs padded per batch change the logits' length
    (it crashed on the second length, or would hand back logits of another). Either way the teacher runs
    on every batch instead, said once."""
    shapes = tuple(tuple(t.shape[1:]) for t in _tensors(batch.teacher_inputs))
    index = batch.index
    if isinstance(index, torch.Tensor) and (index.is_floating_point() or index.dtype == torch.bool):
        cache.off = (f"the batches' third element holds {str(index.dtype).removeprefix('torch.')} values, not a sample "
                     "index (per-sample weights? they are not read either: give a loss_fn that takes them from the "
                     "batch); give (x, y, index) with integer indices to cache")
    elif index is None:
        cache.off = ("the batches carry no sample index (a map-style Dataset's loader); give (x, y) tensors, or "
                     "batches (x, y, index) / dicts with 'index' (the transformers Trainer drops an 'index' column "
                     "unless TrainingArguments(remove_unused_columns=False))")
    elif isinstance(index, torch.Tensor) and index.numel() and int(index.min()) < 0:
        cache.off = (f"the batches' sample indices include {int(index.min())}: a negative index would read another "
                     "sample's slot; number the samples from 0")
    elif cache.input_shapes is None:
        cache.input_shapes = shapes
    elif shapes != cache.input_shapes:
        cache.off = (f"the inputs change shape from batch to batch ({list(cache.input_shapes)} then {list(shapes)}: "
                     "padding per batch); pad every batch to one length to cache")
    if cache.off is not None:
        _warn_off(cache)


def _warn_off(cache: TeacherCache) -> None:
    warnings.warn(f"distill_kd.cache_teacher: {cache.off}. The teacher's logits are computed on every batch",
                  stacklevel=5)


def _tensors(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]

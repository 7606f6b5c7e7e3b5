"""Multi-process (data-parallel) training for the joint loop: torchrun / DDP-style, gloo or NCCL.

Design (see docs/reliability.md):

- The model is *not* wrapped in DistributedDataParallel inside `compress`. The gradient
  coordinator computes one gradient per loss term with `torch.autograd.grad`, which bypasses
  DDP's reducer hooks; instead, after the coordinator has written the final `.grad` of every
  shared parameter (weights, mask scores, LSQ step sizes, feature projections), those
  gradients are averaged over the ranks with one flattened all-reduce per dtype. The same
  code path serves plain training (no technique), so there is one way gradients are reduced.
  On a step `pcgrad` or `scale` measures, the ranks' per-term gradients are averaged too and
  resolved once (coordination.py, `settle`): the global batch's update, not the average of each
  rank's own projection.
- Decisions are made on rank 0 and broadcast: the whole model state (weights, parametrization
  buffers, LSQ step sizes, BatchNorm statistics) at the start, after every attach/freeze event
  and at every evaluation; technique state (masks, scores, thresholds, temperatures) after
  every schedule update; the model again after a technique moved weights by its own rank's numbers
  (Technique.moved_weights), and the gradients a technique added after the averaging from them
  (Technique.rank_local_grads). All ranks therefore hold identical masks and step sizes.
- Data is sharded with DistributedSampler (padded, so every rank runs the same number of
  steps and collectives always match); `training.batch_size` is the *global* batch.
- Only rank 0 writes files; metrics returned by `evaluate` are averaged over the ranks.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as tdist
import torch.nn as nn


@dataclass
class DistContext:
    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------
    def broadcast_tensors(self, tensors: Iterable[torch.Tensor], src: int = 0) -> None:
        """Overwrite every tensor in place with rank `src`'s values (one flat broadcast per dtype/device)."""
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                buckets.setdefault((t.dtype, t.device), []).append(t)
        for (dtype, _), ts in buckets.items():
            wire = torch.uint8 if dtype == torch.bool else dtype
            flat = torch.cat([t.detach().reshape(-1).to(wire) for t in ts])
            tdist.broadcast(flat, src=src)
            offset = 0
            with torch.no_grad():
                for t in ts:
                    n = t.numel()
                    t.copy_(flat[offset : offset + n].view_as(t).to(dtype))
                    offset += n

    def all_reduce_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Average `.grad` over the ranks (parameters without a gradient are left alone; the
        set of such parameters is a property of the graph, hence the same on every rank)."""
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for ps in buckets.values():
            flat = torch.cat([p.grad.reshape(-1) for p in ps])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for p in ps:
                n = p.grad.numel()
                p.grad = flat[offset : offset + n].view_as(p.grad).clone()
                offset += n

    def mean_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors averaged over the ranks, as new tensors (the given ones are left alone: one may
        be what a .grad views); one flat all-reduce per dtype and device."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        buckets: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            buckets.setdefault((t.dtype, t.device), []).append(i)
        for index in buckets.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in index])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            flat /= self.world_size
            for i, part in zip(index, flat.split([tensors[i].numel() for i in index])):
                out[i] = part.view_as(tensors[i])
        return out

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank when `flag` is true on at least one."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean_metrics(self, metrics: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
        """Average each metric over the ranks (keys are sorted so every rank sends the same vector). Rank 0's
        names are checked on every rank first: a rank whose evaluate() returned other names sent a vector of
        another length, and every rank blocked in the all-reduce without a word (gloo's default: 30 minutes)."""
        keys = sorted(metrics)
        first = self.broadcast_json(keys, device=device)
        if self.any(keys != first, device):
            from .errors import TrainingError

            mine = f"rank {self.rank}: {keys}" if keys != first else "another rank returned others"
            raise TrainingError(f"evaluate() returned different metric names on different ranks (rank 0: {first}; "
                                f"{mine}); every rank's evaluate must return the same names")
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def lowest_rank(self, flag: bool, device: torch.device | str = "cpu") -> int | None:
        """On every rank: the lowest rank where `flag` is true, or None where it is true on none."""
        t = torch.tensor([self.rank if flag else self.world_size], dtype=torch.long, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return None if int(t.item()) == self.world_size else int(t.item())

    def broadcast_json(self, obj: Any, src: int = 0, device: torch.device | str = "cpu") -> Any:
        """Rank `src`'s JSON-able `obj` on every rank (as UTF-8 bytes in a tensor: nothing is
        unpickled); what the other ranks pass is ignored."""
        mine = json.dumps(obj).encode() if self.rank == src else b""
        n = torch.tensor([len(mine)], dtype=torch.long, device=device)
        tdist.broadcast(n, src=src)
        buf = (torch.tensor(list(mine), dtype=torch.uint8, device=device) if self.rank == src
               else torch.empty(int(n.item()), dtype=torch.uint8, device=device))
        tdist.broadcast(buf, src=src)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def barrier(self) -> None:
        tdist.barrier()


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(backend: str | None = None) -> DistContext | None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT).

    Returns None for a single process. Where CUDA is available, NCCL for tensors on the GPU and
    gloo for those on the CPU (one group of both, so a CPU model on a GPU host syncs too; each rank
    takes the GPU of LOCAL_RANK where there is one); gloo alone otherwise.
    """
    if not tdist.is_available():
        return None
    if not tdist.is_initialized():
        if _env_world_size() <= 1:
            return None
        backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if "nccl" in backend and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        # torch._dynamo (imported lazily by the first torch.optim optimizer) keeps references
        # to a process group that exists when it is imported; destroy_process_group() then
        # cannot free it and gloo's threads live on into interpreter shutdown, where they can
        # abort the process (SIGABRT). Importing it first keeps the group ours to tear down.
        try:
            importlib.import_module("torch._dynamo")
        except Exception:  # noqa: BLE001 - only a workaround; a build without dynamo has nothing to hold the group
            pass

        tdist.init_process_group(backend=backend)
        atexit.register(_destroy_if_initialized)
    return current()


def _destroy_if_initialized() -> None:
    """Tear down the group jointcompress created while the interpreter is still alive.

    Without it, gloo's worker threads outlive Python's finalization and the process can abort
    with "terminate called without an active exception" (SIGABRT) after a successful run.
    The group must also have no other owner for the threads to stop (see init_from_env).
    A no-op when the user already called `destroy_process_group()`. A second Ctrl-C during that
    teardown ends it quietly: the user asked to stop, and Python printed the interrupt's traceback
    from this hook ("Exception ignored in atexit callback") after the run's own message.
    """
    try:
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    except KeyboardInterrupt:
        pass


def quiet_other_ranks(ctx: DistContext | None) -> None:
    """In a command-line run, warnings from rank 0 only: every rank runs the same code on the same
    recipe, so each would print each warning once more (N copies under torchrun --nproc_per_node=N).
    Only for the CLI, which owns its process; a library call leaves the user's warning filters alone."""
    if ctx is not None and not ctx.is_main:
        import warnings

        warnings.filterwarnings("ignore")


def current() -> DistContext | None:
    """The running process group as a DistContext, or None (not initialized, or one process)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    world = tdist.get_world_size()
    if world <= 1:
        return None
    return DistContext(rank=tdist.get_rank(), world_size=world, backend=str(tdist.get_backend()))


def resolve(mode: Any = "auto") -> DistContext | None:
    """compress(distributed=...): "auto" joins a torchrun group or uses an initialized one;
    False/None forces single-process; a DistContext is used as given."""
    if isinstance(mode, DistContext):
        return mode
    if mode in (False, None, "off", "none"):
        return None
    return init_from_env()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper, or inside torch.compile's
    (the techniques change the model's parametrizations as the run goes, and each change would make
    TorchDynamo trace the model again until it gave up; the user's compiled wrapper still holds
    the same, now compressed, module)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def shard_loader(loader: torch.utils.data.DataLoader, ctx: DistContext, seed: int, batch_size: int | None = None):
    """The same data, sharded over the ranks with a DistributedSampler (shuffled by seed + epoch)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if isinstance(loader.sampler, DistributedSampler) or getattr(loader.batch_sampler, "shards_itself", False):
        return loader
    if loader.batch_size is None:  # a custom batch_sampler: re-creating the loader would drop it
        from .errors import DataError

        raise DataError(
            "train_data: a DataLoader with a custom batch_sampler cannot be sharded over the ranks; give it a "
            "sampler that shards itself (set `shards_itself = True` on it, as hf.wrapper.BucketBatchSampler does) "
            "or pass a DataLoader with batch_size and a plain sampler"
        )
    shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        loader.dataset,
        batch_size=batch_size or loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists (state dicts share storage with the live tensors)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in obj for t in tensors_of(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


ERROR_WAIT_SECONDS = 2.0  # how long a rank other than 0 waits for rank 0's copy of the error it is about to print


MESSAGE_KEPT_SECONDS = 3600  # rank 0's messages older than this are removed when it writes another


def _forget_old_messages(folder) -> None:
    """Remove earlier launches' messages (said_by_rank_0): no rank knows when the others have read one, so each stayed
    in the temporary folder, one file per interrupted or refused launch."""
    import time

    for old in folder.glob("jointcompress-error-*.txt"):
        try:
            if time.time() - old.stat().st_mtime > MESSAGE_KEPT_SECONDS:
                old.unlink()
        except OSError:  # another user's, or gone already
            pass


def said_by_rank_0(message: str) -> bool:
    """Under torchrun, whether rank 0 prints this very message, so that this rank need not: every rank refused the
    same recipe, --out or interrupt, and each printed it, one copy per process. Rank 0 leaves its message in a file
    named by the launch (TORCHELASTIC_RUN_ID) and returns False (it prints); another rank reads it for up to
    ERROR_WAIT_SECONDS and stays quiet only where it holds the same words. A rank's own error (its data, another
    node's missing file) still prints. No collective: the other ranks may be anywhere, or gone."""
    import hashlib
    import tempfile
    import time
    from pathlib import Path

    run, rank = os.environ.get("TORCHELASTIC_RUN_ID"), os.environ.get("RANK")
    if not run or rank is None or _env_world_size() < 2:
        return False
    path = Path(tempfile.gettempdir()) / f"jointcompress-error-{hashlib.sha256(run.encode()).hexdigest()[:16]}.txt"
    if rank == "0":
        from .io import atomic_write_text

        _forget_old_messages(path.parent)
        try:
            atomic_write_text(path, message)
        except OSError:  # no temporary folder to write in: every rank prints, as before
            pass
        return False
    deadline = time.monotonic() + ERROR_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            return path.read_text(encoding="utf-8") == message
        except OSError:  # not written yet
            time.sleep(0.05)
    return False

"""Data-parallel agreement for a session (a no-op in one process).

Decisions are rank 0's: the model state (after attach/freeze events and at evaluations)
and the technique state (masks, scores, thresholds after every schedule update) are
broadcast from it; gradients are averaged after the coordinated backward (see
distributed.py for why the model is not wrapped in DistributedDataParallel).
"""
from __future__ import annotations

import torch

from ..distributed import DistContext, tensors_of


class Sync:
    def __init__(self, dist: DistContext | None = None):
        self.dist = dist

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def model(self, model: torch.nn.Module) -> None:
        if self.dist is not None:
            self.dist.broadcast_tensors(tensors_of(model.state_dict()))

    def norm_statistics(self, norms) -> None:
        """Rank 0's running statistics for `norms` (BatchNorm layers) on every rank."""
        if self.dist is not None:
            self.dist.broadcast_tensors([t for m in norms for t in m.buffers()])

    def techniques(self, techniques) -> None:
        if self.dist is not None:
            self.dist.broadcast_tensors(tensors_of([t.state_dict() for t in techniques if t.attached]))

    def grads(self, params) -> None:
        if self.dist is not None:
            self.dist.all_reduce_grads(params)

    def mean_groups(self, by_group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each group's tensor averaged over the ranks (new tensors; alone: as given)."""
        if self.dist is None:
            return by_group
        return dict(zip(by_group, self.dist.mean_tensors(list(by_group.values()))))

    def any(self, flag: bool, device) -> bool:
        """True on every rank when `flag` is true on one (alone: the flag itself)."""
        return self.dist.any(flag, device) if self.dist is not None else flag

    def mean_metrics(self, metrics: dict, device="cpu") -> dict:
        return self.dist.mean_metrics(metrics, device) if self.dist is not None else metrics

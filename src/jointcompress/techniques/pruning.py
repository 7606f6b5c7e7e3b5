"""What every mask-based pruning technique shares: its ScoredMasks, freezing them, the
sparsity they reach, their learnable scores and their checkpoint state."""
from __future__ import annotations

import torch.nn as nn

from .base import Technique


class PruningTechnique(Technique):
    score_group = "mask_scores"  # optimizer / coordinator group name of the learnable scores

    def __init__(self, config):
        super().__init__(config)
        self.masks = nn.ModuleDict()  # key: layer or group name with '.' -> '__'
        self.current_sparsity = 0.0
        self._final_done = False

    def freeze(self) -> None:
        """Masks stay exactly binary and stop learning (later phases of a sequential run)."""
        super().freeze()
        for m in self.masks.values():
            m.temperature.fill_(0.0)
            if isinstance(m.scores, nn.Parameter):
                m.scores.requires_grad_(False)

    def total_entries(self) -> int:
        return sum(m.hard.numel() for m in self.masks.values())

    def achieved_sparsity(self) -> float:
        zeros = sum(float((m.hard == 0).sum()) for m in self.masks.values())
        return zeros / max(1, self.total_entries())

    def binary(self) -> bool:
        return all(float(m.temperature) == 0 for m in self.masks.values())

    def parameters(self) -> list[dict]:
        if self.config.criterion != "learned" or self.frozen:
            return []
        scores = [m.scores for m in self.masks.values()]
        return [{"params": scores, "lr": self.config.score_lr, "weight_decay": 0.0, "name": self.score_group}]

    def state_dict(self):
        return {"masks": self.masks.state_dict()}

    def load_state_dict(self, state):
        self.masks.load_state_dict(state["masks"])


ROOT_KEY = "_model_"  # the model itself as the layer (a bare nn.Linear): a ModuleDict key cannot be empty


def key(name: str) -> str:
    """A module name as a ModuleDict key (prepare on a bare nn.Linear failed in torch: "module name can't be empty
    string")."""
    return name.replace(".", "__") or ROOT_KEY

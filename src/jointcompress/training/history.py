"""What the built-in loop records (History) and where it stands (Position)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # one entry per evaluation
    steps: list[dict] = field(default_factory=list)  # loss terms + coordination, every log_every steps
    best_epoch: int | None = None
    best_metric: float | None = None
    wall_seconds: float = 0.0
    events: list[dict] = field(default_factory=list)  # skipped non-finite steps, rollbacks, resumes
    # every measured coordination step, not only the logged ones: how many, how many the strategy
    # changed, and the sum of ||resolved - sum|| / ||sum|| (a run shorter than log_every logs one step)
    coordination: dict = field(default_factory=lambda: {"measured": 0, "changed": 0, "changed_sum": 0.0})

    def note_coordination(self, changed: float) -> None:
        c = self.coordination
        c["measured"] += 1
        c["changed"] += int(changed > 1e-9)
        c["changed_sum"] += float(changed)

    def as_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "wall_seconds": self.wall_seconds,
            "events": self.events,
            "coordination": self.coordination,
        }


@dataclass
class Position:
    """Where the run is: the next step, completed epochs, batches done in the current epoch,
    and the running sums of the current epoch (so a resumed epoch logs the same averages)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    sums: dict = field(default_factory=dict)
    conflict: float = 0.0
    n_conf: int = 0
    n: int = 0

    def new_epoch(self) -> None:
        self.batch_in_epoch, self.sums, self.conflict, self.n_conf, self.n = 0, {}, 0.0, 0, 0

    def add(self, out: dict) -> None:
        """Accumulate one step's terms and coordination statistics."""
        for k, v in out["terms"].items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        stats = out["coordination"]
        if stats is not None:
            self.conflict, self.n_conf = self.conflict + stats.conflict_rate, self.n_conf + 1

    def epoch_means(self) -> tuple[dict, float | None]:
        losses = {k: v / max(1, self.n) for k, v in self.sums.items()}
        return losses, (self.conflict / self.n_conf if self.n_conf else None)

"""Optional TensorBoard logging of a compress() run, as a callback.

Why a callback and not part of the loop: TensorBoard is an optional dependency
(`pip install jointcompress[tensorboard]`) and the loop already tells callbacks everything
worth plotting. Logged: every named loss term per step (`loss/<term>`), the gradient
conflict rate and how much coordination changed the update (`coordination/*`, on the steps
where they were measured), and per epoch the metrics, mean loss terms, conflict rate and
every technique metric (`epoch/*`).
"""
from __future__ import annotations

from pathlib import Path

from .errors import JointCompressError


class TensorBoardLogger:
    """`compress(..., callbacks=[TensorBoardLogger("runs/tb/joint")])`; view with `tensorboard --logdir runs/tb`."""

    def __init__(self, log_dir: str | Path, every: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard is an optional extra
            raise JointCompressError(
                f"--tensorboard needs the tensorboard package ({err}); install it with "
                "`pip install jointcompress[tensorboard]` or drop --tensorboard"
            ) from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer = None
        self.every = max(1, int(every))

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir))
        return self._writer

    def on_start(self, trainer, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: their first values, logged before the kill, are
        purged (TensorBoard drops the earlier events at or after `purge_step`), or each step was plotted twice.
        The purge takes the epoch logged at the checkpoint's own step too (an evaluation's checkpoint), which
        no replay logs again: it is logged anew from the resumed history."""
        if step > 0 and self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=step)
            for entry in trainer.history.epochs:
                if entry.get("step", -1) >= step:
                    self.on_epoch(trainer, entry)

    def on_step(self, trainer, step: int, out: dict) -> None:
        stats = out.get("coordination")
        if step % self.every and stats is None:
            return
        for name, value in out["terms"].items():
            self.writer.add_scalar(f"loss/{name}", value, step)
        if stats is not None:
            self.writer.add_scalar("coordination/conflict_rate", stats.conflict_rate, step)
            self.writer.add_scalar("coordination/changed", stats.changed, step)

    def on_epoch(self, trainer, entry: dict) -> None:
        step = entry["step"]
        for name, value in entry.get("metrics", {}).items():
            self.writer.add_scalar(f"epoch/metric/{name}", value, step)
        for name, value in entry.get("losses", {}).items():
            self.writer.add_scalar(f"epoch/loss/{name}", value, step)
        if entry.get("conflict_rate") is not None:
            self.writer.add_scalar("epoch/conflict_rate", entry["conflict_rate"], step)
        for key, value in entry.items():
            if "." in key and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key.replace('.', '/')}", value, step)

    def on_end(self, trainer) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

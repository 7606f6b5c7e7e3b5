"""Training checkpoints: written atomically, read without unpickling.

A checkpoint is one file `RUN_DIR/checkpoints/ckpt-STEP.pt` holding a dict of tensors,
numbers, strings and lists (written with `torch.save`, read back with
`torch.load(weights_only=True)`, which refuses any pickled object that is not plain data, so
a tampered file cannot run code). Everything that is not a tensor (history, recipe,
positions, RNG states of python/numpy, technique scalars) is one JSON string inside it.

Files are written to a temporary name, fsynced and renamed (`io.atomic_write_bytes`): a
process killed while writing leaves the previous checkpoints intact, and any file named
`ckpt-*.pt` is complete. The newest `keep` checkpoints are kept; when the newest one does not
load (disk damage), resuming falls back to the one before it.
"""
from __future__ import annotations

import io as _io
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainingError
from .io import atomic_write_bytes

FORMAT = "jointcompress-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def _to_jsonable(v):
    if isinstance(v, tuple):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_jsonable(x) for k, x in v.items()}
    return v


def python_rng_state(rng: random.Random | None = None) -> list:
    return _to_jsonable((rng or random).getstate())


def set_python_rng_state(state: list, rng: random.Random | None = None) -> None:
    version, internal, gauss = state
    (rng or random).setstate((version, tuple(internal), gauss))


def numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def set_numpy_rng_state(state: list) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint file safely (no code execution); raises TrainingError if unusable."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: this file cannot be trusted
        raise TrainingError(
            f"{path}: not a loadable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}); "
            "it is corrupted or not written by jointcompress (only plain tensors and data are accepted, never pickled objects)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainingError(f"{path}: not a {FORMAT} file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise TrainingError(
            f"{path}: checkpoint format_version {payload.get('format_version')!r}, this jointcompress reads {FORMAT_VERSION}; "
            "resume with the version that wrote it, or start a new run (another --out)"
        )
    try:
        payload["meta"] = json.loads(payload["meta"])
    except (KeyError, TypeError, ValueError) as err:
        raise TrainingError(f"{path}: checkpoint metadata is unreadable ({err})") from None
    return payload


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def paths(self) -> list[Path]:
        """Complete checkpoint files, oldest first (temporary files never match the pattern)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, step: int, payload: dict[str, Any], meta: dict[str, Any]) -> Path:
        payload = {**payload, "format": FORMAT, "format_version": FORMAT_VERSION, "meta": json.dumps(_to_jsonable(meta))}
        buf = _io.BytesIO()
        torch.save(payload, buf)
        path = self.dir / f"ckpt-{step:09d}.pt"
        atomic_write_bytes(path, buf.getvalue())
        for old in self.paths()[: -self.keep]:
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads; None if there is none. Unloadable newer files are
        skipped (named in the error only when no checkpoint at all can be read)."""
        errors = []
        for path in reversed(self.paths()):
            try:
                found = path, read_checkpoint(path)
            except TrainingError as err:
                errors.append(str(err))
                continue
            if errors:
                warnings.warn(f"skipped unusable newer checkpoint(s), resuming from {path}: " + " | ".join(errors), stacklevel=2)
            return found
        if errors:
            raise TrainingError("no usable checkpoint: " + " | ".join(errors))
        return None

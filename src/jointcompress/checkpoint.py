"""Training checkpoints: written atomically, read without unpickling.

A checkpoint is one file `RUN_DIR/checkpoints/ckpt-STEP.pt` holding a dict of tensors,
numbers, strings and lists (written with `torch.save`, read back with
`torch.load(weights_only=True)`, which refuses any pickled object that is not plain data, so
a tampered file cannot run code). Everything that is not a tensor (history, recipe,
positions, RNG states of python/numpy, technique scalars) is one JSON string inside it.

Files are written to a temporary name, fsynced and renamed (`io.atomic_write_bytes`): a
process killed while writing leaves the previous checkpoints intact, and any file named
`ckpt-*.pt` is complete. Each checkpoint has a sidecar `ckpt-*.pt.sha256` (its bytes' sha256, written
after it): a file damaged in place, which torch.load does not notice, is then refused like a truncated
one. The newest `keep` checkpoints are kept; when the newest one does not load (disk damage), resuming
falls back to the one before it. A checkpoint without a sidecar (an older version's) loads unchecked.
"""
from __future__ import annotations

import errno
import hashlib
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
_LEFTOVER = re.compile(r"^\.ckpt-\d{9}\.pt(\.sha256)?\..*\.tmp$")  # io.atomic_write_bytes' temporary names
SUM = ".sha256"
START_OVER = ("start over, pass --force (it removes the checkpoints; in Python, delete RUN_DIR/checkpoints), or "
              "give another --out (run_dir)")


def state_digest(state) -> str:
    """sha256 of a module's (or a state dict's) tensors, key by key: what a run started from."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for key, t in sorted(state.items()):
        digest.update(key.encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def data_tensors(train_data) -> list[torch.Tensor] | None:
    """The tensors training data holds in memory: an (x, y) pair, or a DataLoader over a TensorDataset (the HF
    command line's tokenized rows); None for anything else (a Dataset that reads or augments its items, or a loader
    over one: reading it whole to hash it could be slow or not repeatable)."""
    if isinstance(train_data, (tuple, list)) and len(train_data) == 2 and all(isinstance(t, torch.Tensor) for t in train_data):
        return list(train_data)
    dataset = getattr(train_data, "dataset", None)
    if isinstance(train_data, torch.utils.data.DataLoader) and isinstance(dataset, torch.utils.data.TensorDataset):
        return list(dataset.tensors)
    return None


def data_digest(train_data) -> str | None:
    """sha256 of the training data's tensors in memory (data_tensors: shapes, dtypes and bytes); None for others."""
    tensors = data_tensors(train_data)
    if tensors is None:
        return None
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


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
    """Load one checkpoint file safely (no code execution); raises TrainingError if unusable: unreadable,
    not a checkpoint, or other bytes than its sidecar's checksum (damaged in place)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TrainingError(f"{path}: cannot be read ({err.strerror or err})") from None
    _check_sum(path, data)
    try:
        payload = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: this file cannot be trusted
        raise TrainingError(f"{path}: not a loadable checkpoint ({_reason(err)}); it is corrupted or not written by "
                            "jointcompress (only plain tensors and data are accepted, never pickled objects)") from None
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


def _reason(err: Exception) -> str:
    """Why torch.load failed, in its first sentence: never torch's advice to load with weights_only=False,
    which would run whatever code a tampered file carries."""
    if "weights_only" in str(err) or "WeightsUnpickler" in str(err):
        return "it holds pickled objects besides plain tensors and data, which are not loaded"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first.split('. ')[0][:300]}"


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + SUM)


def _check_sum(path: Path, data: bytes) -> None:
    """Compare `data` with the checksum the sidecar holds; a checkpoint without one (written before
    sidecars, or by a run killed between the two files) is not checked."""
    try:
        recorded = _sum_path(path).read_text().split()[0]
    except FileNotFoundError:
        _check_zip_crcs(path, data)
        return
    except (OSError, UnicodeDecodeError, IndexError):
        recorded = "(unreadable)"
    if recorded != hashlib.sha256(data).hexdigest():
        raise TrainingError(f"{path}: its bytes do not match the checksum in {_sum_path(path).name} (sha256 "
                            f"{recorded[:16]}...): the file was damaged after it was written")


def _check_zip_crcs(path: Path, data: bytes) -> None:
    """A checkpoint without its sidecar (a run killed between the two files): the CRC32 of every entry
    of torch's zip archive, which torch's reader does not check (a probe damaged one in place: it
    resumed without a word into another artifact)."""
    import io
    import zipfile

    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, OSError, ValueError) as err:  # cut short: no archive to test the entries of
        raise TrainingError(f"{path}: it has no checksum file, and it is not a whole archive ({type(err).__name__}: "
                            f"{err}): the file was cut short or damaged after it was written") from None
    if bad is not None:
        raise TrainingError(f"{path}: it has no checksum file, and its archive entry {bad} fails its CRC: the file was "
                            "damaged after it was written")


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
        """Write checkpoint `step`, then its checksum sidecar; drop the oldest beyond `keep` and what
        earlier writes that were killed left (temporary files, sidecars without their checkpoint)."""
        payload = {**payload, "format": FORMAT, "format_version": FORMAT_VERSION, "meta": json.dumps(_to_jsonable(meta))}
        buf = _io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        path = self.dir / f"ckpt-{step:09d}.pt"
        self.remove_leftovers()
        _sum_path(path).unlink(missing_ok=True)  # an earlier checkpoint of this step's: not this file's sum
        try:
            atomic_write_bytes(path, data)
            atomic_write_bytes(_sum_path(path), (hashlib.sha256(data).hexdigest() + f"  {path.name}\n").encode())
        except OSError as err:  # atomic_write_bytes names the file (err.filename)
            what = err.strerror if err.filename else f"writing {path} failed: {err.strerror or err}"
            earlier = [p for p in self.paths() if p != path]
            fix = ("the path is longer than the file system allows: give a shorter --out (run_dir)"
                   if err.errno == errno.ENAMETOOLONG else "free space (or fix the folder's permissions)")
            kept = (f"the {len(earlier)} checkpoint(s) written before are intact: {fix}, then resume the run (--resume, "
                    "resume=True)" if earlier else
                    f"no checkpoint was written before this one: {fix}, then run it again (a resume starts it over)")
            raise type(err)(err.errno, f"{what}; {kept}", err.filename or str(path)) from err
        for old in self.paths()[: -self.keep]:
            if old != path:
                remove(old)
        return path

    def remove_leftovers(self) -> None:
        """Temporary files of writes a kill interrupted, and sidecars whose checkpoint is gone."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            orphan = p.name.endswith(".pt" + SUM) and _NAME.match(p.name[: -len(SUM)]) and not p.with_suffix("").exists()
            if (_LEFTOVER.match(p.name) or orphan) and p.is_file():
                p.unlink(missing_ok=True)

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
            raise TrainingError(f"no usable checkpoint in {self.dir}, so the run cannot continue: " + " | ".join(errors)
                                + f". To {START_OVER}")
        return None


def remove(path: Path) -> None:
    """A checkpoint file and its checksum sidecar."""
    path.unlink(missing_ok=True)
    _sum_path(path).unlink(missing_ok=True)

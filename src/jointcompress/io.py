"""Files: every write is atomic (temp file in the same folder, fsync, rename) and no existing
output directory is overwritten unless the user asked for it, so nothing a user made is lost."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import JointCompressError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "as_dict"):
        return o.as_dict()
    return str(o)


def check_output_dir(path: str | os.PathLike, force: bool = False, resumable: bool = True) -> Path:
    """Raise unless `path` is absent, an empty directory, or `force` is given (writes nothing).
    `resumable`: the command has --resume (compress), which the message then names."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise JointCompressError(f"output path {path} exists and is a file, not a directory; choose another --out")
    if path.exists() and any(path.iterdir()) and not force:
        raise JointCompressError(
            f"output directory {path} already exists and is not empty; choose another --out, pass --force to overwrite"
            + (", or --resume to continue the run it holds" if resumable else "")
        )
    return path


def prepare_output_dir(path: str | os.PathLike, force: bool = False, resumable: bool = False) -> Path:
    """Create `path`; refuse a non-empty existing one unless `force`."""
    path = check_output_dir(path, force, resumable)
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_run_dir(path: str | os.PathLike, *, force: bool, resume: bool, dist=None,
                    fresh: tuple[str, ...] = ("checkpoints",)) -> Path:
    """The output directory of a `compress` run, prepared once for every rank.

    Every rank checks it before any rank writes (unless resuming); rank 0 creates it and, on a
    --force restart, removes the old run's `fresh` subfolders (its checkpoints must not be
    resumed into the new run); then all ranks wait until it exists.
    """
    import shutil

    path = Path(path)
    if not resume:
        check_output_dir(path, force=force)
    elif (dist is None or dist.is_main) and not any(p.is_file() for p in (path / "checkpoints").glob("*.pt")):
        import warnings

        warnings.warn(f"--resume: {path} holds no checkpoint of an earlier run, so this one starts from the beginning "
                      "(check --out if you meant to continue a run)", stacklevel=2)
    if dist is not None:
        dist.barrier()
    if dist is None or dist.is_main:
        prepare_output_dir(path, force=resume or force, resumable=True)
        if force and not resume:
            for sub in fresh:
                shutil.rmtree(path / sub, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    return path

"""Files: every write is atomic (temp file in the same folder, fsync, rename) and no existing
output directory is overwritten unless the user asked for it, so nothing a user made is lost."""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import JointCompressError


def _umask() -> int:
    """The process's umask now: read from /proc on Linux (setting it to read it back is process-wide, and
    another thread could create a file in between), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `path` whole or not at all, with the permissions a plain open() would give it (mkstemp's 0600
    survived the rename: artifacts and summaries came out unreadable to the user's group). An OSError (a full
    disk, no permission) is raised again naming `path` and saying that its previous content is intact."""
    path, existed = Path(path), False
    try:
        existed = path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_and_rename(path, data)
    except OSError as err:
        kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
        raise type(err)(err.errno, f"writing {path} failed: {err.strerror or err}; {kept}", str(path)) from err


def _write_and_rename(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
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


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """A matplotlib figure written atomically, as every other output is (a kill mid-write left a broken PNG,
    beside the JSON it was drawn from)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def check_output_dir(path: str | os.PathLike, force: bool = False, resumable: bool = True) -> Path:
    """Raise unless `path` is absent, an empty directory, or `force` is given (writes nothing).
    `resumable`: the command has --resume (compress), which the message then names."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise JointCompressError(f"output path {path} exists and is a file, not a directory; choose another --out")
    if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()) and not force:
        raise JointCompressError(
            f"output directory {path} already exists and is not empty; choose another --out, pass --force to overwrite"
            + (", or --resume to continue the run it holds" if resumable else "")
        )
    return path


def first_existing(path: str | os.PathLike) -> Path | None:
    """`path` or its nearest parent that exists (None where none does)."""
    return next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)


def check_folder_path(path: Path | None, flag: str, holds: str = "the event files") -> None:
    """A folder the run writes into later (--tensorboard; report's --out): a path that is a file, or lies under one,
    was found only when the first file was written (after the model had trained), with the OS's words. `holds`:
    what the folder is for, as the message says it."""
    if path is None:
        return
    existing = first_existing(path)
    if existing is not None and not existing.is_dir():
        raise JointCompressError(f"{flag} {path}: {'is' if existing == Path(path) else f'lies under {existing}, which is'} "
                                 f"a file; give a folder for {holds}")


def prepare_output_dir(path: str | os.PathLike, force: bool = False, resumable: bool = False) -> Path:
    """Create `path`; refuse a non-empty existing one unless `force`."""
    path = check_output_dir(path, force, resumable)
    path.mkdir(parents=True, exist_ok=True)
    return path


RUN_OUTPUTS = ("summary.json", "history.json", "recipe.yaml", "artifact")  # what a finished run writes
RUN_START = ("start.json", "teacher.safetensors")  # what the run began from (the model it trained first)
RUN_REPORT = ("report.html", "layers.csv", "layers.json")  # what `jointcompress report` adds to a run folder
LOCK_NAME = ".jointcompress.lock"
_HELD_LOCKS: dict[str, Any] = {}  # folder -> the open lock file this process holds for its life


def hold_run_lock(path: Path) -> None:
    """Hold `path`'s run lock (an exclusive flock on LOCK_NAME, with this process's pid) until the
    process ends; another run in the same folder is refused. Why: two runs given one --out wrote the
    same checkpoint names and deleted each other's temporary files, and the loser died after its
    teacher had trained with advice about free space. A process holds it once (a run and its resume
    in one Python session); without fcntl (Windows) nothing is locked. The lock file goes when the lock
    is given up (release_run_lock, or the process's normal exit): it was left in every folder a run used."""
    try:
        import fcntl
    except ImportError:
        return
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        return
    for _ in range(5):  # the file may be unlinked by its holder between our open and our flock: lock the new one
        handle = open(path / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            handle.close()
            raise JointCompressError(f"{path} is in use by another jointcompress run (pid {pid}); two runs in one folder "
                                     "overwrite each other's checkpoints. Wait for it to end, or choose another --out") from None
        if _is_the_file_at(handle, path / LOCK_NAME):
            break
        handle.close()
    else:  # removed under us every time: runs starting and ending in this folder all the while
        raise JointCompressError(f"{path}: its run lock file kept being replaced while this run tried to lock it; another "
                                 "jointcompress run is starting in this folder: wait for it, or choose another --out")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD_LOCKS[key] = handle


def _is_the_file_at(handle, path: Path) -> bool:
    """Whether the open `handle` is still the file `path` names (not one unlinked or replaced since it was opened)."""
    try:
        here, held = path.stat(), os.fstat(handle.fileno())
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _forget_locks_in_child() -> None:
    """In a forked child (a DataLoader's workers): close its copies of the run locks' files. An flock belongs to
    the open file, which a fork shares: workers orphaned by a killed run held the folder's lock for seconds after
    it died, and the resume started at once was refused, naming the dead run's pid."""
    for handle in _HELD_LOCKS.values():
        with contextlib.suppress(OSError):
            handle.close()  # the child's descriptor only: the parent's keeps the lock
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def release_run_lock(path: Path) -> None:
    """Give up `path`'s run lock (hold_run_lock) and remove its file, unlinked while still locked: a run that
    opened it meanwhile finds it gone (hold_run_lock locks the new file), so no two runs hold two files."""
    handle = _HELD_LOCKS.pop(str(Path(path).resolve()), None)
    if handle is None:
        return
    with contextlib.suppress(OSError):
        if _is_the_file_at(handle, Path(path) / LOCK_NAME):
            (Path(path) / LOCK_NAME).unlink()
    handle.close()


@atexit.register
def _release_run_locks() -> None:
    """At a normal exit, every lock this process holds given up and its file removed (a killed process leaves its
    file, which the next run locks as usual)."""
    for key in list(_HELD_LOCKS):
        release_run_lock(Path(key))


@contextlib.contextmanager
def run_lock(path: str | os.PathLike | None, dist=None):
    """`path`'s run lock (hold_run_lock) for a run the Python API drives (compress(run_dir=...)), held by the
    writing rank while the run lasts: a job started twice on one run_dir, or a notebook's run in a folder a
    command-line run holds, deleted the other's temporary checkpoint files and resumed from its live checkpoints.
    Given up after, unless the process held it before (a command line's own, for its whole life); a folder made
    here that the run left empty goes again."""
    if path is None or (dist is not None and not dist.is_main):
        yield
        return
    path = Path(path)
    created = _absent_folders(path)
    path.mkdir(parents=True, exist_ok=True)
    held_before = str(path.resolve()) in _HELD_LOCKS
    try:
        hold_run_lock(path)
    except BaseException:
        for folder in created:
            _remove_if_empty(folder)
        raise
    try:
        yield
    finally:
        if not held_before:
            for folder in created:
                _remove_if_empty(folder)
            release_run_lock(path)


def removed_if_refused(command):
    """A command (called with `out=`) whose --out it created is removed again when the command stops with an
    error before writing anything there but its run lock: a refused run (a target out of reach, an unknown
    variant, a bad weights file) left an empty folder behind, in which a user looked for results. A folder
    that was there before, or holds anything else, stays as it is."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        out = kwargs.get("out")
        created = _absent_folders(Path(out)) if out is not None else []
        try:
            return command(*args, **kwargs)
        except Exception:  # a refusal (an interrupted run keeps its folder, for --resume)
            for folder in created:  # the deepest first, while each is empty
                _remove_if_empty(folder)
            raise
    return wrapper


def _absent_folders(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, the deepest first: what a command that makes `path` creates."""
    return [p for p in (path, *path.parents) if not p.exists()]


def _remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it holds nothing, or only the run lock this process holds."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return
    held = str(folder.resolve()) in _HELD_LOCKS
    if names - ({LOCK_NAME} if held else set()):
        return
    with contextlib.suppress(OSError):  # the lock file goes while still held: no run can lock a file about to vanish
        (folder / LOCK_NAME).unlink(missing_ok=True)
        release_run_lock(folder)
        folder.rmdir()
    release_run_lock(folder)  # given up where the unlink failed too (a no-op once given up)


def output_folder(raw) -> Path:
    """An --out option's parser: an empty value (a shell variable left unset) is refused. Read as a path it is
    the working directory, whose recipe.yaml and artifact/ a --force run cleared."""
    import typer

    if not isinstance(raw, Path) and not str(raw).strip():
        raise typer.BadParameter("empty; give the output folder (an unset shell variable?)")
    path = Path(raw)
    if path.is_symlink() and not path.exists():  # making it failed with the OS's bare "File exists"
        raise typer.BadParameter(f"{path} is a link to {os.readlink(path)}, which does not exist; create that folder, "
                                 "or give another --out")
    return path


def prepare_run_dir(path: str | os.PathLike, *, force: bool, resume: bool, dist=None,
                    fresh: tuple[str, ...] = ("checkpoints", *RUN_OUTPUTS, *RUN_START, *RUN_REPORT),
                    reads: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """The output directory of a `compress` run, prepared once for every rank. `reads`: the files the run reads,
    by how the user named them (its --weights, its recipe), which --force may not clear.

    Every rank checks it before any rank writes; rank 0 creates it, holds its run lock (hold_run_lock)
    and, on a --force restart, removes the old run's `fresh` outputs (its checkpoints must not be resumed
    into the new run; its start.json and trained model neither: the new run never rewrote them, so it
    could not be resumed by any command;
    only the checkpoint files a run writes, not a folder's other files; and its summary, history,
    recipe and artifact, which a new run stopped before its end left beside the new checkpoints,
    where `report` and `bench` read them as the new run's); then all ranks wait
    until it exists. --resume with no checkpoint starts the run, unless the folder holds a
    finished run's outputs (or files of those names) that it would overwrite: that needs --force.
    """
    from .checkpoint import CheckpointStore

    path = Path(path)
    if force and not resume:
        for what, read in (reads or {}).items():
            if read is not None:
                _refuse_clearing_the_input(path, fresh, Path(read), what)
        _refuse_clearing_a_lone_teacher(path, fresh)
        _refuse_clearing_foreign_files(path, fresh)
    if not resume:
        check_output_dir(path, force=force)
    elif not CheckpointStore(path).paths():
        _resume_without_checkpoint(path, force, dist)

    def claim() -> None:
        prepare_output_dir(path, force=resume or force, resumable=True)
        hold_run_lock(path)
        remove_write_leftovers(path)
        if force and not resume:
            remove_outputs(path, fresh)

    if dist is None:
        claim()
    else:
        dist.barrier()
        _on_rank_0_for_all(dist, claim)
    return path


def _on_rank_0_for_all(dist, work) -> None:
    """`work()` on rank 0, its refusal raised on every rank: rank 0 alone refused (the folder locked by another
    run) and the other ranks, waiting for it at a barrier, ended in the process group's traceback. The other
    ranks' copy is marked `told_by_rank_0`: the command line prints rank 0's alone."""
    refusal, mine = None, None
    if dist.is_main:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - every rank stops with it
            refusal, mine = f"{type(err).__name__}: {err}" if not isinstance(err, JointCompressError) else str(err), err
    said = dist.broadcast_json(refusal)
    if mine is not None:
        raise mine
    if said is not None:
        err = JointCompressError(f"rank 0 refused the run: {said}")
        err.told_by_rank_0 = True
        raise err


def _refuse_clearing_a_lone_teacher(path: Path, fresh: tuple[str, ...]) -> None:
    """A run writes start.json before the model it trained (teacher.safetensors), and a run older than start.json
    left its checkpoints, history or summary beside it: a teacher.safetensors with none of them is a user's file of
    that name, which --force deleted (a user's own teacher, kept in the folder they then named --out)."""
    teacher = path / "teacher.safetensors"
    run_files = ("start.json", "checkpoints", "history.json", "summary.json")
    if ("teacher.safetensors" in fresh and teacher.is_file() and not teacher.is_symlink()  # a link goes, not its file
            and not any((path / name).exists() for name in run_files)):
        raise JointCompressError(f"--force: {teacher} has no start.json beside it, so no run wrote it; --force would "
                                 "delete it: move it out of the folder (give it with --weights to compress it), or "
                                 "give another --out")


def _refuse_clearing_the_input(path: Path, fresh: tuple[str, ...], reads: Path, what: str) -> None:
    """--force clears the old run's outputs before the new run reads its --weights: weights that are one of
    them (an earlier run's teacher.safetensors or artifact/, as its own messages suggest) were deleted, and
    the run then said it could not find them; a recipe kept as OUT/recipe.yaml was deleted, and the run failed
    at its end, copying it. checkpoints/ loses only its ckpt files, never weights."""
    cleared = [path / name for name in fresh if name != "checkpoints"]
    refuse_clearing(reads, [p for p in cleared if p.exists() or p.is_symlink()], path, what)


def refuse_clearing(reads: str | os.PathLike, cleared: list[Path], out: Path, what: str = "--weights") -> None:
    """Refuse to clear `cleared` (files or folders under `out`) when the run reads `reads` (`what`: the flag or
    file the user gave it as) from one of them, as written (a link in the folder is removed as a link) or as it
    resolves."""
    given = Path(reads)
    for place in cleared:
        for seen, where in ((Path(os.path.abspath(given)), Path(os.path.abspath(place))), (given.resolve(), place.resolve())):
            if seen == where or where in seen.parents:
                raise JointCompressError(f"{what} {reads} lies in --out {out}, and --force clears {place.name} there "
                                         "before the run reads it; give another --out (or copy it out of that folder "
                                         "first)")


def remove_write_leftovers(path: Path, names: tuple[str, ...] | None = (*RUN_START, *RUN_OUTPUTS)) -> None:
    """The temporary files of atomic writes (`.NAME.*.tmp`) a killed run left in the folder itself
    (`.teacher.safetensors.*.tmp`, the size of the model; `.start.json.*.tmp`, ...), of the files `names`
    (None: of any file): only this run may write here now (its lock), so none is a live writer's.
    checkpoints/ and artifact/ clean their own."""
    patterns = [f".{name}.*.tmp" for name in names] if names is not None else [".*.tmp"]
    for leftover in (p for pattern in patterns for p in path.glob(pattern)):
        if leftover.is_file():
            leftover.unlink()


def finished_run(path: str | os.PathLike) -> bool:
    """Whether the run in `path` finished: a run writes summary.json, then recipe.yaml, last, and a --force restart
    clears both first. --resume of a finished run used to load its last checkpoint, finalize and save the same
    artifact again, and add those seconds to its wall time, without saying there was nothing to continue."""
    path = Path(path)
    return (path / "summary.json").is_file() and (path / "recipe.yaml").is_file()


def say_finished(path: Path, console, artifact: str, recipe=None, hf_folder: str | None = None) -> None:
    """What --resume of a finished run prints in place of running it again (`artifact`: the folder it saved;
    `hf_folder`: a transformers run's exported model folder, beside it).
    Given the `recipe` this command was asked to run, one that differs from the finished run's recipe.yaml is
    refused by the fields that differ: a job script that edited its recipe and always passed --resume read
    "nothing to continue" and exit status 0, and the new recipe never ran."""
    changed = _changed_from_finished(path, recipe) if recipe is not None else None
    if changed:
        raise JointCompressError(f"--resume: the run in {path} has finished with another recipe ({changed}); nothing "
                                 "was run. To run this recipe, pass --force in place of --resume, or another --out")
    console.print(f"--resume: the run in {path} has finished (its summary.json and recipe.yaml are written); nothing "
                  f"to continue. Its artifact is {path / artifact}"
                  f"{f' (the transformers folder {path / hf_folder})' if hf_folder else ''}; "
                  f"`jointcompress report {path}` shows it. To run it "
                  "again, pass --force in place of --resume", markup=False)


def _changed_from_finished(path: Path, recipe) -> str | None:
    """The fields where `recipe` differs from the finished run's recipe.yaml (None where they agree, or the
    file no longer reads as a recipe): fields a resumed run may set anew (recipe.MEMORY_FIELDS), and model and data,
    which the run's own checks compare in their own form (a builder's path, a data file's digest), left out."""
    from .recipe import load_recipe, without_memory_fields
    from .training.checkpoints import differences

    try:
        finished = load_recipe(path / "recipe.yaml")
    except JointCompressError:
        return None
    dumps = [without_memory_fields({k: v for k, v in r.model_dump(mode="json").items() if k not in ("model", "data")})
             for r in (finished, recipe)]
    return "; ".join(differences(*dumps, was="in the finished run")) or None


def _resume_without_checkpoint(path: Path, force: bool, dist) -> None:
    """Nothing to continue: a folder with a run's outputs (or the user's files of those names) is refused as
    a new run would refuse it; an empty one, or one a run killed before its first checkpoint left, starts."""
    held = [name for name in RUN_OUTPUTS if (path / name).exists()]
    if held and not force:
        raise JointCompressError(
            f"--resume: {path} holds no checkpoint to continue, and {', '.join(held)} that a new run would "
            "overwrite; choose another --out, or pass --force as well to start over in it")
    if dist is None or dist.is_main:
        import warnings

        warnings.warn(f"--resume: {path} holds no checkpoint of an earlier run, so this one starts from the beginning "
                      "(check --out if you meant to continue a run)", stacklevel=3)


# what a transformers run writes into its hf_model/ and onnx/ (folders a --force restart removes whole): save_pretrained's
# model and tokenizer files, the ONNX models (the artifact's own names come from artifact/store.py)
HF_RUN_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "modeling_*.py", "configuration_*.py", "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "*.model", "chat_template*", "preprocessor_config.json", "model_fp32.onnx*",
                "model_int8.onnx*")


def run_folder_files() -> tuple[str, ...]:
    """The names (patterns) a run writes inside the folders --force removes whole: the artifact's weights and
    manifest with the backups and temporary files of its writes, an HF artifact's tokenizer folder, HF_RUN_FILES."""
    from .artifact.store import CONTAINERS, MANIFEST_FILE, PREVIOUS
    from .hf.artifact import TOKENIZER_DIR

    return (*CONTAINERS.values(), MANIFEST_FILE, f"{PREVIOUS}*", ".*.tmp", TOKENIZER_DIR, *HF_RUN_FILES)


def _refuse_clearing_foreign_files(path: Path, fresh: tuple[str, ...]) -> None:
    """--force removes an earlier run's artifact/ (and a transformers run's hf_model/, onnx/) whole; a file in one that
    no run writes is the user's (their own onnx/ folder, notes put beside a model), and it went with the folder,
    though --force promises the folder's other files stay. Refused before anything is cleared, naming the files."""
    from fnmatch import fnmatch

    ours = run_folder_files()
    for sub in fresh:
        folder = path / sub
        if sub == "checkpoints" or not folder.is_dir() or folder.is_symlink():
            continue
        theirs = sorted(p.name for p in folder.iterdir() if not any(fnmatch(p.name, own) for own in ours))
        if theirs:
            shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
            raise JointCompressError(f"{folder}: --force removes this folder (an earlier run's outputs), and it also "
                                     f"holds {shown}, which no run writes; move {'them' if len(theirs) > 1 else 'it'} "
                                     "out of the folder, or give another --out")


def remove_outputs(path: Path, fresh: tuple[str, ...]) -> None:
    """An earlier run's outputs a --force restart must not mix with its own: the checkpoint files a run
    writes (with their checksum sidecars and the temporary files of killed writes; the user's other files in that
    folder stay), and the other `fresh` folders whole."""
    import shutil

    from .checkpoint import CheckpointStore, remove

    for sub in fresh:
        if sub == "checkpoints":
            store = CheckpointStore(path)
            for old in store.paths():
                remove(old)  # and its checksum sidecar
            store.remove_leftovers()
        elif (path / sub).is_dir():
            shutil.rmtree(path / sub, ignore_errors=True)
        elif (path / sub).is_file():
            (path / sub).unlink()

"""The built-in loop's checkpoints: everything needed to continue a run bit for bit.

Weights with their parametrizations, technique states and scalars, optimizer, LR scale, RNG
states (torch, CUDA, python, numpy, the loader's shuffle generators and the epoch's start), the
DataLoader position, history, best state and teacher cache. Files are written by
checkpoint.CheckpointStore (atomic, read back without unpickling); only rank 0 writes.
"""
from __future__ import annotations

import time
import warnings

import torch

from .. import checkpoint as ckpt
from ..errors import DataError, RecipeError, TrainingError
from ..model_copy import load_model_state
from ..recipe import MEMORY_FIELDS, with_added_fields, without_memory_fields
from ..session import terms as _terms
from ..session.teacher import TeacherCache
from .epochs import generator_states, set_generator_states
from .history import History, Position


class RunCheckpoints:
    def __init__(self, trainer, run_dir, keep: int = 2):
        self.trainer = trainer
        self.store = ckpt.CheckpointStore(run_dir, keep=keep) if run_dir is not None else None
        self.last = None
        # what the run trains on, recorded in every checkpoint and checked on resume (compress() sets them):
        # data_sha256 / data_shape (an (x, y) pair of tensors only) and teacher_sha256
        self.inputs: dict = {}
        self.given_recipe = None  # the recipe as the user gave it (compress sets it): a refused resume names their change

    def save(self):
        """Write a checkpoint of the run as it is now (rank 0 only; a no-op without run_dir)."""
        tr = self.trainer
        s = tr.session
        if self.store is None or not s.sync.is_main:
            return None
        payload = {
            "model": s.model.state_dict(),
            "techniques": s.technique_states(),
            "optimizer": s.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader_gen": generator_states(tr.loader),  # the loader's, its sampler's and batch sampler's
            "epoch_start_gen": tr.epoch_start["gen"],
            "epoch_start_torch": tr.epoch_start["torch"],
            "best": tr.best.payload(),
            "teacher_cache": s.teacher_cache.state(),
            "loss_scaler": tr.scaler.state_dict() if tr.scaler is not None else None,  # fp16
        }
        history = tr.history.as_dict()
        history["wall_seconds"] = tr.wall_offset + time.perf_counter() - tr.t0
        meta = {
            "position": vars(tr.pos),
            "total_steps": s.plan.total_steps,
            "history": history,
            "recipe": s.recipe.model_dump(mode="json"),
            "asked_recipe": tr.asked_recipe.model_dump(mode="json") if tr.asked_recipe is not None else None,
            "given_recipe": self.given_recipe.model_dump(mode="json") if self.given_recipe is not None else None,
            "lr_scale": tr.recovery.lr_scale,
            "nonfinite": tr.recovery.count,
            "technique_scalars": _terms.technique_scalars(s.techniques),
            "coordinator": {"factors": s.coordinator.factors, "rng": ckpt.python_rng_state(s.coordinator.rng)},
            "python_rng": ckpt.python_rng_state(),
            "numpy_rng": ckpt.numpy_rng_state(),
            "world_size": s.sync.dist.world_size if s.sync.dist is not None else 1,
            **self.inputs,
        }
        self.last = self.store.save(tr.pos.step, payload, meta)
        return self.last

    def _check_fits(self, path, meta: dict) -> None:
        s = self.trainer.session
        saved, now = _as_trained_today(meta.get("recipe"), s.recipe), s.recipe.model_dump(mode="json")
        saved, now = (without_memory_fields(saved) if saved else saved), without_memory_fields(now)
        if saved != now:
            diffs, which = self._given_differences(meta) or (differences(saved, now), "a different recipe")
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise RecipeError(
                f"{path}: the checkpoint was made with {which} ({shown}); resume with the same recipe "
                "(and --mode/--model/--data), or start a new run in another directory" + _before_joint_form(meta, s.recipe)
            )
        self._check_inputs(path, meta)
        world = s.sync.dist.world_size if s.sync.dist is not None else 1
        if meta.get("total_steps") != s.plan.total_steps:
            other = meta.get("world_size", world) != world  # training.batch_size splits into whole per-process batches
            cause = (f"this run has {world} process(es) and the checkpoint's {meta['world_size']}, and "
                     f"training.batch_size {s.recipe.training.batch_size} splits into other per-process batches. Resume "
                     f"with {meta['world_size']} process(es) (or a count that divides the batch size)" if other else
                     "the training data or batch size changed. Resume with the same data")
            raise TrainingError(f"{path}: the checkpoint's run has {meta.get('total_steps')} steps, this one "
                                f"{s.plan.total_steps}; {cause}, or start a new run")
        if meta.get("world_size", world) != world:  # the steps match (training.batch_size is the global batch)
            warnings.warn(
                f"{path}: the checkpoint was written by a run of {meta['world_size']} process(es), this one has {world}: "
                "training continues from its step, but the rest of the current epoch takes its batches from this run's "
                "sharding (some of the epoch's samples are seen twice or not at all), so the result will not match the "
                f"uninterrupted run bit for bit. Resume with {meta['world_size']} process(es) for that", stacklevel=2)

    def _given_differences(self, meta: dict) -> tuple[list[str], str] | None:
        """Where the recipe as the user gave it differs from the one the checkpoint's run was given: the fields
        they changed, with the indices of their own techniques list. The resolved recipes' differences named the
        allocator's derived sparsities first (the ratio the user changed came 'and 2 more' behind them), and
        techniques by their place after the joint form dropped prune_unstructured."""
        given = self.given_recipe
        if given is None or not meta.get("given_recipe"):
            return None
        diffs = differences(without_memory_fields(meta["given_recipe"]),
                             without_memory_fields(given.model_dump(mode="json")))
        return (diffs, "a different recipe than the one given now") if diffs else None

    def _check_inputs(self, path, meta: dict) -> None:
        """The same training data (its tensors' sha256: the cached teacher outputs are looked up by sample
        index) and the same teacher as the checkpoint's run; not checked where either side recorded none
        (data that is not an (x, y) pair of tensors, a checkpoint written before these were recorded)."""
        data, mine = meta.get("data_sha256"), self.inputs.get("data_sha256")
        if data and mine and data != mine:
            raise DataError(
                f"{path}: the checkpoint's run trained on other data ({meta.get('data_shape')}, sha256 {data[:12]}) than "
                f"this one ({self.inputs.get('data_shape')}, sha256 {mine[:12]}): its model, position in the epoch and "
                "cached teacher outputs belong to those samples. Resume with the data the run began with (CLI: the same "
                f"--data, or the recipe's data:; Python: the same x and y, in the same order), or to {ckpt.START_OVER}")
        teacher, mine = meta.get("teacher_sha256"), self.inputs.get("teacher_sha256")
        if teacher and mine and teacher != mine:
            raise TrainingError(
                f"{path}: the checkpoint's run distilled from another teacher (its weights' sha256 {teacher[:12]}, this "
                f"one's {mine[:12]}): resume with the teacher the run began with (CLI: the same --weights), or to "
                f"{ckpt.START_OVER}")

    def _load_state(self, path, ck: dict) -> None:
        s = self.trainer.session
        try:
            load_model_state(s.model, ck["model"])
            s.load_technique_states(ck["techniques"])
            s.optimizer.load_state_dict(ck["optimizer"])
            if self.trainer.scaler is not None and ck.get("loss_scaler"):  # a run resumed in fp16 after fp32 starts anew
                self.trainer.scaler.load_state_dict(ck["loss_scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise TrainingError(
                f"{path}: the checkpoint does not fit this model ({_why_not_fit(err)}); resume with the same model and recipe"
            ) from None

    def resume(self) -> bool:
        """Continue from the newest usable checkpoint; False when there is none to resume."""
        tr = self.trainer
        if self.store is not None and tr.session.sync.is_main:
            self.store.remove_leftovers()  # what writes killed before this run began left
        if not tr.resume or self.store is None:
            return False
        found = self.store.latest()
        if found is None:
            return False
        path, ck = found
        meta = ck["meta"]
        self._check_fits(path, meta)
        s = tr.session
        pos = _position(path, meta, s.plan.total_steps)
        s.restore_structure(pos.step)  # parametrizations and frozen techniques as the run had them
        self._load_state(path, ck)
        _terms.set_technique_scalars(s.techniques, meta["technique_scalars"])
        s.coordinator.factors = dict(meta["coordinator"]["factors"])
        ckpt.set_python_rng_state(meta["coordinator"]["rng"], s.coordinator.rng)
        tr.recovery.lr_scale, tr.recovery.count = float(meta["lr_scale"]), int(meta["nonfinite"])
        tr.history = History(**meta["history"])
        tr.wall_offset = float(meta["history"].get("wall_seconds") or 0.0)
        tr.best.load_payload(ck.get("best"))
        s.teacher_cache = TeacherCache.from_state(ck.get("teacher_cache"))
        tr.pos = pos
        s.ctx.epoch = pos.epoch
        self._restore_rng(tr, ck, meta)
        s.sync.model(s.model)
        s.sync.techniques(s.techniques)
        changed = _memory_changes(meta.get("recipe"), s.recipe)
        tr.history.events.append({"event": "resumed", "step": pos.step, "checkpoint": path.name,
                                  **({"changed": changed} if changed else {})})
        if "training.precision" in changed:
            was, now = changed["training.precision"]
            warnings.warn(f"{path}: the run trained in {was} up to step {pos.step} and continues in {now}: its "
                          f"result will match neither an uninterrupted {was} run nor a {now} one, and the artifact's "
                          f"recipe says {now} (the history's 'resumed' event records the change); resume with "
                          f"training.precision: {was} to continue as it began", stacklevel=2)
        self.last = path
        return True

    @staticmethod
    def _restore_rng(tr, ck: dict, meta: dict) -> None:
        tr.epoch_start = {"gen": ck.get("epoch_start_gen"), "torch": ck.get("epoch_start_torch")}
        set_generator_states(tr.loader, ck.get("loader_gen"))
        ckpt.set_python_rng_state(meta["python_rng"])
        ckpt.set_numpy_rng_state(meta["numpy_rng"])
        torch.set_rng_state(ck["torch_rng"])
        if ck.get("cuda_rng") and torch.cuda.is_available():  # as many GPUs as both the run and this machine have
            for index, state in enumerate(ck["cuda_rng"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)


def differences(a, b, path: str = "", was: str = "in the checkpoint") -> list[str]:
    """Where two recipes (JSON-like) differ, each as 'field: old in the checkpoint, new now' (`was`: where the
    old value is read)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(a) + [k for k in b if k not in a]
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), was)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]", was)]
    return [] if a == b else [f"{path or 'recipe'}: {_short(a)} {was}, {_short(b)} now"]


def _short(value) -> str:
    """A recipe value for a message: a list of techniques by their types, anything else cut short."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "type" in v for v in value):
        return "[" + ", ".join(str(v["type"]) for v in value) + "]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _trained_overlap(saved: dict) -> bool:
    """A run started with `mode: joint` under a size target before that mode trained the joint form
    (joint_form.py): masks and LSQ under the allocator's budgets, what `mode: overlap` trains now."""
    kinds = [t.get("type") for t in saved.get("techniques", [])]
    return saved.get("mode") == "joint" and saved.get("target") is not None and "size_budget" not in kinds


def _position(path, meta: dict, total_steps: int) -> Position:
    """The checkpoint's position, checked: a record edited behind a rewritten checksum (no position, a step of
    "abc" or past the run's end) ended in a KeyError or TypeError, or resumed at step 1,000,000 of 66 and saved
    a model the run never trained to its end."""
    try:
        pos = Position(**meta["position"])
        fits = all(isinstance(getattr(pos, k), int) and not isinstance(getattr(pos, k), bool) and getattr(pos, k) >= 0
                   for k in ("step", "epoch", "batch_in_epoch")) and pos.step <= total_steps
    except (KeyError, TypeError):
        fits = False
    if not fits:
        raise TrainingError(f"{path}: its record of where the run stood (position: {meta.get('position')!r:.120}) is "
                            f"damaged or not of this run of {total_steps} steps; delete it (and its .sha256) to resume "
                            f"from the checkpoint before it, or {ckpt.START_OVER}")
    return pos


def _memory_changes(saved: dict | None, recipe) -> dict[str, list]:
    """The memory fields (recipe.MEMORY_FIELDS) a resumed run set anew: 'section.field' -> [the checkpoint's, now]."""
    if not saved:
        return {}
    saved, now = with_added_fields(saved), recipe.model_dump(mode="json")
    return {f"{section}.{field}": [saved[section].get(field), now[section].get(field)]
            for section, field in MEMORY_FIELDS
            if isinstance(saved.get(section), dict) and saved[section].get(field) != now[section].get(field)}


def _as_trained_today(saved: dict | None, recipe) -> dict | None:
    """The checkpoint's recipe under today's names: such a run resumes with mode: overlap; the fields added
    since it was written at what it trained with (recipe.ADDED_FIELDS)."""
    if not saved:
        return saved
    saved = with_added_fields(saved)
    if recipe.mode == "overlap" and _trained_overlap(saved):
        return {**saved, "mode": "overlap"}
    return saved


def _before_joint_form(meta: dict, recipe) -> str:
    """The hint for a run `_trained_overlap` resumed with today's `mode: joint`."""
    if _trained_overlap(meta.get("recipe") or {}) and recipe.technique("size_budget") is not None:
        return (". This run started with mode: joint under a size target before that mode trained the joint form "
                "(docs/joint.md); what it trained then is mode: overlap: resume it with --mode overlap (or mode: "
                "overlap in the recipe)")
    return ""


def _why_not_fit(err: Exception) -> str:
    """torch's reason a state did not load, with the key it names: its first line alone ("Error(s) in loading
    state_dict for LeNet300:") named none, and a missing entry read as ('model')."""
    if isinstance(err, KeyError):
        return f"it has no {err.args[0]!r} entry"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return "; ".join(lines[:3])[:400] if lines else type(err).__name__

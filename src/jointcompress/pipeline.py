"""From a recipe to a deployable, measured artifact: the path the CLI, the demo and the
benchmarks share (train or load the model, compress, finalize, save, measure)."""
from __future__ import annotations

import contextlib
import copy
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .api import Result, compress, seed_everything, train_baseline, validation_held_out
from .artifact.size import dense_fp32_bytes
from .artifact.store import save
from .spec import CompressionSpec
from .bench import batch_of, count_params
from .deploy.timing import DEFAULT_THREADS, time_contenders
from .data import Split, evaluator, hold_out, load_dataset
from .checkpoint import data_digest
from .model_copy import load_model_state
from .errors import ArtifactError, DataError
from .layer_types import COMPRESSIBLE
from .model_call import model_device
from .model_copy import on_cpu
from .models import build_model, is_builder
from .recipe import Recipe


@dataclass
class Outcome:
    """One compressed model, finalized and saved, with what was measured on it."""

    name: str
    model: nn.Module
    result: Result | None
    row: dict = field(default_factory=dict)
    spec: CompressionSpec | None = None  # what finalize made permanent (bits and trained scales per layer)


def builder_for(model_name: str, split: Split, check: bool = True) -> Callable[[], nn.Module]:
    """What builds the model for `split`: a reference model sized for its images and classes, or the
    user's own builder (models.is_builder) as it is, checked to run on the split's inputs unless `check` is
    off (bench holds them against the artifact's recorded inputs, and says more)."""
    if split.x_train.ndim == 2 and not is_builder(model_name):  # a table of features
        return table_builder(model_name, int(split.x_train.shape[1]), split.num_classes, split.name)
    if is_builder(model_name):
        builder = lambda: build_model(model_name)  # noqa: E731
        if check:
            _check_takes_the_data(builder, model_name, split)
        return builder
    h, w = split.x_train.shape[-2:]
    if h != w:
        raise DataError(f"data: {split.name} has {h}x{w} images; the reference model {model_name!r} takes square images: "
                        "crop or pad them, or give your own model as --model file.py:function (docs/your-model.md)")
    return lambda: build_model(model_name, image_size=split.image_size, num_classes=split.num_classes,
                               in_channels=split.channels)


def _check_takes_the_data(builder: Callable[[], nn.Module], model_name: str, split: Split) -> None:
    """A user's builder against the data the command read, before any training or loading: a mismatch was
    a traceback from deep inside `sensitivity --weights`, and named the Python argument train_data elsewhere."""
    from .api import check_data
    from .session.outputs import default_task_loss, split_batch

    try:
        outputs = check_data(builder(), split.x_train[:2], (split.x_train, split.y_train), what=f"data {split.name!r}")
    except DataError as exc:
        if _token_model_on_numbers(builder, split, exc):  # the file's ids standardised as numbers: not the fix it names
            raise DataError(_token_ids_message(exc, model_name)) from None
        default = ("; 'digits' is the embedded 8x8 digits, read where neither --data nor the recipe's data: names a file"
                   if split.name == "digits" else "")
        raise DataError(f"{exc}. Give --data (or the recipe's data:) that {model_name} was written for{default}"
                        f"{_signal_hint(builder, split)}") from None
    try:  # the command line trains with the default task loss: a model it does not fit stopped its teacher's training
        default_task_loss(outputs, split_batch((split.x_train[:2], split.y_train[:2])))
    except DataError as exc:
        cause = str(exc).split(". Pass loss_fn=")[0]
        raise DataError(f"data {split.name!r}: {cause}. The command line trains {model_name} with that loss on the "
                        "data's labels: make the builder's model return [batch, classes] logits (a loss of your own "
                        "needs the Python API, compress(..., loss_fn=...))") from None


def _token_model_on_numbers(builder: Callable[[], nn.Module], split: Split, exc: DataError) -> bool:
    """A model with an embedding that failed on the standardised floats: refused as floats ("takes integer ids"),
    or cast to ids by the model itself and out of the table's range."""
    said = str(exc)
    return (split.x_train.is_floating_point() and ("takes integer ids" in said or "index out of range" in said)
            and any(isinstance(m, nn.Embedding) for m in builder().modules()))


def _token_ids_message(exc: DataError, model_name: str) -> str:
    """A model that takes token ids (an embedding first) given an .npz on the command line: the command line reads
    every .npz as images or a table, standardised to float32 whatever its dtype, so "give token ids as x.long()"
    asked for what the file already held."""
    cause = str(exc).split("; the model has an embedding")[0].split("; give inputs of")[0]
    return (f"{cause}. {model_name} has an embedding, which takes integer token ids, and the command line reads an "
            ".npz as images or a table of features, standardised to float32 (its integer ids too): compress a "
            "token model from Python, jointcompress.compress(model, recipe, (x.long(), y), evaluate) (docs/your-model.md), "
            "or a transformers text model through a recipe's hf: section (docs/transformers.md)")


def _signal_hint(builder: Callable[[], nn.Module], split: Split) -> str:
    """For a model whose first layer is a Conv1d: the command line reads a 3-D array [N, C, L] as grayscale images
    (the model gets [N, 1, C, L]) and a 2-D one [N, L] as a table (the model gets [N, L]); no .npz layout reaches
    a Conv1d as [N, C, L], so "give the data it was written for" named nothing to do."""
    first = next((m for m in builder().modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))), None)
    if not isinstance(first, nn.Conv1d) or split.x_train.dim() not in (2, 4):
        return ""
    read, fix = (("a 3-D array as grayscale images, so the model gets [N, 1, C, L]", "x.squeeze(1)")
                 if split.x_train.dim() == 4 else ("a 2-D array as a table, so the model gets [N, L]", "x.unsqueeze(1)"))
    return (f". A Conv1d model takes [N, C, L], and the command line reads {read}: let the model's forward begin "
            f"with {fix} (or compress it from Python, jointcompress.compress)")


def table_builder(model_name: str, features: int, classes: int, data: str) -> Callable[[], nn.Module]:
    """The reference model for rows of `features` numbers: lenet300 (an MLP) of that many inputs; the others
    take images."""
    if model_name != "lenet300":
        raise DataError(f"data: {data} is a table of {features} features; the reference model {model_name!r} takes "
                        "images: use lenet300 (an MLP), or give your own model as --model file.py:function "
                        "(docs/your-model.md)")
    from .models import LeNet300

    return lambda: LeNet300(features, classes)


def load_start(builder: Callable[[], nn.Module], path: str | Path) -> nn.Module:
    """The model a run starts from: trained weights (a file, into `builder()`), or a saved artifact (a
    directory), rebuilt in the shape it was saved in: a first run's model whose channels prune_structured
    removed, which a second run then compresses under a size target."""
    if Path(path).is_dir():
        from .artifact import load_with_spec

        model, spec = load_with_spec(path, builder)
        if spec.folded_norms:
            raise ArtifactError(
                f"{path}: its BatchNorm layers are stored folded (quant_lsq.norm_format: fp16_folded; "
                f"{', '.join(spec.folded_norms[:3])}{', ...' if len(spec.folded_norms) > 3 else ''}), exact in "
                "evaluation but without the statistics training normalizes by: start the next run from a run whose "
                "recipe keeps norm_format fp16 or fp32 (the first of two runs needs no folding), or from its weights")
        return model.train()
    return load_weights(builder(), path)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name: 8 bytes of little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict from .safetensors (or a torch file with weights_only=True: no unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would suggest weights_only=False: never, for a file not trusted
        what = ("holds pickled objects besides tensors, which are not loaded (nothing is unpickled)"
                if zipfile.is_zipfile(path) else "is not a torch file or a safetensors file")
        raise ArtifactError(f"{path}: {what}; save the weights alone: torch.save(model.state_dict(), path), or "
                            "safetensors") from None
    except Exception as err:  # noqa: BLE001 - any reading problem is the file's
        what = (f"cannot be read as weights ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
                if zipfile.is_zipfile(path) else "is not a torch file (the zip archive torch.save writes) or a "
                "safetensors file")
        raise ArtifactError(f"{path}: {what}; give a .safetensors file or a state dict saved with "
                            "torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: holds a {type(state).__name__}, not a state dict; save the weights with "
                            "torch.save(model.state_dict(), path)")
    state = _unwrapped(state, path)
    from .session.checks import nonfinite_tensors

    broken = nonfinite_tensors(state.items())
    if broken:  # training on them named the learning rate and the data, not the weights
        raise ArtifactError(f"{path}: {', '.join(broken[:4])} hold NaN or inf; these weights come from a training run "
                            "that diverged: give the weights of a good run")
    misfit = _misfit(model.state_dict(), state)
    if not misfit:
        try:
            load_model_state(model, state)
            return model
        except Exception as err:  # noqa: BLE001 - the weights do not fit the recipe's model
            misfit = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    raise ArtifactError(f"{path}: the weights do not fit the recipe's model ({misfit}); is it the same architecture "
                        "(recipe model), built for the same data (the model's input size, channels and classes come "
                        "from --data)?")


WRAPPING_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts keep the weights in a checkpoint


def _unwrapped(state: dict, path: Path) -> dict:
    """The weights of a training checkpoint ({'state_dict': ..., 'epoch': ..., 'optimizer': ...}, as scripts
    save them), read from the first of WRAPPING_KEYS that holds them; the state itself otherwise. It was
    refused as weights that do not fit the model, naming its keys 'epoch' and 'optimizer'."""
    for key in WRAPPING_KEYS:  # first: a checkpoint may hold a tensor of its own beside them ('step': tensor(5))
        inner = state.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            import warnings

            warnings.warn(f"{path}: a training checkpoint (keys {', '.join(map(str, list(state)[:5]))}): its "
                          f"weights are read from '{key}'", stacklevel=3)
            return inner
    return state


def _misfit(own: dict, given: dict) -> str:
    """What keeps `given` from loading into a model whose state is `own`, in a few words (the tensors missing,
    left over, or of another shape; the first three of each), or "" where it fits. torch's own message was
    cut mid-sentence."""
    missing = [k for k in own if k not in given]
    extra = [k for k in given if k not in own]
    shapes = [f"{k} {tuple(given[k].shape)} where the model has {tuple(own[k].shape)}" for k in own
              if isinstance(given.get(k), torch.Tensor) and tuple(given[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(items)} {what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
             for what, items in (("of another shape", shapes), ("missing from the file", missing),
                                 ("in the file, not in the model", extra)) if items]
    return "; ".join(parts)


def train_teacher(model_name: str, split: Split, epochs: int, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                  progress=None, device: torch.device | None = None) -> nn.Module:
    """The model trained from scratch on `device` (default: the CPU), built on the CPU first so a seed gives
    the same start anywhere, and returned on the CPU, as every model the pipeline hands over. Under torchrun its
    batch is the largest multiple of the processes up to `batch_size` (the command's own, not the recipe's: 64 over
    3 processes warned the user to change a training.batch_size the recipe did not set)."""
    from . import distributed as _dist

    seed_everything(seed)
    group = _dist.current()
    if group is not None:
        batch_size = max(group.world_size, batch_size // group.world_size * group.world_size)
    model = builder_for(model_name, split, check=False)()  # the command checked the builder on this data
    if device is not None:
        model.to(device)
    train_baseline(model, (split.x_train, split.y_train), evaluator(*split.selection()), epochs=epochs, lr=lr,
                   batch_size=batch_size, seed=seed, progress=progress)
    return model.cpu()


def compress_and_save(
    name: str, teacher: nn.Module, recipe: Recipe, split: Split, builder, out_dir: Path | None,
    progress=None, callbacks=None, device: torch.device | None = None, **compress_kwargs,
) -> Outcome:
    """Compress a copy of `teacher` (which also serves as the distillation teacher), finalize,
    and save the artifact to OUT_DIR/NAME (not saved when out_dir is None, e.g. on ranks > 0).
    With a `device` other than the teacher's, the copy and the teacher train there (the caller's teacher
    stays where it is), and the compressed model comes back on the CPU, where it is timed and deployed.
    `compress_kwargs` go to compress() (run_dir, resume, checkpoint_every, ...)."""
    split = hold_out(split, recipe.training.validation_images)  # a caller's split that is not held out yet
    seed_everything(recipe.training.seed)
    moved = device is not None and model_device(teacher) != device
    if moved:
        teacher = copy.deepcopy(teacher).to(device)
    model = copy.deepcopy(teacher)
    evaluate = evaluator(*split.selection())  # the kept epoch is chosen here; finalize_and_save reports the test split
    with validation_held_out():  # held out above, and `evaluate` reads them
        result = compress(model, recipe, (split.x_train, split.y_train), evaluate, teacher=teacher,
                          progress=progress, callbacks=callbacks, **compress_kwargs)
    row, spec = finalize_and_save(model, result, teacher, split, builder, out_dir and out_dir / name)
    if moved:
        model.cpu()
        spec = on_cpu(model, spec)[1]
    return Outcome(name, model, result, row, spec)


@contextlib.contextmanager
def _resumable_if_the_write_fails(run_dir: Path):
    """A failed artifact write (a full disk) said which file failed, not that the run's checkpoints were intact and a
    resume writes the artifact again, as a failed checkpoint write says."""
    try:
        yield
    except OSError as err:
        from .checkpoint import CheckpointStore

        if not CheckpointStore(run_dir).paths():
            raise
        raise type(err)(err.errno, f"{err.strerror or err}; the run's training is done and its checkpoints are "
                                   "intact: free space (or fix the folder's permissions), then resume the run (--resume, "
                                   "resume=True) to write the artifact", err.filename) from err


def conflict_summary(epochs: list[dict]) -> tuple[float | None, int | None]:
    """(the share of conflicting gradient pairs over every step the coordination measured, those steps): each
    epoch's rate weighted by its steps (a mean of the epochs' means was shown beside the step count: 0.926 where the
    steps read 0.905); a history without the counts gives its epochs' mean and no count."""
    measured = [(e["conflict_rate"], e.get("conflict_steps")) for e in epochs if e.get("conflict_rate") is not None]
    if not measured:
        return None, None
    steps = sum(n or 0 for _, n in measured)
    if steps and all(n for _, n in measured):
        return sum(r * n for r, n in measured) / steps, steps
    return sum(r for r, _ in measured) / len(measured), steps or None


def finalize_and_save(model: nn.Module, result: Result, teacher: nn.Module, split: Split, builder,
                      path: Path | None) -> tuple[dict, CompressionSpec]:
    """Make the compression permanent, write the artifact to `path`, and measure what is there.
    Returns the measured row and the finalized spec (bits and trained scales, for int8 export).
    Finalized by result.finalize(), session.finalize()'s code path: a Hugging Face model's pruned
    FFN neurons / heads / layers are removed, not left masked by hooks that save does not store."""
    example = result.example_inputs
    spec = result.finalize()
    evaluate = evaluator(split.x_test, split.y_test)
    row = {"accuracy": evaluate(model)["accuracy"], "selected_on": split.selected_on}
    if path is not None:
        extra = {"baseline_accuracy": evaluate(teacher)["accuracy"], "baseline_params": count_params(teacher),
                 "model": result.recipe.model,
                 "data": split.name,  # what baseline_accuracy was measured on: by name, and exactly
                 "data_sha256": data_digest((split.x_test, split.y_test)),
                 **({"input_standardisation": split.standardisation} if split.standardisation else {})}
        with _resumable_if_the_write_fails(path.parent):
            manifest = save(model, spec, path, builder=builder, example_inputs=example, extra=extra)
        row["bytes"] = manifest["bytes"]["total"]  # the stored parts: values + indices + scales + biases + the rest
        row["file_bytes"] = manifest["weights_file_bytes"]  # the weights file on disk: the parts + its container
    row.update(_describe(model, spec, reference_weights=weight_counts(teacher)[1]))
    row["wall_s"] = result.history.wall_seconds
    row["conflict_rate"], row["conflict_steps"] = conflict_summary(result.history.epochs)
    row.update(coordination_effect(result.history))
    return row, spec


def coordination_effect(history) -> dict:
    """How often the coordination strategy changed the update (share of the measured steps with
    ||resolved - sum|| > 0) and by how much on average; from the logged steps for a history
    recorded before every measured step was counted."""
    counted = getattr(history, "coordination", None) or {}
    if counted.get("measured"):
        n = counted["measured"]
        return {"changed_share": counted["changed"] / n, "changed_mean": counted["changed_sum"] / n}
    changed = [s["changed"] for s in history.steps if "changed" in s]
    if not changed:
        return {"changed_share": None, "changed_mean": None}
    return {"changed_share": sum(c > 1e-9 for c in changed) / len(changed), "changed_mean": sum(changed) / len(changed)}


def _describe(model: nn.Module, spec, reference_weights: int) -> dict:
    """Parameters, bits and two sparsities: the zeros among the model's own weights, and the share of the
    uncompressed model's `reference_weights` that are zero or removed (after prune_structured the first
    reads only the zeros of what is left: 4.9% of a LeNet-5 that had lost 84% of conv2's channels)."""
    p = count_params(model)
    bits = sorted({ls.bits for ls in spec.layers.values() if ls.bits})
    nonzero, total = weight_counts(model)
    return {"params": p["total"], "nonzero": p["nonzero"], "sparsity": (total - nonzero) / max(1, total),
            "sparsity_of_uncompressed": 1 - nonzero / max(1, reference_weights), "bits": "/".join(map(str, bits)) or "32"}


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(nonzero, all) weights of the Linear and convolution layers."""
    nonzero = total = 0
    for m in model.modules():
        if isinstance(m, COMPRESSIBLE):
            nonzero += int((m.weight != 0).sum())
            total += m.weight.numel()
    return nonzero, total


def weight_sparsity(model: nn.Module) -> float:
    """The share of zeros among the weights of the Linear and convolution layers."""
    nonzero, total = weight_counts(model)
    return (total - nonzero) / max(1, total)


def measure_latency(models: dict[str, nn.Module], example: torch.Tensor, runs: int = 30,
                    threads: int = DEFAULT_THREADS) -> dict[str, dict]:
    """Batch-1 and batch-64 median latency of every model, the honest way (deploy.timing):
    `threads` threads for all, interleaved rounds, each also timed alone. Each row also records
    the thread count and the batch sizes whose interleaved and alone medians disagree."""
    for m in models.values():
        if isinstance(m, nn.Module):  # a deployed (e.g. int8 ONNX Runtime) model is already an inference callable
            m.eval()
    out: dict[str, dict] = {k: {"latency_threads": threads, "latency_flagged": []} for k in models}
    for bs in (1, 64):
        x = batch_of(example, bs)
        timing = time_contenders({k: (lambda m=m: m(x)) for k, m in models.items()}, threads=threads, rounds=runs)
        for k, v in timing.interleaved_ms.items():
            out[k][f"latency_ms_b{bs}"] = v
            if k in timing.flagged:
                out[k]["latency_flagged"].append(bs)
    return out


# how many test rows the check of a given model's inputs reads (a forward pass, once per run)
INPUTS_CHECK_ROWS = 2000


def check_given_model_inputs(model: nn.Module, split: Split, data: str | None, inputs: str, weights) -> None:
    """Warn where the model given with --weights reads near chance on the inputs as the recipe's `inputs` feeds
    them, naming the input form it reads best on. Why: a teacher trained on pixels / 255 was fed standardised
    inputs, read 23% on ten classes, and the run trained and saved on it without a word (the table showed the
    number, nothing said why). Near chance: under a quarter of the way from the most common class's share to 100%."""
    import warnings

    from .data import INPUT_FORMS

    reading = _test_accuracy(model, split)
    chance = float(torch.bincount(split.y_test[:INPUTS_CHECK_ROWS]).max()) / len(split.y_test[:INPUTS_CHECK_ROWS])
    useful = chance + 0.25 * (1 - chance)
    if reading >= useful:
        return
    others = {form: _test_accuracy(model, load_dataset(data, inputs=form)) for form in INPUT_FORMS if form != inputs}
    best = max(others, key=others.get)
    readings = ", ".join(f"{form} {100 * acc:.1f}%" for form, acc in others.items())
    fix = (f"set `inputs: {best}` in the recipe, the form it reads best on" if others[best] >= useful
           else "it reads near chance on every form: are these the weights of this model for this data, its labels "
                "in the same order?")
    warnings.warn(f"--weights {weights}: the model reads {100 * reading:.1f}% of {split.name}'s test images as the "
                  f"recipe's `inputs: {inputs}` feeds them, near chance (the most common class is {100 * chance:.0f}%); "
                  f"fed the other ways it reads {readings}: {fix}", stacklevel=2)


def _test_accuracy(model: nn.Module, split: Split) -> float:
    rows = slice(0, INPUTS_CHECK_ROWS)
    return evaluator(split.x_test[rows], split.y_test[rows])(model)["accuracy"]


def uncompressed_row(model: nn.Module, split: Split) -> dict:
    p = count_params(model)
    return {
        "accuracy": evaluator(split.x_test, split.y_test)(model)["accuracy"],
        "bytes": dense_fp32_bytes(model),
        "params": p["total"],
        "nonzero": p["nonzero"],
        "sparsity": weight_sparsity(model),  # a second run's model has zeros already
        "bits": "32",
    }


def load_split(recipe: Recipe, data: str | None) -> Split:
    """The recipe's data set (or `data`), with training.validation_images of its training rows held out
    as the evaluation the run's choices read."""
    return hold_out(load_dataset(data if data is not None else recipe.data, inputs=recipe.inputs),
                    recipe.training.validation_images)

"""`jointcompress bench ARTIFACT_DIR`: measure a saved artifact against its dense architecture;
`jointcompress bench --against torch-pruning --model NAME --data DATA`: compress NAME with
jointcompress and with Torch-Pruning and compare them side by side (deploy.against).

The dense side is the same architecture freshly built (fp32); its weights do not matter for
size, MACs and latency. Its accuracy is the trained baseline's, which only the compress run
knows: it is read from the manifest's extra["baseline_accuracy"] when present.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from . import MODEL_CHOICES


def _num_classes(manifest: dict, name: str) -> int:
    """The classes of reference model `name` as the artifact stores its output layer (the last Linear):
    its recorded shape, or 10 where the layer is not recorded or the model has no Linear layer (a fully
    convolutional model of the user's, whose builder takes no class count anyway)."""
    import torch.nn as nn

    from ..models import build_model

    linears = [n for n, m in build_model(name).named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return 10
    head = linears[-1]
    shape = (manifest.get("layers") or {}).get(head, {}).get("shape") \
        or ((manifest.get("other_tensors") or {}).get(f"{head}.weight") or {}).get("shape")
    return int(shape[0]) if shape else 10


def _input_shape(manifest: dict) -> list[int]:
    """The shape of the example inputs the artifact recorded (batch first); [1, 1, 28, 28] where none."""
    inputs = manifest.get("example_inputs") or []
    return [int(n) for n in inputs[0]["shape"]] if inputs else [1, 1, 28, 28]


def _recorded_inputs(manifest: dict, n: int):
    """`n` samples shaped as the artifact's recorded example inputs: random floats, zeros for integer inputs
    (token ids: 0 is an id of every vocabulary); one tensor, a tuple, or a dict where they were named."""
    import torch

    from ..artifact.store import inputs_of_records

    records = manifest.get("example_inputs") or [{"shape": [1, 1, 28, 28], "dtype": "float32"}]
    made = inputs_of_records(records, batch=n, floats=torch.randn)
    return made[0] if isinstance(made, tuple) and len(made) == 1 else made


def _image_shape(manifest: dict) -> tuple[int, int]:
    """(channels, image size) of the example inputs the artifact recorded; (1, 28) where none."""
    shape = _input_shape(manifest)
    return (int(shape[1]) if len(shape) == 4 else 1), int(shape[-1])


def _builder(name: str, manifest: dict, split):
    """What builds the model: for `split` as a run on it built it; else sized from the artifact's recorded inputs
    (a table of features: lenet300 of that many inputs)."""
    from ..models import build_model, is_builder
    from ..pipeline import builder_for, table_builder

    if split is not None:
        return builder_for(name, split, check=False)
    classes, shape = _num_classes(manifest, name), _input_shape(manifest)
    if len(shape) == 2 and not is_builder(name):
        return table_builder(name, shape[1], classes, "the artifact's recorded inputs")
    channels, size = _image_shape(manifest)
    return lambda: build_model(name, image_size=size, num_classes=classes, in_channels=channels)


def _takes_the_default_input(artifact_dir: Path, name: str, builder) -> None:
    """A user's model saved without example inputs is timed on the default [1, 1, 28, 28] input: one that cannot
    take it (a 30-feature MLP) stopped in torch's "mat1 and mat2 shapes cannot be multiplied" traceback."""
    import torch

    from ..errors import ArtifactError
    from ..model_call import call_model

    try:
        with torch.no_grad():
            call_model(builder().eval(), _recorded_inputs({}, 1))
    except Exception as err:  # noqa: BLE001 -- any failure of the user's forward on a guessed input means one thing
        raise ArtifactError(f"{artifact_dir}/manifest.json records no example inputs (saved without example_inputs=...), "
                            f"and {name} does not take the default [1, 1, 28, 28] input ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120]}): pass --data with the data it was compressed on (or "
                            "any of the same shape), or save with artifact.save(..., example_inputs=...)") from None


def run_bench(artifact_dir: Path, model: Optional[str], data: Optional[str], runs: int = 50, threads: int = 1,
              int8: bool = False, inputs: Optional[str] = None) -> dict:
    """The artifact against its builder's dense model; with `int8`, its deployable int8 ONNX Runtime model too.
    `inputs`: how --data's values become the model's inputs (data.INPUT_FORMS), for an artifact whose manifest does
    not record it (one saved from Python without extra={"input_standardisation": ...}); None: the record, else
    standardised as `compress` trains."""
    from ..artifact import byte_breakdown, load_with_spec, read_manifest
    from ..bench import bench
    from ..errors import ArtifactError, RecipeError
    from ..models import is_builder, load_builder

    manifest = read_manifest(artifact_dir)
    extra = manifest.get("extra") or {}
    if "hf_config" in extra:
        kind = extra.get("hf_class") or "a transformers class"
        raise ArtifactError(f"{artifact_dir}: a Hugging Face model's artifact ({kind}), which `bench` does not time; "
                            "a `jointcompress compress` run with an hf: section "
                            "measured its own (its summary.json: dev accuracy, bytes, int8 ONNX latency against the "
                            "teacher). Load it with jointcompress.hf.artifact.load_hf_artifact")
    name = model or (manifest.get("recipe") or {}).get("model")
    if not name:
        raise ArtifactError(f"{artifact_dir}/manifest.json: no recipe.model recorded; pass --model")
    if model is None and is_builder(name):
        try:
            load_builder(name)
        except RecipeError as exc:
            raise RecipeError(f"{exc} (the builder {artifact_dir}/manifest.json records; pass --model "
                              "file.py:function where it is now)") from None
    _check_inputs_option(inputs, data, extra, artifact_dir)
    split = None
    if data is not None:
        from ..data import load_dataset

        split = load_dataset(data, inputs=inputs or "standardised")
    builder = _builder(name, manifest, split)
    if split is None and not manifest.get("example_inputs") and is_builder(name):
        _takes_the_default_input(artifact_dir, name, builder)
    data_note = None
    if split is not None:
        split, data_note = _data_as_the_model_takes_it(artifact_dir, manifest, data, split, builder)
    after, spec = load_with_spec(artifact_dir, builder)
    example = split.x_test[:64] if split is not None else _recorded_inputs(manifest, 64)
    eval_fn = None
    if split is not None:
        from ..data import accuracy

        eval_fn = lambda m: accuracy(m, split.x_test, split.y_test)  # noqa: E731
    int8_model, int8_note = _int8_model(after, spec, split, example, threads) if int8 else (None, None)
    result = bench(builder(), after, example, eval_fn=eval_fn, artifact_dir=artifact_dir, runs=runs,
                   threads=threads, int8_model=int8_model)
    extra = manifest.get("extra") or {}
    baseline, measured_on = extra.get("baseline_accuracy"), extra.get("data")
    started = extra.get("baseline_params")
    if started and started.get("total") == result["before"]["params"]["total"]:
        # the trained dense model's counts: the builder's fresh one has zero biases
        result["before"]["params"] = started
        result["ratios"]["params_nonzero"] = started["nonzero"] / max(result["after"]["params"]["nonzero"], 1)
    elif started:
        result["note"] = _started_elsewhere_note(started, baseline)
        baseline = None  # another model's: the column is the builder's
    if baseline is not None and measured_on is not None and split is not None and not _same_data(extra, split):
        baseline = None  # the dense model's accuracy on other data: no before / after pair (bench has no dense weights)
        other = f"not on {split.name!r}" if measured_on != split.name else f"not on this {split.name!r} (other test images)"
        result["note"] = (f"before: the dense model's accuracy was recorded on {measured_on!r} when the artifact was made, "
                          f"{other}; only the compressed model's accuracy is measured here")
    if baseline is not None and eval_fn is not None:
        result["before"]["accuracy"] = float(baseline)  # the trained dense model, not the random one
        result["ratios"]["accuracy_delta"] = result["after"]["accuracy"] - float(baseline)
    elif eval_fn is not None:
        result["before"].pop("accuracy", None)  # a randomly initialised dense model's accuracy means nothing
        result["ratios"].pop("accuracy_delta", None)
    unrecorded = _unrecorded_standardisation(manifest, split, after) if inputs is None else None
    data_note = "; ".join(n for n in (data_note, unrecorded) if n) or None
    if data_note:
        result["note"] = f"{result['note']}; {data_note}" if result.get("note") else data_note
    result.update(model=name, artifact=str(artifact_dir), manifest_bytes=manifest.get("bytes"),
                  breakdown=byte_breakdown(manifest))
    if int8_model is not None:
        _int8_accuracy(result, after, int8_model, split)
        if int8_model.scratch is not None:  # its ONNX files, read into the sessions: removed now, not at exit
            int8_model.scratch.cleanup()
    if int8_note is not None:
        result["int8_note"] = int8_note
    return result


# why a small int8 model's interleaved and alone medians differ, said where bench flags it (docs/latency.md): a re-run
# does not close that gap, and both medians are right for their setting
INT8_INTERLEAVED = ("int8 ONNX Runtime: a small int8 model reads slower interleaved than alone on every run: the dense "
                    "PyTorch call before it in each round evicts its weights and code from the caches (docs/latency.md). "
                    "Both medians hold: alone is a process that runs only the int8 model, interleaved one that runs "
                    "other work between its calls")


def _int8_model(after, spec, split, example, threads: int):
    """(the artifact's int8 ONNX Runtime model, None), quantized on the trained scales and calibrated on 512 of
    --data's training images (on the example inputs without --data: its latency holds, its accuracy is not read),
    or (None, why not) where the export or the quantization fails: bench still measures the rest."""
    from ..deploy.int8 import quantize_int8

    calibration = split.x_train[:512] if split is not None else example
    try:
        return quantize_int8(after, spec, calibration, example, threads=threads), None
    except Exception as err:  # noqa: BLE001 - an export, a quantizer or a runtime that refuses this model
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        return None, f"int8 ONNX Runtime: not measured ({type(err).__name__}: {reason})"


def _int8_accuracy(result: dict, after, int8_model, split) -> None:
    """The int8 model's accuracy on --data's test split (int8_parity, as the demo reads it), with its top-1
    agreement with the artifact in PyTorch; against the trained dense model's where bench has it."""
    if split is None:
        result["int8_note"] = ("int8 ONNX Runtime: calibrated on random inputs shaped as the artifact's examples (no "
                               "--data): its latency holds, its accuracy is not measured")
        return
    from ..deploy.int8 import int8_parity

    parity = int8_parity(after, int8_model, (split.x_test, split.y_test))
    result["int8"].update(accuracy=parity.metric_deployed, top1_agreement=parity.top1_agreement)
    if "accuracy" in result["before"] and parity.metric_deployed is not None:
        result["ratios_int8"]["accuracy_delta"] = parity.metric_deployed - result["before"]["accuracy"]


def _started_elsewhere_note(started: dict, baseline: float | None) -> str:
    """A second run's artifact (compress --weights FIRST): its run compressed the first run's smaller model, whose
    parameters and accuracy the manifest records, while bench's "before" is the builder's full model. The two were
    mixed in one column (params of the one, MACs, bytes and latency of the other: 1.11x beside 3.68x)."""
    accuracy = f" at accuracy {baseline:.3f}" if baseline is not None else ""
    return (f"before: the builder's model (its architecture as built, untrained); the run that made the artifact "
            f"started from another model (compress --weights), of {started['total']:,} parameters{accuracy}, which "
            "compress's own table measures against")


def _data_as_the_model_takes_it(artifact_dir: Path, manifest: dict, data: str, split, builder):
    """--data standardised, laid out and checked as the artifact's model takes it; and what the reader should
    know of it (None where nothing differs from the run that made the artifact)."""
    split, standardisation = _standardised_as_trained(split, manifest, data)
    split = _as_recorded(split, manifest, builder)
    shape = _check_data_fits(artifact_dir, manifest, data, split, builder)
    return split, "; ".join(n for n in (shape, standardisation) if n) or None


def _standardised_as_trained(split, manifest: dict, data: str):
    """--data standardised as the artifact's model was trained (the manifest's input_standardisation), not with
    the file's own training split: a held-out file's statistics differ, and the accuracy read so was not the
    model's. Returns the split and a note where the statistics changed (None where they agree)."""
    from dataclasses import replace

    from ..data import restandardised
    from ..errors import DataError

    wanted, given = (manifest.get("extra") or {}).get("input_standardisation"), split.standardisation
    if not wanted or not given or wanted == given:
        return split, None
    try:
        x_test = restandardised(split.x_test, given, wanted)
    except DataError as exc:
        raise DataError(f"--data {data}: {exc} (manifest.json extra.input_standardisation)") from None
    return (replace(split, x_test=x_test, standardisation=wanted),
            f"--data standardised with the statistics the model was trained on (the manifest's input_standardisation), "
            f"not {split.name!r}'s own training split")


def _check_inputs_option(inputs: Optional[str], data: Optional[str], extra: dict, artifact_dir: Path) -> None:
    """--inputs says how --data becomes the inputs of a model whose manifest does not: refused without --data (there is
    nothing to read so), and where the manifest records it (the record is what the model was trained on, and --data is
    read that way already), rather than one silently winning over the other."""
    from ..data import INPUT_FORMS
    from ..errors import JointCompressError

    if inputs is None:
        return
    if inputs not in INPUT_FORMS:
        raise JointCompressError(f"--inputs {inputs}: choose one of {', '.join(INPUT_FORMS)}")
    if data is None:
        raise JointCompressError(f"--inputs {inputs}: says how --data's values become the model's inputs; add --data "
                                 "(without it bench times the artifact's recorded example inputs), or drop --inputs")
    if extra.get("input_standardisation"):
        raise JointCompressError(f"--inputs {inputs}: {artifact_dir}/manifest.json records the inputs its model was "
                                 "trained on (extra.input_standardisation), and bench reads --data that way already; "
                                 "drop --inputs")


def _unrecorded_standardisation(manifest: dict, split, model) -> str | None:
    """An artifact the Python API saved without extra={"input_standardisation": ...} does not say what its model
    was trained on: --data is read standardised, as `compress` trains, and a model trained on the file's values as
    they are was reported at another accuracy without a word (0.680 for 0.820). Said, with the accuracy on the
    file's own values beside it."""
    from ..data import accuracy, full_scale, restandardised
    from ..errors import DataError

    if split is None or not split.standardisation or (manifest.get("extra") or {}).get("input_standardisation"):
        return None
    given = split.standardisation
    full = full_scale(split.name)  # what unit_range divides the file's values by
    forms = {"as they are": 1.0, f"/ {full:g}": full}
    readings = []
    for words, scale in forms.items():  # the recipe's inputs: as_stored, and unit_range (data.INPUT_FORMS)
        wanted = {**given, "mean": [0.0] * len(given["mean"]), "std": [scale] * len(given["std"])}
        try:
            reading = accuracy(model, restandardised(split.x_test, given, wanted), split.y_test)
            readings.append(f"on the file's values {words} {reading:.3f}")
        except (DataError, RuntimeError, ValueError):  # a layout the record does not fit: the note alone
            pass
    on_raw = f"; it reads {', and '.join(readings)}" if readings else ""
    return ("the manifest records no input standardisation (an artifact saved without extra={'input_standardisation': "
            f"split.standardisation}}): accuracy is read on --data standardised with its own training split's statistics, "
            f"as compress trains{on_raw}; which is the model's depends on the inputs it was trained on: --inputs "
            "as_stored (values as the file holds them) or unit_range (/ the full scale) reads --data so, the int8 "
            "model's calibration too")


def _as_recorded(split, manifest: dict, builder):
    """A file of [N, C, L] samples (a Conv1d model's, or a sequence model's [N, T, F]) is read as grayscale [N, H, W]
    images and given a channel axis; where the artifact recorded inputs of that very [C, L] shape and the model
    gives a row of logits for each of the file's samples, and none (or rows of another length) for the images, the
    file held them as they are, and the axis comes off again (bench refused the data the model was compressed on).
    A model that reads both alike (one that flattens) keeps the images. The file's labels play no part: they may
    show fewer classes than the model has."""
    from dataclasses import replace

    records = manifest.get("example_inputs") or []
    made_for = tuple(int(n) for n in records[0]["shape"][1:]) if len(records) == 1 else ()
    if len(made_for) != 2 or tuple(split.x_test.shape[1:]) != (1, *made_for):
        return split
    model, few = builder().eval(), split.x_test[:2]
    images, samples = _classes_read(model, few), _classes_read(model, few[:, 0])
    if samples is None or images == samples:  # read alike (a model that flattens): the images, as before
        return split
    return replace(split, **{k: getattr(split, k).squeeze(1) for k in ("x_train", "x_test", "x_val")
                             if getattr(split, k) is not None})


def _classes_read(model, x) -> int | None:
    """How many classes `model` gives a row of logits over for each sample of `x` (two where the data has them:
    one would let a .squeeze() in the model take the batch axis off); None where it fails or gives no row per
    sample (a model that runs on the images but keeps their extra axis: a mean over time taken over the channel)."""
    import torch

    from ..model_call import call_model
    from ..session.outputs import logits_of

    try:
        with torch.no_grad():
            logits = logits_of(call_model(model, x))
    except Exception:  # noqa: BLE001 - any failure: the model does not take these inputs
        return None
    return int(logits.shape[1]) if logits.dim() == 2 and len(logits) == len(x) else None


def _check_data_fits(artifact_dir: Path, manifest: dict, data: str, split, builder) -> str | None:
    """--data whose samples differ in shape from the example inputs the artifact recorded: load and run
    one sample on both sides first, so a mismatch is one message, not a traceback from the MAC count. Where
    both run (a model that pools globally), the note that MACs and latency are of the data's shape."""
    import torch

    from ..artifact import load
    from ..errors import DataError
    from ..model_call import call_model

    records = manifest.get("example_inputs") or []
    if len(records) != 1:  # several inputs (or none recorded): nothing to hold an image split against
        return None
    made_for, given = tuple(int(n) for n in records[0]["shape"][1:]), tuple(int(n) for n in split.x_test.shape[1:])
    if made_for == given:
        return None
    try:
        with torch.no_grad():
            for model in (builder(), load(artifact_dir, builder)):
                call_model(model.eval(), split.x_test[:1])
    except Exception as exc:  # noqa: BLE001 - any failure here is the shape mismatch this names
        raise DataError(
            f"--data {data}: its samples are shaped {list(given)} ({split.name}), but the model of {artifact_dir} was made "
            f"for inputs shaped {list(made_for)} (manifest.json example_inputs, batch first: {list(records[0]['shape'])}); "
            f"pass --data of that shape (the data the artifact was compressed on), or leave --data out to time it "
            f"without accuracy ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return (f"MACs and latency are of --data's inputs, shaped {list(given)}; the artifact was made for {list(made_for)} "
            "(leave --data out to measure those)")


def latency_note(result: dict) -> str:
    """How the latencies were taken, and any side whose interleaved and alone medians disagree."""
    from ..deploy.timing import Timing, describe

    timings = [Timing(**t) for t in result.get("timing", {}).values()]
    return "latency: " + ("; ".join(f"batch {k[1:]}: {describe(t)}" for k, t in zip(result.get("timing", {}), timings))
                          or "not measured")


AGAINST = ("torch-pruning",)
# the reference models whose channels Torch-Pruning prunes as it is (not the ViT's attention heads, not the
# LSTM's gates: its pruner would cut across them)
AGAINST_MODELS = ("lenet300", "lenet5", "resnet", "mobilenet", "seqcnn")


def run_against_cli(against: str, model: Optional[str], data: Optional[str], teacher: Optional[Path],
                    options: dict, workdir: Optional[Path] = None) -> dict:
    """`bench --against torch-pruning`: deploy.against on the named model and data. The contenders' ONNX
    files stay in `workdir` when given; else they go to a temporary folder removed at the end (every run
    left one behind in the system's temporary directory)."""
    import shlex
    import sys

    from ..deploy.against import (AgainstConfig, check_before_training, dense_teacher, matching_split,
                                  require_torch_pruning, run_against)
    from ..errors import JointCompressError
    from ..models import is_builder
    from ..pipeline import builder_for

    if against not in AGAINST:
        raise JointCompressError(f"--against {against!r} is unknown; use one of: {', '.join(AGAINST)}")
    require_torch_pruning()
    if not model:
        raise JointCompressError("--against needs --model (the architecture to compress: lenet5, resnet, ...)")
    if model not in AGAINST_MODELS and not is_builder(model):
        raise JointCompressError(f"--model {model!r} is not supported by --against; use one of: {', '.join(AGAINST_MODELS)}, "
                                 "or your own builder (package.module:function or file.py:function)")
    from ..data import load_dataset

    split = load_dataset(data)
    train_limit = options.pop("train_limit", None)
    if train_limit:
        split.x_train, split.y_train = split.x_train[:train_limit], split.y_train[:train_limit]
    cfg = AgainstConfig(model=model, **options)
    build = builder_for(model, split)  # checked on the data: names --data, and the digits default where they differ
    split = matching_split(split, cfg)  # once: the teacher's and the comparison's held-out rows (its note said twice)
    check_before_training(cfg, split, build())  # the settings, the model, a target out of reach
    dense, note = dense_teacher(cfg, split, teacher)
    # the command as typed (the data and options with it), so the file says how to run it again
    typed = ("jointcompress " + shlex.join(sys.argv[1:]) if "--against" in sys.argv
             else f"jointcompress bench --against {against}")
    command = {"command": typed, "data": data or "digits"}
    if not note.startswith("trained here"):  # the dense model was read from --teacher: no epochs of ours trained it
        cfg = dataclasses.replace(cfg, teacher_epochs=None)
    if workdir is not None:
        return {**command, **run_against(cfg, split, dense, note, workdir=workdir)}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="jointcompress-against-") as scratch:
        result = run_against(cfg, split, dense, note, workdir=Path(scratch))
    return {**command, **result, "workdir": None}  # removed: --workdir keeps the files


def target_note(target: dict) -> str:
    """Whether our model met its latency target: the allocation's probe before training, and the deployed
    model in the comparison's own timing run (deploy.against.deployed_against_target)."""
    verdict = "met" if target.get("met") else "NOT met (the narrowest model tried is what was trained)"
    note = (f"latency target {target['latency_ms_b64']:.3f} ms at batch 64: allocation {verdict}, measured "
            f"{target['measured_ms']:.3f} ms before training ({target.get('measured_as', 'on the deployment')})")
    if "deployed_met" in target:  # results written before it have the probe only
        state = "under the target" if target["deployed_met"] else "[yellow]OVER the target[/yellow]"
        goal = target.get("deployed_goal_ms", target["latency_ms_b64"])
        if goal != target["latency_ms_b64"]:  # a speedup target: dense PyTorch of the timing run / speedup
            state += f" of {goal:.3f} ms there (dense PyTorch in that run / {target['speedup']:g})"
        note += (f"; the deployed model in the timing run: {target['deployed_ms']:.3f} ms alone (measured the same "
                 f"way), {target['deployed_interleaved_ms_b64']:.3f} ms interleaved: {state}")
        if target["met"] and not target["deployed_met"]:
            note += " (the probe met it: a busy machine, or a target with no margin; re-time with the machine quiet)"
    return note


LOST_NOTE_POINTS = 5.0  # accuracy points ours may lose against the dense model before the table's notes say so


def against_notes(result: dict) -> list[str]:
    """What the JSON records that the table does not show: whether Torch-Pruning reached our accuracy
    (else its row is its closest candidate, less accurate), and contenders whose interleaved and alone
    medians differ by more than 20% (a busy machine: compare the bracketed alone times too)."""
    notes = []
    ours = result.get("ours", {})
    if ours.get("strides") or ours.get("dropped_blocks"):  # results written before raise_stride have no strides
        notes.append(f"ours reshaped the model: strides {ours.get('strides') or 'as built'}, blocks dropped "
                     f"{ours.get('dropped_blocks') or 'none'}; Torch-Pruning started from "
                     f"{result.get('torch_pruning_start', 'the dense teacher')}")
    widths = result.get("widths", {})
    if widths.get("ours") and widths.get("ours") == widths.get("dense"):  # "met" by the runtime: a probe read it so
        notes.append("[yellow]ours removed no channel[/yellow]: the uncompressed model, timed slow when the target was "
                     "set, met it in ONNX Runtime as it is; its speed-up is the runtime's and int8's alone (see "
                     "dense_fp32_ort). Give --target-ms, or time again on a quiet machine")
    accuracy = result.get("accuracy", {})
    lost = 100 * (accuracy.get("dense_fp32_torch", 0.0) - accuracy.get("ours_fp32_torch", 1.0))
    if lost > LOST_NOTE_POINTS:  # a collapsed run read as a row like any other, and Torch-Pruning "matched" it
        epochs = result.get("config", {}).get("epochs")
        notes.append(f"[yellow]ours lost {lost:.1f} points of the dense model's accuracy[/yellow]: the target leaves "
                     f"too few channels for {epochs or 'these'} epochs of training, and Torch-Pruning is pruned only until its "
                     "accuracy falls to that one (its rows may stay above it); give more --epochs or a lower --speedup")
    if str(result.get("teacher", "")).startswith("loaded from"):  # compress --weights says the same of its model
        notes.append(f"the dense model was {result['teacher']} (--teacher): if it trained on every training image, it "
                     f"saw those held out here to choose on ({result.get('selected_on', 'the selection images')}), and "
                     "the selection accuracies (ours, and Torch-Pruning's match to it) read high; a teacher this command "
                     "trains and saves there holds them out")
    match = result["match"]
    if not match["torch_pruning_matched"]:
        ours = 100 * match["ours_selection_accuracy"]
        best = max(100 * c["selection_accuracy_full_budget"] for c in result["torch_pruning"]["candidates"])
        notes.append(f"[yellow]Torch-Pruning did not reach our accuracy[/yellow] on the selection images ({ours:.2f}%; its "
                     f"best candidate {best:.2f}%): its rows are its least pruned stage, not an equal-accuracy match")
    flagged = sorted({f"{name} (batch {b.removeprefix('batch')})" for b, t in result["timing"].items() for name in t["flagged"]})
    if flagged:
        notes.append(f"[yellow]interleaved and alone medians differ by more than 20%[/yellow] for {', '.join(flagged)}: "
                     "the machine is busy; the bracketed alone times are the check")
    return notes


def against_table(result: dict):
    """Accuracy, latency and speed-up of every contender (batch 1 and 64, interleaved)."""
    from rich.table import Table

    from ..deploy.timing import on_machine

    machine = on_machine(result["timing"]["batch1"].get("machine"))  # absent from results of earlier versions
    t = Table(title=f"vs Torch-Pruning ({result['threads']} thread(s){machine}; interleaved medians, alone in brackets)")
    for col in ("contender", "accuracy", "ms b1", "x b1", "ms b64", "x b64"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    b1, b64 = result["timing"]["batch1"], result["timing"]["batch64"]
    for name, acc in result["accuracy"].items():
        t.add_row(name, f"{100 * acc:.2f}%",
                  f"{b1['latency_ms'][name]:.4f} ({b1['alone_ms'][name]:.4f})", f"{b1['speedup_vs_dense_fp32_torch'][name]:.1f}",
                  f"{b64['latency_ms'][name]:.3f} ({b64['alone_ms'][name]:.3f})", f"{b64['speedup_vs_dense_fp32_torch'][name]:.1f}")
    return t


def _same_data(extra: dict, split) -> bool:
    """The test split the artifact's "before" accuracy was measured on: by its digest where the manifest
    records one (a file of the same name elsewhere holds other images), else by name (older artifacts)."""
    recorded = extra.get("data_sha256")
    if recorded is None:
        return extra.get("data") == split.name
    from ..checkpoint import data_digest

    return recorded == data_digest((split.x_test, split.y_test))


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_command(
        ctx: typer.Context,
        artifact_dir: Optional[Path] = typer.Argument(None, help="Directory written by save() / compress."),
        model: Optional[str] = typer.Option(None, "--model", help=f"{MODEL_CHOICES} (default: from the manifest)."),
        data: Optional[str] = typer.Option(None, "--data", help="'digits' or an .npz of images (MNIST-style); enables accuracy."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measurements as JSON here."),
        int8: bool = typer.Option(False, "--int8", help="Also build the artifact's deployable int8 ONNX Runtime model "
                                  "(trained scales; calibrated on --data's training images) and time it beside the "
                                  "others, with its accuracy on --data."),
        inputs: Optional[str] = typer.Option(None, "--inputs", help="How --data's values become the model's inputs, for "
                                             "an artifact whose manifest does not record it (saved from Python): "
                                             "standardised (as compress trains), unit_range (/ 255, digits / 16) or "
                                             "as_stored."),
        runs: int = typer.Option(50, "--runs", min=1, help="Timed runs per batch size (median reported)."),
        threads: int = typer.Option(1, "--threads", min=1, help="Threads for both sides (PyTorch and ONNX Runtime)."),
        against: Optional[str] = typer.Option(None, "--against", help="'torch-pruning': compress --model on --data "
                                              "with jointcompress and with Torch-Pruning, side by side at equal accuracy."),
        teacher: Optional[Path] = typer.Option(None, "--teacher", help="--against: dense weights (safetensors); "
                                               "trained and saved there if missing."),
        teacher_epochs: int = typer.Option(8, "--teacher-epochs", min=1, help="--against: epochs to train the dense model."),
        epochs: int = typer.Option(4, "--epochs", min=1, help="--against: training epochs of each contender."),
        speedup: float = typer.Option(20.0, "--speedup", min=1.0, help="--against: latency target, x faster than dense."),
        tp_steps: int = typer.Option(6, "--tp-steps", min=1, help="--against: Torch-Pruning's pruning steps."),
        train_limit: Optional[int] = typer.Option(None, "--train-limit", min=1, help="--against: first N training rows."),
        select_images: int = typer.Option(2000, "--select-images", min=1, help="--against: training images held out for the "
                                          "choices (the matching, the kept epochs; at most a tenth of the rows)."),
        target_ms: Optional[float] = typer.Option(None, "--target-ms", min=0.0, help="--against: the target in ONNX Runtime "
                                                  "fp32 ms at batch 64 instead of --speedup (immune to PyTorch's load)."),
        min_width: Optional[int] = typer.Option(None, "--min-width", min=1, help="--against: fewest channels a group may "
                                                "keep (default 8; LeNet-5 reaches 20x only with 4 stem channels)."),
        drop_blocks: Optional[str] = typer.Option(None, "--drop-blocks", help="--against: residual blocks ours removes "
                                                  "whole, comma-separated module names (e.g. layer1), or 'auto'."),
        strides: str = typer.Option("1", "--strides", help="--against: strides the allocator tries for the stem "
                                    "(raise_stride; 1: as built), e.g. 1,2: it keeps the one predicted to lose least."),
        stride_layer: Optional[str] = typer.Option(None, "--stride-layer", help="--against: the convolution --strides "
                                                   "applies to (default: the first with stride 1)."),
        tp_start: str = typer.Option("teacher", "--tp-start", help="--against: Torch-Pruning starts from the dense "
                                     "'teacher', or from it reshaped as 'ours' chose (stride raised, blocks dropped)."),
        workdir: Optional[Path] = typer.Option(None, "--workdir", help="--against: keep every contender's ONNX files "
                                               "(fp32 and int8, ours and Torch-Pruning's) in this folder; default: a "
                                               "temporary folder, removed at the end."),
    ) -> None:
        """Parameters, MACs, bytes on disk, latency (batch 1 and 64) and accuracy: dense vs artifact;
        then where the weights file's bytes go (values, indices, scales, biases, other, container).
        With --against torch-pruning: train (or load, --teacher) the dense --model on --data, compress it
        with jointcompress (latency target: --speedup x faster) and with Torch-Pruning pruned until its
        accuracy matches, and time both side by side (fp32 and int8, PyTorch and ONNX Runtime)."""
        from ..bench import render_breakdown, render_table
        from ..cli import console  # 140 columns where the output is no terminal: a log cut every name at 80
        _check_json_path(json_out)
        _check_mode_options(ctx, artifact_dir, against)
        if against is not None:
            options = dict(epochs=epochs, teacher_epochs=teacher_epochs, speedup=speedup, tp_steps=tp_steps,
                           runs=runs, threads=threads, select_images=select_images, train_limit=train_limit,
                           target_ms=target_ms, min_width=min_width,
                           drop_blocks=[b for b in (drop_blocks or "").split(",") if b],
                           strides=_strides(strides), stride_layer=stride_layer, tp_start=tp_start)
            result = run_against_cli(against, model, data, teacher, options, workdir)
            console.print(against_table(result))
            console.print(target_note(result["target"]))
            for note in against_notes(result):
                console.print(note)
            console.print(f"ONNX Runtime fp32 (ours and Torch-Pruning's): {result['runtimes']['ours_fp32_ort']}")
            if result["workdir"]:
                console.print(f"the contenders' ONNX files: {result['workdir']}", markup=False)
            _write_json(json_out, result)
            return
        if artifact_dir is None:
            from ..errors import JointCompressError

            raise JointCompressError("bench needs ARTIFACT_DIR (a saved artifact), or --against torch-pruning --model NAME")
        result = run_bench(artifact_dir, model, data, runs, threads, int8, inputs)
        console.print(render_table(result))
        for note in (result.get("note"), result.get("int8_note")):
            if note:
                console.print(note, markup=False)
        if not int8:
            console.print("int8 ONNX Runtime: not timed; --int8 builds the deployable int8 model from the artifact and "
                          "times it beside the others")
        if "accuracy" not in result["after"]:
            console.print("accuracy: not measured; pass --data (digits or an .npz of held-out images) to measure it")
        console.print(latency_note(result))
        if any(flag.startswith("int8 ") for flag in result.get("latency_flagged", [])):
            console.print(INT8_INTERLEAVED, markup=False)
        console.print(render_breakdown(result["breakdown"]))
        _write_json(json_out, result)


# the options only `bench --against` reads (its parameter names)
AGAINST_ONLY = ("teacher", "teacher_epochs", "epochs", "speedup", "tp_steps", "train_limit", "select_images", "target_ms",
                "min_width", "drop_blocks", "strides", "stride_layer", "tp_start", "workdir")


def _check_mode_options(ctx, artifact_dir: Optional[Path], against: Optional[str]) -> None:
    """bench's two modes take different inputs: --against with ARTIFACT_DIR trained a new comparison and never read the
    folder, and a plain bench given --speedup, --epochs or --teacher (even a file that did not exist) measured the
    artifact as if they were not there; both said nothing. Refused by name."""
    from ..errors import JointCompressError

    if against is not None and artifact_dir is not None:
        raise JointCompressError(f"bench --against {against} trains and compresses --model on --data itself; it does not "
                                 f"read ARTIFACT_DIR ({artifact_dir}). Drop {artifact_dir} to run the comparison, or "
                                 f"drop --against to measure the artifact: jointcompress bench {artifact_dir}")
    given = [f"--{name.replace('_', '-')}" for name in AGAINST_ONLY
             if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]  # typer's own click's enum
    if against is None and given:
        raise JointCompressError(f"{', '.join(given)}: read only by bench --against torch-pruning; a bench of "
                                 f"{artifact_dir or 'ARTIFACT_DIR'} measures the saved artifact as it is. Drop "
                                 f"{'them' if len(given) > 1 else 'it'}, or add --against torch-pruning --model NAME")
    if against is not None and getattr(ctx.get_parameter_source("inputs"), "name", None) == "COMMANDLINE":
        raise JointCompressError(f"--inputs: read by a bench of ARTIFACT_DIR whose manifest does not record its inputs; "
                                 f"bench --against {against} trains its dense model on --data standardised. Drop --inputs")
    if against is not None and getattr(ctx.get_parameter_source("int8"), "name", None) == "COMMANDLINE":
        raise JointCompressError(f"--int8: read by a bench of ARTIFACT_DIR; bench --against {against} times both "
                                 "contenders' int8 ONNX Runtime models already. Drop --int8")


def _strides(text: str) -> list[int]:
    """--strides "1,2" as [1, 2], or a JointCompressError naming the option."""
    from ..errors import JointCompressError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise JointCompressError(f"--strides {text!r}: give comma-separated whole numbers, e.g. 1,2") from None


def _check_json_path(path: Optional[Path]) -> None:
    """Before the benchmark: a --json that is a folder, or lies under a file, failed only after it, with the
    OS's words."""
    from ..errors import JointCompressError

    if path is not None and path.is_dir():
        raise JointCompressError(f"--json {path}: is a folder; give a file path (e.g. {path / 'bench.json'})")
    from ..io import first_existing

    above = first_existing(path.parent) if path is not None else None
    if above is not None and not above.is_dir():  # found after the benchmark, as "File exists"
        raise JointCompressError(f"--json {path}: lies under {above}, which is a file; give a path in a folder")
    if path is not None and path.exists() and not _earlier_bench_json(path):
        raise JointCompressError(f"--json {path}: exists and is not a result bench wrote (an artifact's manifest.json "
                                 "or weights file, a run's teacher, ... were replaced by the measurements); give a new "
                                 "file name")


def _earlier_bench_json(path: Path) -> bool:
    """Whether `path` holds measurements bench wrote (replaced by the new ones): a JSON object with the keys of
    either mode's result."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):  # not text, not JSON
        return False
    return isinstance(earlier, dict) and ({"before", "after", "breakdown"} <= earlier.keys()
                                          or {"target", "runtimes"} <= earlier.keys())


def _write_json(path: Optional[Path], result: dict) -> None:
    if path is not None:
        from ..io import atomic_write_text

        atomic_write_text(path, json.dumps(result, indent=2, default=float) + "\n")

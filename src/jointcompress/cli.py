"""The `jointcompress` command line (typer + rich).

Every user mistake surfaces as one clear message naming the problem and the fix, with a
non-zero exit; a traceback is shown only with --debug.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .commands import BUILT_IN_MODELS, DEVICE_HELP
from .errors import JointCompressError, RecipeError
from .io import output_folder, removed_if_refused
from .session.finalize import UNIT_KINDS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Joint pruning + quantization + distillation for PyTorch models.")
recipe_app = typer.Typer(no_args_is_help=True, help="Work with recipes.")
app.add_typer(recipe_app, name="recipe")
console = Console(width=None if sys.stdout.isatty() else 140, emoji=False)  # ":cat:" in a builder name stays text
STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")):
    STATE["debug"] = debug


def progress_bar():
    """The runs' bars. Where the output is no terminal (a log file), `tracked` prints a plain line at each tenth of a
    run instead, so the bars are not drawn there at all: rich drew them once at the end, and a demo's log showed
    every run's progress twice."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
        transient=not console.is_terminal,
    )


class SayResumed:
    """A compress() callback that says which checkpoint a --resume continues from, and at which step: a resumed run's
    output began at its bar's step, with no word that it had resumed rather than started over."""

    def on_start(self, trainer, step: int) -> None:
        last = trainer.checkpoints.last
        if step > 0 and last is not None:
            console.print(f"--resume: continuing from {last} (step {step:,} of {trainer.plan.total_steps:,})",
                          markup=False, highlight=False)


PLAIN_PROGRESS_LINES = 10  # lines a run prints as it goes where the output is no terminal (a log file)


def tracked(progress: Progress, description: str):
    """A compress() progress callback that drives one rich task; where the output is no terminal (a log file,
    Slurm), where rich draws the bar once at the end, a plain line at each tenth of the steps too: a run's log
    stayed empty until it ended. The bar appears with the first step: made at once, a run refused while it loaded
    (a transformers model that does not fit) showed "joint 0/?" above its error."""
    shown = {"tenth": 0, "task": None}

    def update(step: int, total: int) -> None:
        if shown["task"] is None:
            shown["task"] = progress.add_task(description, total=total)
        task = shown["task"]
        progress.update(task, completed=step, total=total)
        if console.is_terminal or not total:
            return
        tenth = step * PLAIN_PROGRESS_LINES // total
        if tenth > shown["tenth"]:
            shown["tenth"] = tenth
            elapsed = next(t for t in progress.tasks if t.id == task).elapsed or 0.0
            progress.console.print(f"{description}: step {step:,} of {total:,} ({elapsed:,.0f} s)", highlight=False)

    return update


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:,} B"


def results_table(title: str, rows: dict[str, dict]) -> Table:
    """One row a model. Sparsity: the share of the uncompressed model's Linear / convolution weights that
    are zero or removed (channels removed count); nonzero params: all parameters, out of the uncompressed model's
    (out of the model's as it is, a model with channels removed read 8,508 / 8,786 beside 92.3% sparsity).
    Stored: the weights file where one was written (what a size target counts and `bench` reports), else
    the stored parts' bytes; the uncompressed row, fp32 parameters and buffers."""
    table = Table(title=escape(title))  # a recipe named "[exp1] lenet" printed " lenet"
    timed = any("latency_ms_b1" in r for r in rows.values())  # latency columns only where a row was timed (demo)
    # "weight sparsity": of the Linear / conv weights, where nonzero params count biases and norms too (the two read
    # as disagreeing under one word)
    for col in ("", "accuracy", "weight sparsity", "bits", "nonzero / uncompressed params", "stored", "smaller",
                *(("ms b1", "ms b64") if timed else ()), "conflict"):
        table.add_column(col, justify="left" if col == "" else "right")
    base = rows.get("uncompressed", {}).get("bytes")
    dense = rows.get("uncompressed", {}).get("params")
    for name, r in rows.items():
        stored = r.get("file_bytes") or r.get("bytes")
        ratio = f"{base / stored:.1f}x" if base and stored else "-"
        latency = [f"{r[k]:.3f}" if k in r else "-" for k in ("latency_ms_b1", "latency_ms_b64")] if timed else []
        table.add_row(
            name,
            f"{100 * r['accuracy']:.2f}%",
            f"{100 * r.get('sparsity_of_uncompressed', r.get('sparsity', 0)):.1f}%",
            str(r.get("bits", "-")),
            f"{r.get('nonzero', 0):,} / {dense or r.get('params', 0):,}",
            _fmt_bytes(stored),
            ratio,
            *latency,
            _conflict_cell(r),
        )
    return table


FEW_CONFLICT_STEPS = 10  # a conflict rate measured on fewer steps shows their count


def _conflict_cell(row: dict) -> str:
    """The run's conflict rate, with the count of steps it rests on where that is small."""
    rate, steps = row.get("conflict_rate"), row.get("conflict_steps")
    if rate is None:
        return "-"
    return f"{rate:.2f}" + (f" ({steps} steps)" if steps and steps < FEW_CONFLICT_STEPS else "")


@app.command()
@removed_if_refused
def demo(
    out: Path = typer.Option(Path("runs/demo"), parser=output_folder, help="Where the artifacts and results.json go."),
    model: str = typer.Option("lenet5", help="Reference model: lenet5 or lenet300."),
    teacher_epochs: int = typer.Option(15, min=1, help="Epochs to train the uncompressed teacher."),
    epochs: int = typer.Option(None, min=1, help="Compression epochs (default: the demo recipe's)."),
    ratio: float = typer.Option(100.0, min=1.5, max=10000.0, help="Size target: the weights file this many times smaller than fp32."),
    force: bool = typer.Option(False, help="Write into a non-empty --out that is not an earlier demo's output."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    val_images: int = typer.Option(150, "--val-images", min=0, help="Training images held out to choose every kept "
                                   "epoch on (the teacher's too), so the test images the table reports chose nothing; "
                                   "0: choose on the test images."),
):
    """Train a teacher on the embedded digits data, compress it to one size target twice,
    sequentially (allocator budgets; prune, then quantize) and jointly (dead-zone quantizer and
    size budget trained together), build a fast model (channels removed, int8), and compare
    them side by side, measured on held-out digits."""
    from .demo import run_demo
    from .devices import resolve_device
    from .io import atomic_write_json, prepare_output_dir

    if model not in ("lenet5", "lenet300"):
        raise JointCompressError(f"--model {model!r}: the demo runs 'lenet5' or 'lenet300' (use `compress` for other models)")
    from .targets import TargetError

    where = resolve_device(device)
    out = prepare_output_dir(out, force=force or _earlier_demo(out))
    try:
        with progress_bar() as bar:
            res = run_demo(out, model=model, ratio=ratio, teacher_epochs=teacher_epochs, epochs=epochs,
                           progress=lambda name: tracked(bar, name), device=where, validation_images=val_images)
    except TargetError as err:  # it names a recipe's fields; the demo's one knob is --ratio
        raise TargetError(f"{err}. The demo has no recipe: its target is --ratio {ratio:g}; ask for a lower "
                          "--ratio") from err
    _print_demo(res, ratio)
    command = " ".join(["jointcompress", *sys.argv[sys.argv.index("demo"):]]) if "demo" in sys.argv else "jointcompress demo"
    atomic_write_json(out / "results.json", {"command": command, "rows": res.rows, "wall_seconds": res.wall_seconds,
                                             "target_bytes": res.target_bytes, "recipe": res.recipe})
    console.print(f"artifacts in {out}/sequential, {out}/joint and {out}/structured (its int8 ONNX model in {out}/structured-int8); wall time {res.wall_seconds:.0f} s",
                  markup=False)  # paths print as they are: "runs/x[/y]" was read as markup


DEMO_OUTPUTS = {"results.json", "joint", "sequential", "structured", "structured-int8",
                "report.html", "layers.csv", "layers.json"}  # and what `jointcompress report` adds


def _earlier_demo(out: Path) -> bool:
    """Whether `out` holds only what an earlier demo writes (a finished one, or one stopped halfway): the demo
    writes over its own output, as `make demo` run twice does, but not over a folder of other files."""
    try:
        return out.is_dir() and all(p.name in DEMO_OUTPUTS for p in out.iterdir())
    except OSError:
        return False


def _print_demo(res, ratio: float) -> None:
    names = {"lenet5": "LeNet-5", "lenet300": "LeNet-300-100"}
    console.print(results_table(f"jointcompress demo: {names[res.model]} on digits ({res.held_out} held-out test images; "
                                f"every kept epoch chosen on {res.selected_on}), target {ratio:g}x = "
                                f"{res.target_bytes:,.0f} B weights file", res.rows))
    for mode in ("sequential", "joint"):
        r = res.rows[mode]
        console.print(f"{mode}: weights file {r['file_bytes']:,} B ({r['file_bytes'] / res.target_bytes - 1:+.1%} of the target)")
    s, u = res.rows["structured int8"], res.rows["uncompressed"]
    kept = ", ".join(f"{n} {s['channels'][n]}/{c}" for n, c in s["dense_channels"].items())
    console.print(f"structured int8: channels kept {kept}; {u['latency_ms_b64'] / s['latency_ms_b64']:.1f}x faster than "
                  f"the uncompressed model at batch 64, {u['latency_ms_b1'] / s['latency_ms_b1']:.1f}x at batch 1 "
                  f"(fp32 before int8: {100 * s['fp32_accuracy']:.2f}%)")
    console.print(
        "sequential: allocator budgets, prune -> fine-tune -> quantize -> fine-tune; joint: what mode: joint trains under a "
        "size target, zero as a quantizer level under one size budget, pcgrad between accuracy (task + distillation) and "
        "size (docs/joint.md); structured int8: "
        "75% of channels removed, 8-bit LSQ, int8 ONNX Runtime on the trained scales. Same teacher, epochs and distillation. "
        "stored = the weights file's payload; latency = median CPU forward, 1 thread for every model, interleaved "
        "(ONNX Runtime spinning off); conflict = mean share of gradient pairs pointing against each other."
    )


COMPRESS_OUT = Path("runs/compress")  # compress --out's default


@app.command("compress")
@removed_if_refused
def compress_cmd(
    recipe_path: Path = typer.Argument(..., help="Recipe YAML."),
    model: Optional[str] = typer.Option(None, help=f"Reference model ({BUILT_IN_MODELS.replace(' |', ',')}) or your builder "
                                        "(package.module:function, file.py:function); default: the recipe's."),
    data: Optional[str] = typer.Option(None, help="'digits' or a path to an .npz of images (MNIST-style, grayscale or colour); for a recipe with an hf: section, a folder of train and dev files (docs/transformers.md); default: the recipe's."),
    weights: Optional[Path] = typer.Option(None, help="Trained weights (.safetensors, or a torch file read with weights_only), or a saved artifact directory (e.g. a first run's model with channels removed); for a recipe with an hf: section, the fine-tuned transformers model's folder (config.json, weights, tokenizer); default: train the model first."),
    teacher_epochs: int = typer.Option(10, min=1, help="Epochs to train the model when no --weights are given."),
    mode: Optional[str] = typer.Option(None, help="Override the recipe's mode: joint, overlap or sequential."),
    precision: Optional[str] = typer.Option(None, help="Override training.precision: fp32, bf16 or fp16 (the training "
                                            "forward in 16-bit autocast; weights, evaluation and the artifact stay fp32)."),
    out: Path = typer.Option(COMPRESS_OUT, parser=output_folder,
                             help="Output directory (artifact, history, summary, checkpoints)."),
    force: bool = typer.Option(False, help="Allow writing into an existing, non-empty output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last complete checkpoint."),
    checkpoint_every: int = typer.Option(100, min=1, help="Steps between checkpoints (one is also written at every evaluation)."),
    max_nonfinite: int = typer.Option(3, min=1, help="Non-finite steps (each skipped and rolled back, LR halved) before giving up."),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Also log every loss term and the conflict rate to this TensorBoard directory."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
):
    """Run a recipe: compress the model, finalize it, save the artifact, report the numbers.

    Checkpoints go to OUT/checkpoints; after a crash or a kill, the same command with --resume
    continues where the last checkpoint left off. Under `torchrun --nproc_per_node=N` the run
    is data-parallel and only rank 0 writes.
    """
    import warnings

    from .devices import resolve_device
    from .distributed import init_from_env, quiet_other_ranks
    from .io import check_folder_path, finished_run, prepare_run_dir, say_finished
    from .models import absolute_builder
    from .pipeline import builder_for, check_given_model_inputs, compress_and_save, load_split, load_start
    from .recipe import CompressesNothing, compresses_nothing, load_recipe
    from .tensorboard import TensorBoardLogger

    check_folder_path(tensorboard, "--tensorboard")  # else found only after training
    if resume and force:  # as compare refuses them: one flag was read, the other dropped without a word
        raise JointCompressError("--resume and --force: --resume continues the run in --out, --force starts it over "
                                 "(clearing its checkpoints and results); give one")

    for flag, value in (("--model", model), ("--mode", mode), ("--precision", precision)):
        if value is not None and not value.strip():  # a shell variable left empty fell back to the recipe's value
            raise JointCompressError(f"{flag} is empty; give a value, or leave the flag out for the recipe's")
    recipe = _overridden(load_recipe(recipe_path), mode=mode, precision=precision)
    if recipe.techniques:  # empty: compress() and prepare() say it; distillation alone only here (a copy's student)
        reason = compresses_nothing(recipe, student_is_copy=True)
        if reason is not None:
            warnings.warn(reason, CompressesNothing, stacklevel=1)
    flags = {"--model": model, "--data": data, "--mode": mode, "--precision": precision}  # what recipe.yaml records
    if recipe.hf is not None or (model or recipe.model or "").startswith("hf:"):  # Hugging Face text classification
        from .hf.pipeline import cli_compress

        resolve_device(device)  # a device this machine lacks is refused before the teacher loads
        if model:
            _check_hf_model_flag(model, weights, recipe_path)
            recipe = recipe.model_copy(update={"model": model})
        cli_compress(recipe, recipe_path, out=out, data=data, weights=weights, force=force, resume=resume,
                     checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite, console=console,
                     progress_bar=progress_bar, tracked=tracked, device=device, flags=flags)
        return
    model_name = model or recipe.model
    if not model_name:
        raise JointCompressError(f"{recipe_path}: no model given; set `model:` in the recipe or pass --model")
    model_name = absolute_builder(model_name)  # the manifest records it: bench finds the file from anywhere
    recipe = recipe.model_copy(update={"model": model_name})
    _check_cli_metric(recipe, recipe_path)
    resolve_device(device)  # a device this machine lacks is refused before the data loads
    if data is None:
        _refuse_data_only_beside_the_recipe(recipe.data, recipe_path)
    dist = init_from_env()
    quiet_other_ranks(dist)  # before the data loads: its warnings were said once per rank
    split = load_split(recipe, data)
    where = resolve_device(device)  # after joining the group: under torchrun, `cuda` is the rank's own GPU
    main_rank = dist is None or dist.is_main
    builder = builder_for(model_name, split)  # what refuses the run is found before --force clears --out
    given_model = load_start(builder, weights) if weights else None
    if given_model is not None and main_rank:
        check_given_model_inputs(given_model, split, data if data is not None else recipe.data, recipe.inputs, weights)
    if not resume:  # on the given weights too: skipped there, --force cleared a finished run for a refused recipe
        _refuse_before_training(builder if given_model is None else (lambda: copy.deepcopy(given_model)), recipe,
                                split, timed=dist is None, given=given_model is not None)
    out = prepare_run_dir(out, force=force, resume=resume, dist=dist, reads={"--weights": weights, "the recipe": recipe_path})
    with progress_bar() as bar:
        show = (lambda d: tracked(bar, d)) if main_rank else (lambda d: None)
        teacher = _model_to_compress(builder, model_name, split, recipe, out, weights=weights, given_model=given_model,
                                     resume=resume,
                                     teacher_epochs=teacher_epochs, save=main_rank, progress=show, device=where,
                                     data_given=str(data if data is not None else recipe.data))
        if resume and finished_run(out):  # after the checks of what the run began from
            if main_rank:
                say_finished(out, console, "artifact", recipe)
            return
        callbacks = [TensorBoardLogger(tensorboard)] if tensorboard and main_rank else []
        callbacks += [SayResumed()] if resume and main_rank else []
        if recipe.target is not None and recipe.target.is_latency and not resume and main_rank:
            # minutes at a large batch, under a progress line at 0/?: it read as a run that had hung
            console.print(f"latency target: timing per-layer latency tables at batch {recipe.target.batch} to allocate "
                          "the channels' widths, before the first step (longer at large batches)")
        try:
            outcome = compress_and_save(
                "artifact", teacher, recipe, split, builder, out if main_rank else None, progress=show(recipe.mode),
                callbacks=callbacks, run_dir=out, resume=resume, checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite,
                device=where,
            )
        except JointCompressError as err:
            _name_the_trained_model(err, out, given=weights is not None)
            raise
        finally:
            for cb in callbacks:
                if hasattr(cb, "close"):  # the TensorBoard writer's event files
                    cb.close()
    if main_rank:
        _write_compress_results(out, recipe_path, recipe, teacher, outcome, split, model_name, given=weights is not None,
                                flags=flags)


def _refuse_data_only_beside_the_recipe(data: str | None, recipe_path: Path) -> None:
    """A recipe's relative `data:` is read from the folder the command runs in; one found only beside the recipe
    was refused as not found, with no word of where it is."""
    if not data or data == "digits" or Path(data).is_absolute() or Path(data).exists():
        return
    beside = recipe_path.parent / data
    if beside.exists():
        from .errors import DataError

        raise DataError(f"data: {data} is not in the folder the command runs in ({Path.cwd()}), and {beside} is: a "
                        f"recipe's relative paths are read from the current folder. Run from {recipe_path.parent}, "
                        f"pass --data {beside}, or write the path from here (or an absolute one) in the recipe")


def _overridden(recipe, *, mode: str | None, precision: str | None):
    """The recipe with the command line's --mode and --precision, re-parsed from the fields the file set, not
    every default: a default written out reads as asked for (a sparsity beside a size target, which the
    target's checks then weigh)."""
    from .recipe import parse_recipe, without_quant_start

    given = recipe.model_dump(exclude_unset=True)
    if mode:
        given = without_quant_start(given) if mode == "sequential" else given
        recipe = parse_recipe({**given, "mode": mode}, source=f"--mode {mode}")
        given = recipe.model_dump(exclude_unset=True)
    if precision:
        recipe = parse_recipe({**given, "training": {**given.get("training", {}), "precision": precision}},
                              source=f"--precision {precision}")
    return recipe


def _model_to_compress(builder, model_name, split, recipe, out: Path, *, weights, resume: bool, teacher_epochs: int,
                       save: bool, progress, device=None, data_given: str | None = None, given_model=None):
    """--weights (`given_model`: read from them) when given; else the model a resumed run trained first; else one
    trained now and saved (by the
    writing rank) so that --resume does not train it again. start.json, which records what the run began from,
    is written before the trained model's file and checked on every --resume, whichever way the model came."""
    from .io import atomic_write_bytes
    from .pipeline import load_start, train_teacher

    teacher_file, start_file = out / "teacher.safetensors", out / "start.json"
    earlier = _earlier_start(start_file, teacher_file, builder) if resume else None
    if earlier is not None and earlier["weights"] and not weights:
        raise JointCompressError(f"--resume: the run in {out} began from --weights {earlier['weights']}; pass it again")
    if earlier is not None and not weights:  # before the model is trained again, if it must be
        _same_hold_out(start_file, earlier, recipe.training.validation_images)
        _same_teacher_epochs(start_file, earlier, teacher_epochs)
    reloaded = not weights and resume and teacher_file.is_file()
    if weights:
        teacher = given_model if given_model is not None else load_start(builder, weights)
    elif reloaded:
        try:
            teacher = _trained_before(builder, teacher_file)
        except JointCompressError:
            if earlier is not None:  # a flag changed, not the builder: said by the flag (a renamed file is no change)
                _same_model_and_data(start_file, earlier, model_name, data_given or split.name)
            raise
    else:
        teacher = train_teacher(model_name, split, teacher_epochs, lr=recipe.training.lr, progress=progress("train model"),
                                device=device)
    _same_start(start_file, earlier, teacher, weights, save, recipe.training.validation_images, teacher_epochs,
                teacher_file if reloaded else None, named={"model": model_name, "data": data_given or split.name})
    _same_outputs(start_file, earlier, teacher, split.x_train[:PROBE_ROWS], save)
    _same_evaluation_data(start_file, earlier, split, save)
    if save and not weights and not teacher_file.is_file():
        from safetensors.torch import save as st_save

        atomic_write_bytes(teacher_file, st_save({k: v.contiguous() for k, v in teacher.state_dict().items()}))
    return teacher


def _refuse_before_training(builder, recipe, split, timed: bool = True, said: list[str] | None = None,
                            given: bool = False) -> None:
    """What the run would refuse after training the model first (an hour, for some models), checked on the
    untrained model: a recipe whose techniques select no layer of it (targets: ['conv*'] on an MLP), inputs it
    cannot take, and a size target out of reach. mode: joint under a size target refuses a target the bytes no
    decision moves already exceed when its budget sets up; those bytes (normalization layers, step sizes, biases,
    tensors no technique compresses) hardly depend on the trained values (its constant normalization layers code
    a little smaller: it refuses what the run would refuse, or a target within bytes of it). A recipe the session
    can run (no target, or the joint form's) sets up in full, as prepare() would. `timed`: a latency target's
    narrowest model is timed too (not under torchrun: each rank would time its own, and a rank that refused
    alone would leave the others waiting; the allocation, timed on rank 0 and sent to all, refuses it there).
    `said`: where the setup's warnings go (validate prints them; a run says them itself, so they are dropped),
    except a latency target's, set up on a stand-in. `given`: the builder returns the model of --weights."""
    import warnings

    from .api import check_data, check_targets, validation_held_out
    from .session.prepare import prepare
    from .targets import NOTHING_COMPRESSED, NOTHING_TRAINED
    from .training.micro_batches import check_parts

    latency = recipe.target is not None and recipe.target.is_latency
    note = NOTHING_COMPRESSED if given else NOTHING_TRAINED  # said under a refusal
    model = builder()
    check_data(model, split.x_train[:2], (split.x_train, split.y_train))  # named as the data, as the run names it
    check_parts(model, recipe.training)  # one sample a part under BatchNorm: refused after the teacher trained
    steps = max(1, len(split.x_train) // recipe.training.batch_size) * recipe.training.epochs
    with warnings.catch_warnings(record=True) as caught, validation_held_out():  # the run holds them out
        warnings.simplefilter("always" if said is not None and not latency else "ignore")
        try:
            if recipe.target is not None and not latency and recipe.mode != "joint":
                check_targets(model, recipe)  # the allocator's budgets come later, on the trained model
            else:  # a latency target's channels are allocated later (timed): set up with a stand-in sparsity
                prepare(model, _latency_stand_in(recipe) if latency else recipe, total_steps=steps,
                        example_inputs=split.x_train[:2], teacher=copy.deepcopy(model), distributed=False)
        except JointCompressError as err:
            err = _latency_target_without_channels(recipe, err)
            err.add_note(note)
            raise err from None
    if said is not None:
        said.extend(m for m in dict.fromkeys(str(w.message) for w in caught) if m not in said)
    if (recipe.has_size_target() and recipe.mode != "joint") or (latency and timed):
        _refuse_an_unplannable_target(builder(), recipe, split, note)
    if latency and timed and said is not None:  # validate: what the allocation would warn, the run says itself
        from .latency_targets import met_uncut_before_training

        uncut = met_uncut_before_training(builder(), recipe, split.x_train[:2])
        if uncut is not None and uncut not in said:
            said.append(uncut)


def _latency_target_without_channels(recipe, err: JointCompressError) -> JointCompressError:
    """A latency target on a model with no channel group to remove was refused as prune_structured's, a technique the
    recipe never named (the target adds it): said as the target's. Any other error as it is."""
    from .techniques.prune_structured import NoChannelGroupError
    from .targets import TargetError

    target = recipe.target
    if not isinstance(err, NoChannelGroupError) or target is None or not target.is_latency or any(
            t.type == "prune_structured" for t in recipe.techniques):
        return err
    asked = f"target.speedup: {target.speedup:g}x" if target.speedup is not None else f"target.latency_ms: {target.latency_ms}"
    skipped = err.skipped
    detail = "; ".join(f"{name}: {why}" for name, why in skipped[:4]) + (f"; ... ({len(skipped)} in all)"
                                                                         if len(skipped) > 4 else "")
    return TargetError(f"{asked} at batch {target.batch} cannot be met: a latency target removes channels, and this "
                       f"model has no channel group that may lose any ({detail}). Remove the target (quant_lsq and "
                       "distillation still shrink the file), or make channel groups prunable (`jointcompress dry-run` "
                       "gives every layer's reason)")


def _latency_stand_in(recipe):
    """The recipe a latency target's run sets up, before its allocation has timed the channels' widths: no target,
    prune_structured (added where the recipe lacks it, as the allocation adds it) at half its channels where it
    names no sparsity. What the setup refuses (no channel group, a stride the model cannot take, blocks that are
    not residual) does not depend on the widths; it was found after the model had trained."""
    from .recipe import parse_recipe

    data = recipe.model_dump()
    data["target"] = None
    channels = next((t for t in data["techniques"] if t["type"] == "prune_structured"), None)
    if channels is None:
        channels = {"type": "prune_structured"}
        data["techniques"].append(channels)
    if channels.get("sparsity") is None and not channels.get("layer_sparsity"):
        channels["sparsity"] = 0.5
    return parse_recipe(data, source="the recipe, before its latency allocation")


def _refuse_an_unplannable_target(model, recipe, split, note: str) -> None:
    """Sequential and overlap: the allocator refuses a target under the smallest file it can plan on the trained
    model, after training it; a latency target's allocation one the narrowest model misses, timed. Both are
    checked first on the untrained model (targets.refusal_before_training). `note`: said under the refusal."""
    from .targets import refusal_before_training

    refusal = refusal_before_training(model, recipe, split.x_train[:2])
    if refusal is not None:
        refusal.add_note(note)
        raise refusal


def _name_the_trained_model(err: JointCompressError, out: Path, given: bool) -> None:
    """A run that stops after training the model first (a target out of reach is found then): that model is
    in OUT/teacher.safetensors, and the next run can start from it rather than train it again (an hour, for
    some models). Said as a note under the error."""
    teacher_file = out / "teacher.safetensors"
    if not given and teacher_file.is_file():
        err.add_note(f"The model this run trained before compressing it is kept: give --weights {teacher_file} to "
                     "the next run to start from it instead of training it again (with another --out: --force on "
                     "this one would clear it).")


def _trained_before(builder, teacher_file: Path):
    """The model this run trained first (OUT/teacher.safetensors, written by the run): a damaged one is
    retrained once deleted, and start.json still checks that the run continues from the same model."""
    from .errors import ArtifactError
    from .pipeline import load_weights

    try:
        return load_weights(builder(), teacher_file)
    except ArtifactError as err:  # not the advice for a file of the user's: this run wrote it
        why = str(err).split(": ", 1)[-1].split(";")[0].removeprefix("cannot be read as weights ").strip("()")
        if "do not fit" in str(err):  # whole, but the builder makes another model now
            raise ArtifactError(f"{teacher_file}: the model this run trained before compressing it does not fit the "
                                f"model the builder makes now ({why}): the builder changed since the run began; set it "
                                "back to --resume, or start over with --force") from None
        raise ArtifactError(f"{teacher_file}: the model this run trained before compressing it cannot be used ({why}); "
                            "delete the file and --resume trains it again (start.json checks that it is the same "
                            "model), or start over with --force") from None


def _earlier_start(start_file: Path, teacher_file: Path, builder) -> dict | None:
    """What the run in OUT began from: start.json (a damaged one refused, naming it: its fields were read as they
    were, and the resume ended in a KeyError), else (a run killed between the trained model's file and
    start.json, by a version that wrote them in that order) the trained model's file."""
    try:
        text = start_file.read_text()
    except OSError:
        text = None
    if text is not None:
        try:
            earlier = json.loads(text)
        except ValueError:
            earlier = None
        if not (isinstance(earlier, dict) and {"weights", "state_sha256"} <= set(earlier)):
            raise JointCompressError(
                f"--resume: {start_file} is damaged (not the record a run writes of what it began from); delete it, "
                f"and the same command resumes from the model the run trained ({teacher_file.name}), unchecked against "
                "the start, or start over with --force")
        return earlier
    if teacher_file.is_file():
        from .checkpoint import state_digest

        return {"weights": None, "state_sha256": state_digest(_trained_before(builder, teacher_file))}
    return None


def _same_start(start_file: Path, earlier: dict | None, teacher, weights, save: bool, held_out: int = 0,
                teacher_epochs: int | None = None, reloaded_from: Path | None = None, named: dict | None = None) -> None:
    """Record which weights the run compresses (start.json: the path and a digest of the state); a resumed
    run given other --weights is refused: it compressed the new model from the old one's checkpoint, and the
    summary then reported the new model as the uncompressed one. A model the run trained itself also records
    the training images it held out (`held_out`, training.validation_images): resumed with another count, it
    would reuse a model that trained on rows now held out to choose on."""
    from .checkpoint import state_digest
    from .io import atomic_write_json

    start = {"weights": str(weights) if weights else None, "state_sha256": state_digest(teacher), **(named or {})}
    if not weights:
        start["validation_images"], start["teacher_epochs"] = held_out, teacher_epochs
    if earlier is not None and earlier.get("state_sha256") != start["state_sha256"]:
        began = earlier.get("weights") or "the model it trained first"
        if weights:
            now = f"--weights {weights} holds other weights; pass the weights it began from"
        elif reloaded_from is not None:  # nothing was trained again: the file's bytes changed since it was written
            now = (f"{reloaded_from.name} no longer holds it (damaged after it was written); delete the file and "
                   "--resume trains it again")
        else:
            now = ("the model trained again differs from it (the builder's code changed since, or training is not "
                   "repeatable here); set the builder back and pass that model as --weights")
        raise JointCompressError(f"--resume: the run in {start_file.parent} began from {began}, and {now}, or start "
                                 "over with --force")
    if save and not start_file.is_file():
        atomic_write_json(start_file, start)


PROBE_ROWS = 8  # training rows whose outputs start.json records, to tell a builder whose code changed


def _same_outputs(start_file: Path, earlier: dict | None, model, rows, save: bool) -> None:
    """The model's outputs on the first training rows, recorded in start.json and compared on --resume: a
    builder whose code changed without changing a shape (ReLU to GELU) loads the same weights, so the
    digest matched, and the run resumed into a model trained half one way and half the other, without a word."""
    import torch

    from .io import atomic_write_json
    from .model_call import call_model, evaluating
    from .session.outputs import logits_of

    with evaluating(model), torch.no_grad():
        outputs = logits_of(call_model(model, rows)).float().cpu()
    from .data import fingerprint, same_fingerprint

    rows_print = fingerprint([rows])
    before = (earlier or {}).get("probe_outputs")
    if before is not None:
        recorded_rows = earlier.get("probe_rows")  # absent from a start.json of an earlier version
        if recorded_rows is not None and not same_fingerprint(recorded_rows, rows_print):
            raise JointCompressError(
                f"--resume: the first {len(rows)} training images differ from those the run in {start_file.parent} "
                "began with: this is other training data. Pass the --data the run began with to continue it, or start "
                "over with --force")
        recorded = torch.tensor(before)
        gap = float((recorded - outputs).abs().max()) if recorded.shape == outputs.shape else float("inf")
        if gap > 1e-3 * max(1.0, float(recorded.abs().max())):
            cause = ("the builder's code changed since" if recorded_rows is not None
                     else "the builder's code or the training data (--data) changed since")
            raise JointCompressError(
                f"--resume: the model the run in {start_file.parent} began from gives other outputs on its first "
                f"{len(rows)} training rows than when the run began (by {gap:.3g}), with the same weights: "
                f"{cause}. Set it back to continue, or start over with --force")
    elif save and start_file.is_file():  # recorded once, beside what _same_start wrote
        start = json.loads(start_file.read_text())
        if "probe_outputs" not in start:
            atomic_write_json(start_file, {**start, "probe_outputs": outputs.tolist(), "probe_rows": rows_print})


def _same_evaluation_data(start_file: Path, earlier: dict | None, split, save: bool) -> None:
    """The images a run evaluates on (the test split, and the held-out rows it chooses on), recorded in start.json
    and compared on --resume: resumed with another test split, the history mixed epochs read on two sets, the
    kept epoch was chosen across them, and the summary's uncompressed row moved, without a word."""
    from .data import fingerprint, same_fingerprint
    from .io import atomic_write_json

    now = fingerprint([split.x_test, split.y_test, split.x_val, split.y_val])
    before = (earlier or {}).get("evaluation_data")  # absent from a start.json of an earlier version
    if before is not None and not same_fingerprint(before, now):
        raise JointCompressError(
            f"--resume: the images the run in {start_file.parent} evaluates on (the data's test split, and the training "
            "images it holds out to choose on) differ from those it began with; its epochs would be read on two sets. "
            "Pass the --data it began with to continue it, or start over with --force")
    if save and start_file.is_file():
        start = json.loads(start_file.read_text())
        if "evaluation_data" not in start:
            atomic_write_json(start_file, {**start, "evaluation_data": now})


def _same_teacher_epochs(start_file: Path, earlier: dict, teacher_epochs: int) -> None:
    """A resumed run reuses the model it trained first: --teacher-epochs changed since was ignored without a word
    (start.json of an earlier version does not record it: not checked)."""
    before = earlier.get("teacher_epochs")
    if before is not None and before != teacher_epochs:
        raise JointCompressError(f"--resume: the run in {start_file.parent} trained its model for --teacher-epochs "
                                 f"{before}, and this command asks for {teacher_epochs}; pass --teacher-epochs {before} "
                                 "to continue it, or start over with --force")


def _same_model_and_data(start_file: Path, earlier: dict, model_name: str, data_name: str) -> None:
    """--model and --data as the run began (start.json records them), asked where the model the run trained no
    longer fits: the refusal blamed a builder that "changed since the run began", when a flag had."""
    for flag, key, now in (("--model", "model", model_name), ("--data", "data", data_name)):
        before = earlier.get(key)  # absent from a start.json of an earlier version
        if before is not None and before != now:
            raise JointCompressError(f"--resume: the run in {start_file.parent} began with {key} {before}, and this "
                                     f"command gives {key} {now} ({flag}, or the recipe's `{key}:`); give {before} again "
                                     "to continue it, or start over with --force")


def _same_hold_out(start_file: Path, earlier: dict, held_out: int) -> None:
    """A model the run trained itself trained without its held-out rows (start.json records how many): resumed
    with another count, it would be reused though it trained on rows now held out to choose on."""
    before = earlier.get("validation_images", 0)
    if before != held_out:
        raise JointCompressError(f"--resume: the run in {start_file.parent} trained its model with "
                                 f"training.validation_images: {before}, and the recipe now holds out {held_out}; "
                                 f"set it back to {before}, or start over with --force")


def _on_disk(artifact: Path, dense_bytes: int) -> str:
    """The folder's bytes beside the weights file's, which the table's bytes and ratio count: a model of many small
    layers has a manifest (each tensor's name, shape and codec) larger than its weights (a small MobileNetV2 at 20x:
    54 KB of weights, 115 KB of manifest), and a user shipping the folder ships both."""
    from .artifact.store import MANIFEST_FILE, file_sizes

    if not (artifact / MANIFEST_FILE).is_file():
        return ""
    sizes = file_sizes(artifact)
    total = sizes["weights_file"] + sizes["manifest"]
    return (f" (the weights file {sizes['weights_file']:,} B, the table's stored parts and its container; with its "
            f"manifest {total:,} B, {dense_bytes / total:.1f}x the uncompressed fp32 weights)")


def _write_compress_results(out: Path, recipe_path: Path, recipe, teacher, outcome, split, model_name: str,
                            given: bool = False, flags: dict | None = None) -> None:
    """The results table, history.json, summary.json and recipe.yaml of a finished run, and its targets' verdicts;
    `flags`: the command line's overrides of the recipe file (recipe.yaml records the recipe with them)."""
    from .io import atomic_write_json, atomic_write_text
    from .pipeline import uncompressed_row
    from .recipe import recipe_as_run

    result, row = outcome.result, outcome.row
    rows = {"uncompressed": uncompressed_row(teacher, split), recipe.mode: row}
    console.print(results_table(f"{recipe.name} ({model_name} on {split.name})", rows))
    latency = None
    if recipe.target is not None and recipe.target.is_latency:  # the resolved recipe no longer holds it
        from .latency_targets import latency_against_target

        latency = latency_against_target(teacher, outcome.model, result.example_inputs, recipe.target)
        asked = recipe.target.model_dump(exclude_none=True,  # without the size-only fields
                                         exclude={"allocated", "steer", "allocator", "refit_on_rounding"})
        allocated = next((e for e in result.history.events if e.get("event") == "latency_allocation"), None)
        if allocated is not None:  # the goal the widths were chosen for, beside the final check's goal_ms
            latency["allocation_goal_ms"] = allocated["goal_ms"]
            if "uncompressed_ms" in allocated:
                latency["allocation_uncompressed_ms"] = allocated["uncompressed_ms"]
        row["latency_target"] = {"asked": asked, **latency}
    atomic_write_json(out / "history.json", result.history.as_dict())
    atomic_write_json(out / "summary.json", rows)
    atomic_write_text(out / "recipe.yaml", recipe_as_run(recipe_path, recipe, flags or {}))
    console.print(f"artifact in {out / 'artifact'}{_on_disk(out / 'artifact', rows['uncompressed']['bytes'])}", markup=False)
    if split.standardisation is not None:
        console.print(_standardisation_line(split, recipe.inputs))
    if result.history.best_epoch is not None:  # which evaluation chose the state the run ended with
        console.print(_kept_epoch_line(result.history.best_epoch, recipe.training.keep, split, given))
    joint_form = next((e for e in result.history.events if e.get("event") == "joint_form"), None)
    if joint_form is not None:
        console.print("joint under a size target: zero as a quantizer level (quant_lsq.zero_level) under one size budget "
                      "(size_budget), in place of masks and the allocator's budgets; the resolved recipe is in the artifact's "
                      "manifest (docs/joint.md; mode: overlap keeps masks and LSQ under the allocator's budgets)"
                      + ("; " + NONZERO_GRID_NOTE if joint_form.get("nonzero_grid") else ""))
    target = result.recipe.target
    if target is not None and not target.is_latency and row.get("file_bytes"):
        from .targets import target_bytes

        goal = target_bytes(teacher, target)
        console.print(f"size target: {goal / 1024:.2f} KiB weights file; on disk {row['file_bytes'] / 1024:.2f} KiB "
                      f"({100 * (row['file_bytes'] / goal - 1):+.1f}%){_not_faster(result.recipe, teacher)}")
    if latency is not None:
        console.print(_latency_line(latency, recipe.target))
    for line in (_accuracy_fall(rows["uncompressed"], row, recipe), _at_chance(rows["uncompressed"], split)):
        if line:
            console.print(line)


# the techniques that change a model's shapes (its MACs), so that it runs faster on any hardware
RESHAPING = ("prune_structured", "prune_blocks", "raise_stride", *UNIT_KINDS)


def _not_faster(recipe, uncompressed) -> str:
    """A size target without a technique that removes channels or blocks stores fewer bytes, and the model runs as
    fast as before (every layer keeps its shape): a ResNet-18 at 30x read 1.00x at batch 64 in bench, and nothing in
    compress's closing lines had said so to a user who wanted it smaller and faster. Not said of a second run on a
    first run's artifact whose channels or blocks are gone already (its recorded structure)."""
    from .spec import PRIOR_STRUCTURE

    if any(t.type in RESHAPING for t in recipe.techniques) or getattr(uncompressed, PRIOR_STRUCTURE, None):
        return ""
    return ("; the file is smaller, the model no faster (its layers keep their shapes): for speed add "
            "prune_structured, or run again from this artifact (--weights OUT/artifact) with target: {speedup: N}")


# what the joint form's choice of the nonzero grid at 2 bits is said as (compress's closing lines, recipe validate)
NONZERO_GRID_NOTE = ("at 2 bits its kept weights are plus or minus 1 or 2 steps (quant_lsq.nonzero_grid, the joint "
                     "form's choice there; nonzero_grid: false in the recipe keeps plus or minus 1 only)")


# accuracy points a compressed model may lose against the uncompressed one before the command says so
FALL_NOTE_POINTS = 10.0


def _accuracy_fall(uncompressed: dict, row: dict, recipe) -> str:
    """A line where the compressed model lost FALL_NOTE_POINTS or more of the uncompressed model's accuracy: probes'
    models ended at chance (97% to 28%, 81% to 9%) with exit 0 and no word but a size warning."""
    before, after = uncompressed.get("accuracy"), row.get("accuracy")
    if before is None or after is None or 100 * (before - after) < FALL_NOTE_POINTS:
        return ""
    target = recipe.target
    what = ("lower sparsities or more bits" if target is None
            else "a lower target.speedup" if getattr(target, "speedup", None) is not None
            else "a larger target.latency_ms" if target.is_latency
            else "a lower target.ratio (or a larger target.size_kb)")
    return (f"[yellow]accuracy fell from {100 * before:.2f}% to {100 * after:.2f}%[/yellow] ({100 * (before - after):.1f} "
            f"points): the compression leaves too little for {recipe.training.epochs} epochs of training; give more "
            f"training.epochs, or {what}")


def _at_chance(uncompressed: dict, split) -> str:
    """A line where the uncompressed model reads about chance: a model the run trained first diverged (training.lr
    10: losses of 8e5, finite, so no non-finite guard fired) and was compressed anyway, with exit 0 and no word,
    since the compressed model lost nothing against it."""
    accuracy, classes = uncompressed.get("accuracy"), int(split.y_train.max()) + 1 if len(split.y_train) else 0
    if accuracy is None or classes < 2 or accuracy > 1 / classes + 0.05:
        return ""
    return (f"[yellow]the uncompressed model reads {100 * accuracy:.2f}%, about chance for {classes} classes[/yellow]: "
            "there was nothing to keep. Where this run trained it (no --weights), its training did not learn: too "
            "few epochs (a larger --teacher-epochs), a rate that diverged (a lower training.lr), or labels that do not "
            "match the inputs; where --weights gave it, check that file")


def _standardisation_line(split, inputs: str = "standardised") -> str:
    """What the model takes, in the recipe's `inputs` form: the data it trained on was made so, and so must be every
    input it is given (under `inputs: as_stored` this line said the values were standardised, and a user who
    followed it fed the model inputs it was not trained on)."""
    record = split.standardisation
    tail = ": the manifest's input_standardisation; jointcompress.data.standardised(x, it) applies it"
    if inputs == "as_stored":
        return f"inputs: the model takes the data file's values as stored (inputs: as_stored){tail}"
    if inputs == "unit_range":
        return f"inputs: the model takes the data file's values / {record['std'][0]:g} (inputs: unit_range){tail}"
    per = {"all": "over all values", "channel": "per channel", "feature": "per feature"}[record["per"]]
    shown = (f"{record['mean'][0]:.4g} and {record['std'][0]:.4g}" if len(record["mean"]) == 1
             else f"{len(record['mean'])} of each")
    return (f"inputs: the model takes (x - mean) / std of the data file's values, with the training split's mean and "
            f"std {per} ({shown}){tail}")


def _kept_epoch_line(epoch: int, keep: str, split, given: bool = False) -> str:
    """Which epoch the run ended with, and which data chose it (none for training.keep: last). `given`: the
    model came from --weights, which may have trained on the rows held out here."""
    if keep == "last":
        return f"kept epoch {epoch}: the last at the target (training.keep: last); the table's accuracy is on the test split"
    hint = "" if split.x_val is not None else " (training.validation_images holds training images out to choose on instead)"
    if split.x_val is not None and given:
        hint = " (held out here; the --weights model may have trained on them)"
    return (f"kept epoch {epoch}: the best at the target, chosen on {split.selected_on}; the table's accuracy is on the "
            f"test split{hint}")


def _latency_line(r: dict, target) -> str:
    """The finished model against its latency target (latency_targets.latency_against_target's `r`)."""
    from .deploy.timing import on_machine

    ms, alone = r["interleaved_ms"], r["alone_ms"]
    asked = f"{target.speedup:g}x faster" if target.speedup is not None else f"{target.latency_ms:g} ms"
    return (f"latency target: {asked} at batch {r['batch']} ({r['goal_ms']:.3f} ms); measured {ms['compressed']:.3f} ms "
            f"against {ms['uncompressed']:.3f} ms uncompressed ({r['speedup']:.2f}x; alone {alone['compressed']:.3f} / "
            f"{alone['uncompressed']:.3f} ms), PyTorch fp32, {r['threads']} thread(s){on_machine(r.get('machine'))}: "
            + ("met" if r["met"] else "[yellow]not met[/yellow]")
            + (f" [yellow]({r['note']})[/yellow]" if r.get("note") else "")
            + _allocation_goal_note(r)
            + (f" [yellow](interleaved and alone differ by more than 20% for {', '.join(r['flagged'])}: "
               "the machine is busy)[/yellow]" if r["flagged"] else ""))


def _allocation_goal_note(r: dict) -> str:
    """Where the goal the widths were chosen for differs from the final check's by more than 10%: a speed-up's goal is a
    reading of the uncompressed model / speedup, read once before training and again at the end, and a run on a busy
    machine said "not met" against a goal a quarter lower than the one its allocation met, without a word."""
    goal, before = r.get("allocation_goal_ms"), r.get("allocation_uncompressed_ms")
    if goal is None or abs(goal / r["goal_ms"] - 1) <= 0.1:
        return ""
    read = (f": the uncompressed model read {before:.3f} ms when the widths were chosen, "
            f"{r['interleaved_ms']['uncompressed']:.3f} ms now (the machine's load moved)" if before is not None else "")
    return f" [yellow](the widths were chosen for {goal:.3f} ms{read})[/yellow]"


def _check_cli_metric(recipe, recipe_path) -> None:
    """An image recipe on the command line is measured by accuracy on the data's test split; another
    training.metric was found only after the teacher and a compression epoch had trained."""
    if recipe.hf is None and recipe.training.metric != "accuracy":
        raise JointCompressError(f"{recipe_path}: training.metric {recipe.training.metric!r}: the command line measures "
                                 "'accuracy' on the data's test split; remove training.metric (or set it to accuracy)")


@recipe_app.command("validate")
def recipe_validate(recipe_path: Path = typer.Argument(..., help="Recipe YAML."),
                    from_weights: bool = typer.Option(False, "--from-weights", help="The run will start from --weights "
                                                      "of a smaller model (a first run's artifact): a size target out "
                                                      "of reach of the model as built is a warning, not an error."),
                    model: Optional[str] = typer.Option(None, help="The model compress will get with --model (a "
                                                        "reference model or your builder); default: the recipe's."),
                    data: Optional[str] = typer.Option(None, help="The data compress will get with --data ('digits' or "
                                                       "an .npz); default: the recipe's.")):
    """Check a recipe: every field, bound and combination; prints what it will run."""
    from .joint_form import nonzero_by_default
    from .recipe import compresses_nothing, load_recipe

    r = load_recipe(recipe_path)
    if model is not None:  # as compress --model overrides it
        if not model.strip():
            raise JointCompressError("--model is empty; give a value, or leave the flag out for the recipe's")
        r = r.model_copy(update={"model": model})
    if data is not None:  # as compress --data overrides it: the checks on the model read that data
        if not data.strip():
            raise JointCompressError("--data is empty; give 'digits' or an .npz, or leave the flag out for the recipe's")
        if not _readable_data(data):  # compress stops there; the recipe's data: warning would advise --data itself
            raise JointCompressError(f"--data {data}: does not exist (from {Path.cwd()}); give 'digits' or the path "
                                     "of an .npz that exists")
        r = r.model_copy(update={"data": data})
    model = _validated_model(r.model or (r.hf.model_name_or_path if r.hf is not None else None), r.hf is not None)
    _check_cli_metric(r, recipe_path)  # as compress checks it
    nothing = compresses_nothing(r, student_is_copy=True)  # the command line's student is a copy of the model
    if nothing is not None:
        console.print(f"[yellow]warning:[/yellow] {escape(str(recipe_path))}: {escape(nothing)}")
    said = {nothing}
    if r.data and not _readable_data(r.data):  # compress would stop there (unless --data)
        console.print(f"[yellow]warning:[/yellow] {escape(str(recipe_path))}: data: {escape(r.data)} does not exist "
                      f"(from {escape(str(Path.cwd()))}); "
                      "compress stops there unless --data gives another")
    said.update(_say_unused_settings(r))
    if r.asks_for_joint_form() and nonzero_by_default(r.technique("quant_lsq")):
        console.print(f"mode: joint under a size target: {NONZERO_GRID_NOTE}")
    checked = _checked_on_the_model(r, from_weights, said)
    console.print(f"[green]ok[/green] {escape(str(recipe_path))}: {escape(str(model))}, mode={r.mode}, {len(r.techniques)} techniques "
                  f"({', '.join(t.type for t in r.techniques)}), {r.training.epochs} epochs, coordination={r.coordination.strategy}"
                  f"{checked}")


def _say_unused_settings(recipe) -> list[str]:
    """The settings a size or latency target replaces (prune_unstructured.sparsity beside target.ratio), and windows
    that leave no step after them, which compress says when it starts: validate said "ok" and nothing else. Returns
    what it said."""
    import warnings

    from .recipe import warn_no_steps_after
    from .targets import warn_unused_sparsity

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unused_sparsity(recipe)
        warn_no_steps_after(recipe)
    for w in caught:
        console.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}")
    return [str(w.message) for w in caught]


def _readable_data(data: str) -> bool:
    """Whether a recipe's `data:` is one this command can load: the embedded digits, or a file that exists."""
    return data == "digits" or Path(data).exists()


def _checked_on_the_model(recipe, from_weights: bool = False, already: set | None = None) -> str:
    """Where the recipe names a model and data it can read, the checks compress runs before training, on the
    untrained model: validate said "ok" to blocks that are no residual blocks, patterns that select no layer
    and targets out of reach, which compress then refused. Returns what the ok line adds. `already`: warnings
    validate printed itself (the setup says them again)."""
    from .models import absolute_builder
    from .pipeline import builder_for, load_split

    unchecked = _why_not_checked_on_a_model(recipe)
    if recipe.hf is not None:  # what an hf run's target may be needs no model: refused here as compress refuses it
        from .hf.recipe_steps import check_recipe

        check_recipe(recipe)
    if unchecked:
        return f" (not checked on a model: {unchecked})"

    from .targets import TargetError

    split = load_split(recipe, None)
    said: list[str] = []
    try:
        _refuse_before_training(builder_for(absolute_builder(recipe.model), split), recipe, split, said=said)
    except TargetError as err:  # the model as built: a second run's --weights (channels removed) may reach it
        if not from_weights:
            err.add_note("(on the model as the builder makes it; for a run from --weights of a smaller model, a first "
                         "run's artifact, validate with --from-weights: compress checks the target on that model)")
            raise
        console.print(f"[yellow]warning:[/yellow] {escape(str(err))} (on the model as the builder makes it; a run from "
                      "--weights of a smaller model, a first run's artifact, is checked on that one)")
    for message in (m for m in said if m not in (already or ())):  # what compress would say before it trains
        console.print(f"[yellow]warning:[/yellow] {escape(message)}")
    return f"; checked on the untrained model on {split.name}"


def _why_not_checked_on_a_model(recipe) -> str | None:
    """Why validate cannot build the recipe's model on its data, as the ok line says it (None where it can)."""
    if recipe.hf is not None or (recipe.model or "").startswith("hf:"):
        return ("a Hugging Face recipe: compress checks its layers and features once the teacher has loaded, "
                "before training")
    if not recipe.model:
        return "the recipe names no model: (compress takes --model)"
    if not recipe.data:
        return "the recipe names no data: (compress reads --data, or the embedded 8x8 digits without it)"
    if not _readable_data(recipe.data):
        return f"data: {recipe.data} cannot be read from here"
    return None


def _validated_model(name: str | None, hf: bool) -> str:
    """What `model:` will build, checked as compress checks it: a built-in name, `hf:...`, or a builder
    (package.module:function, file.py:function) that imports and takes no arguments."""
    from .models import MODELS

    if hf or (name or "").startswith("hf:"):
        return f"model={name or 'the hf teacher (hf.model_name_or_path, or compress --weights)'}"
    if not name:
        return "model not set (pass --model to compress)"
    if ":" in name:
        from .models import load_builder

        file = name.rsplit(":", 1)[0]
        if file.endswith(".py") and not Path(file).is_file():
            relative = "" if Path(file).is_absolute() else f", read from the current folder {Path.cwd()}"
            raise JointCompressError(f"model: {name!r}: no file {file}{relative}; give file.py:function (its path from "
                                     "the folder you run in, or an absolute one) or package.module:function")
        load_builder(name)  # imported and its signature checked as compress would, not yet called
        return f"model={name}"
    if name not in MODELS:
        raise JointCompressError(f"model: unknown reference model {name!r}; choose one of {', '.join(MODELS)}, or your "
                                 "builder as package.module:function or file.py:function")
    return f"model={name}"


def _register_commands() -> None:
    import importlib
    import pkgutil

    from . import commands

    for info in pkgutil.iter_modules(commands.__path__):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(app)


_register_commands()


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=None):
    """A warning of this package as one line, `warning: ...` on stderr (not the file, line and source
    of the code that raised it, which mean nothing to a command-line user); others as Python shows them."""
    if STATE["debug"] or not str(filename).startswith(str(Path(__file__).parent)):
        return _default(message, category, filename, lineno, file, line)

    Console(stderr=True, width=console.width, emoji=False).print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _check_hf_model_flag(model: str, weights, recipe_path) -> None:
    """A recipe with an hf: section compresses a transformers model: --weights FOLDER, hf.model_name_or_path, or
    --model hf:NAME. Any other --model (a built-in name, a builder) was ignored without a word, and recorded as the
    run's model in recipe.yaml and the manifest; hf:NAME beside --weights lost to --weights as silently."""
    if not model.startswith("hf:"):
        raise JointCompressError(f"--model {model}: {recipe_path} has an hf: section, so it compresses the transformers "
                                 "model --weights FOLDER (or hf.model_name_or_path) names; drop --model, or give "
                                 "--model hf:NAME for a model by its hub name")
    if weights is not None:
        raise JointCompressError(f"--model {model} and --weights {weights} both name the transformers model to "
                                 "compress; give one of them")


def _compress_resumes_from(out: str | None, weights: bool = False) -> str:
    """What --resume continues from: the last checkpoint; else the model the run trained first (its file
    is written when that training ends); else nothing (it said "its last checkpoint" when there was none,
    and everything trained so far was lost). `weights`: the run started from --weights and trained no model
    first (it said one was being trained)."""
    from .checkpoint import CheckpointStore

    if out is None or CheckpointStore(out).paths():
        return "; the run continues from its last checkpoint with the same command and --resume"
    if weights:
        return ("; no compression checkpoint was written yet (--checkpoint-every sets how often one is): the same "
                "command with --resume starts compressing the --weights model again")
    if (Path(out) / "teacher.safetensors").is_file():
        return ("; no compression checkpoint was written yet: the same command with --resume starts compressing "
                "again from the model it trained first")
    return ("; nothing was saved yet (the model being trained first is written when its training ends): the same "
            "command with --resume starts from the beginning")


def _after_interrupt(argv: list[str]) -> str:
    """What an interrupted command left: compress resumes from its checkpoints; compare keeps the points it
    finished in its compare.json, and --resume runs the rest; the others are run again."""
    command = next((a for a in argv if not a.startswith("-")), "")
    if command == "compress":
        return _compress_resumes_from(_flag_value(argv, "--out") or str(COMPRESS_OUT),  # the default's too
                                      weights=_flag_value(argv, "--weights") is not None)
    if command == "compare":
        return ("; compare.json in its --out keeps the points that finished (`jointcompress report` reads it): the "
                "same command with --resume runs the rest")
    return ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's preemption, `docker stop`, `kill`), raised where the run is, as Ctrl-C is: the run
    ended with status 143 and not a word of what it kept or how to go on."""


def _terminate(signum, frame) -> None:
    import signal

    STATE["terminated"] = True  # typer turns a KeyboardInterrupt into Exit(130), whatever its class
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process, mid-message or not
    raise Terminated


def _default_sigterm_in_child() -> None:
    """A forked child (a DataLoader's worker) ends on SIGTERM as its parent's loader expects, not by raising."""
    import signal

    if signal.getsignal(signal.SIGTERM) is _terminate:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


def main() -> None:
    import functools
    import signal
    import warnings

    debug = STATE["debug"] = "--debug" in sys.argv[1:]
    STATE["terminated"] = False
    try:
        if getattr(signal.getsignal(signal.SIGINT), "while_importing", False):  # __init__'s, for the imports only
            signal.signal(signal.SIGINT, signal.default_int_handler)
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: its owner handles signals
        previous = None
    try:
        with warnings.catch_warnings():  # restores showwarning when the command ends (tests call main())
            warnings.showwarning = functools.partial(_show_warning, _default=warnings.showwarning)
            _run(debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _refuse_inside_model_import() -> None:
    """A command started by the top-level code of the --model file another command is importing: it would import
    that file again, whose code starts the command again, without end (each a process holding a model)."""
    from .models import IMPORTING_MODEL

    importing = os.environ.get(IMPORTING_MODEL)
    if importing:
        raise RecipeError(f"jointcompress started while importing --model {importing}, whose top-level code ran this "
                          "command: each run would import the file again and start another. Put the file's script "
                          "part under `if __name__ == \"__main__\":`, so importing it only defines the builder")


class _ConsoleRecords(logging.Handler):
    """The package's INFO records (the timing before a latency target's first step) as lines of the command's
    output: minutes of it were said by one line, then silence, on a model of ResNet-18's size."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(record.getMessage(), markup=False, highlight=False)


@contextlib.contextmanager
def _records_said():
    """The package logger ("jointcompress") printed at INFO while a command runs, and put back as it was after."""
    logger, handler = logging.getLogger("jointcompress"), _ConsoleRecords()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _run(debug: bool) -> None:
    try:
        _refuse_inside_model_import()
        with _records_said():
            code = app(standalone_mode=False)
        # typer (>= 0.22) returns the code of an Exit instead of raising it here, and turns Ctrl-C
        # into Exit(130): an interrupted run would otherwise end with status 0 and no word
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except JointCompressError as err:
        if debug or STATE["debug"]:
            raise
        if getattr(err, "told_by_rank_0", False):  # under torchrun: rank 0 printed it
            sys.exit(2)
        from .distributed import said_by_rank_0

        if said_by_rank_0("\n".join([str(err), *getattr(err, "__notes__", ())])):  # the same refusal on every rank
            sys.exit(2)
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
        for note in getattr(err, "__notes__", ()):
            console.print(escape(note), highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        from .distributed import said_by_rank_0

        terminated = STATE.get("terminated", False)
        word, after = "terminated (SIGTERM)" if terminated else "interrupted", _after_interrupt(sys.argv[1:])
        if not said_by_rank_0(word + after):  # under torchrun every rank is interrupted: rank 0 says it
            console.print(f"[bold red]{word}[/bold red]{after}")
        sys.exit(143 if terminated else 130)
    except OSError as err:  # the machine's problem (disk full, permissions), not a bug: say which file
        if debug or STATE["debug"]:
            raise
        filename = getattr(err, "filename", None)
        named = filename is not None and str(filename) in str(err.strerror)  # io.atomic_write_bytes says what to do
        advice = {errno.ENAMETOOLONG: "the path is too long for the file system: give a shorter one",
                  errno.ENOTDIR: "a part of the path is a file, not a folder: give a path in a folder"}.get(
            err.errno, "check the path, free space and permissions")
        where = "" if named else (f" ({filename})" if filename else "") + f"; {advice}"

        console.print(f"[bold red]error:[/bold red] {escape(str(err.strerror or err) + where)} (--debug for details)",
                      highlight=False)
        sys.exit(1)
    except Exception as err:  # usage errors (an unknown option, a missing argument) and the like
        usage, abort = _click_errors()
        if isinstance(err, usage):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, abort):
            sys.exit(130)
        raise
    finally:
        _close_process_group()


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage error classes, abort classes) of the command-line parser: click's, and those of the
    copy of click that typer >= 0.22 carries inside itself (typer._click), which are other classes:
    caught as click's only, an unknown option printed a traceback instead of the usage message."""
    import importlib

    usage, abort = [], [typer.Abort]
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        abort += [mod.Abort] if hasattr(mod, "Abort") else []
    return tuple(usage), tuple(abort)


def _close_process_group() -> None:
    try:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down; nothing useful to report
        pass


if __name__ == "__main__":
    main()

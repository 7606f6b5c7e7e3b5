"""`jointcompress compare RECIPE.yaml --ratios 10,20,40 --seeds 3`: joint vs sequential Pareto front."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..compare import DEFAULT_VARIANTS, default_variants
from ..io import RUN_REPORT, output_folder, removed_if_refused
from . import DEVICE_HELP, MODEL_CHOICES


def parse_floats(text: str, what: str) -> list[float]:
    from ..errors import RecipeError

    from ..compare import check_ratios

    parts = text.split(",")
    if any(not v.strip() for v in parts[:-1]):  # 10,,20: an item left out, not a trailing comma
        raise RecipeError(f"{what}: an empty item in {text!r}; give comma-separated numbers like 10,20,40")
    try:
        values = [float(v) for v in parts if v.strip()]
    except ValueError:
        raise RecipeError(f"{what}: expected comma-separated numbers like 10,20,40, got {text!r}") from None
    return check_ratios(values, what)  # finite, within target.ratio's bounds, no two naming the same run folder


def register(app: typer.Typer) -> None:
    @app.command("compare")
    @removed_if_refused
    def compare_command(
        recipe_path: Path = typer.Argument(..., help="Recipe YAML (its techniques and epochs; the target comes from --ratios)."),
        ratios: str = typer.Option("10,20,40", "--ratios", help="Compression ratios vs the fp32 file, comma-separated."),
        seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per point (teacher trained once per seed)."),
        first_seed: int = typer.Option(0, "--first-seed", min=0, help="First seed (a later batch extends an earlier one; "
                                       "benchmarks/pool_compare.py pools the folders)."),
        variants: Optional[str] = typer.Option(None, "--variants",
                                     help="Comma-separated. Default: the joint form `compress` runs for mode: joint under a size "
                                          f"target, with coordination none / scale / pcgrad, and sequential ({','.join(DEFAULT_VARIANTS)}; "
                                          "at 2 bits their -nz- forms, on the nonzero grid compress takes there). Also joint-none, "
                                          "joint-scale, joint-pcgrad (size_budget at its defaults), joint-acc-pcgrad (PCGrad "
                                          "between accuracy and size), joint-paced-obd-none, overlap, sequential-sens (sequential on "
                                          "the budgets the allocator makes from a sensitivity scan of each teacher, the "
                                          "other baseline), ... (an unknown name lists them all)."),
        model: Optional[str] = typer.Option(None, "--model", help=f"{MODEL_CHOICES} (default: the recipe's)."),
        data: Optional[str] = typer.Option(None, "--data", help="'digits' or an .npz of images (MNIST-style; default: the recipe's)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Trained weights (.safetensors) or a saved artifact folder, the teacher of every seed."),
        teacher_epochs: int = typer.Option(10, "--teacher-epochs", min=1, help="Teacher epochs when no --weights."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the recipe's epochs (same for all)."),
        out: Path = typer.Option(Path("runs/compare"), "--out", parser=output_folder, help="Output directory."),
        tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Also log every run to TensorBoard here."),
        keep: Optional[str] = typer.Option(None, "--keep", help="training.keep of every variant: 'best' (its best evaluated "
                                           "epoch at the target) or 'last' (the same rule for every variant, no choice made on "
                                           "the evaluation data). Default: the recipe's (best)."),
        val_images: Optional[int] = typer.Option(None, "--val-images", min=0, help="training.validation_images of every "
                                                 "variant and teacher: training images held out (the same for all) to choose "
                                                 "the kept epoch on, so the reported test accuracy played no part in it; 0: "
                                                 "choose on the test split. Default: the recipe's (0)."),
        force: bool = typer.Option(False, "--force", help="Allow writing into a non-empty --out."),
        resume: bool = typer.Option(False, "--resume", help="Continue the compare in --out (the same command, "
                                    "interrupted): the points its compare.json holds are kept, the rest run, each seed's "
                                    "teacher read back from --out/teachers."),
        device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    ) -> None:
        """Run joint (coordination none/scale/pcgrad) and sequential at each ratio and seed, with the same
        teacher, steps and distillation: sequential on the allocator's per-layer budgets, joint learning its own
        under the size target; write compare.json/.csv and the Pareto plot."""
        from ..cli import console, progress_bar, tracked
        from ..compare import CompareSpec, run_compare
        from ..devices import resolve_device
        from ..errors import JointCompressError
        from ..io import check_folder_path, hold_run_lock, prepare_output_dir
        from ..data import hold_out, load_dataset
        from ..recipe import load_recipe
        from . import refuse_hf_recipe

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank wrote the folder and the points: it failed midway
            raise JointCompressError("compare runs in one process: start it without torchrun (each of its points is a "
                                     "small run; `compress` trains data-parallel under torchrun)")
        check_folder_path(tensorboard, "--tensorboard")  # else found after training
        if resume and force:
            raise JointCompressError("--resume and --force: --resume continues the compare in --out, --force starts over "
                                     "(clearing its points); give one")
        if keep not in (None, "best", "last"):
            raise JointCompressError(f"--keep {keep}: choose best or last")
        given_ratios = parse_floats(ratios, "--ratios")
        # the target comes from --ratios: a recipe without one may leave prune_unstructured.sparsity out
        recipe = load_recipe(recipe_path, defaults={"target": {"ratio": given_ratios[0]}} if given_ratios else None)
        if recipe.target is not None and recipe.target.is_latency:  # ran size targets in its place, without a word
            import warnings

            asked = recipe.target.model_dump(exclude_none=True, include={"latency_ms", "speedup", "batch"})
            warnings.warn(f"compare: the recipe's latency target {asked} is not read: compare weighs size targets, "
                          "one at each of --ratios; for a latency target run `jointcompress compress` (or `bench "
                          "--against torch-pruning` for the side-by-side timing)", stacklevel=2)
        refuse_hf_recipe(recipe, recipe_path, "compare",
                         "To weigh joint against sequential, run `jointcompress compress RECIPE --mode sequential` "
                         "beside the joint run (docs/transformers.md)")
        name = model or recipe.model
        if not name:
            raise JointCompressError(f"{recipe_path}: no model given; set `model:` in the recipe or pass --model")
        from ..models import absolute_builder

        name = absolute_builder(name)  # the artifacts' manifests record it
        spec = CompareSpec(ratios=given_ratios, seeds=seeds,
                           variants=(tuple(v.strip() for v in variants.split(",") if v.strip()) if variants is not None
                                     else default_variants(recipe)),
                           teacher_epochs=teacher_epochs, epochs=epochs, first_seed=first_seed, keep=keep,
                           device=str(resolve_device(device)), validation_images=val_images)
        split = load_dataset(data if data is not None else recipe.data, inputs=recipe.inputs)
        held = val_images if val_images is not None else recipe.training.validation_images
        split = hold_out(split, held, what="--val-images" if val_images is not None else "training.validation_images")
        if weights:  # before any teacher trains or any variant runs on it
            from ..pipeline import builder_for, check_given_model_inputs, load_start

            check_given_model_inputs(load_start(builder_for(name, split), weights), split,
                                     data if data is not None else recipe.data, recipe.inputs, weights)
        out = prepare_output_dir(out, force=force or resume)  # after every check: a refused run leaves no folder
        hold_run_lock(out)  # before --force clears anything: a second compare here is refused, naming the first
        if force:  # an earlier compare's points and report would sit beside this one's as if they were its own
            clear_earlier_compare(out, weights)
        with progress_bar() as bar:
            typed = "jointcompress " + shlex.join(sys.argv[1:]) if "compare" in sys.argv[1:] else None  # as typed
            result = run_compare(recipe, split, name, spec, out, weights=weights, tensorboard=tensorboard,
                                 progress_factory=lambda d: tracked(bar, d), log=console.print, resume=resume,
                                 command=typed)
        console.print(summary_table(result))
        whose = "the --weights teacher was trained elsewhere" if weights else "the teachers' too"
        console.print(f"accuracy on the test split; every kept epoch ({whose}) chosen on {result['selected_on']}"
                      + ("" if result["keep"] == "best" else "; the variants end with their last (training.keep: last)"))
        for u in result.get("unreachable", []):
            console.print(f"[yellow]r{u['ratio_target']:g} seed {u['seed']}: not run, target unreachable[/yellow]: {escape(u['reason'])}")
        console.print(f"results in {out}/compare.json, compare.csv, pareto.png; `jointcompress report {out}` for the HTML report",
                      markup=False)


COMPARE_FILES = ("compare.json", "compare.csv", "pareto.png", "teachers", *RUN_REPORT)  # what compare and report write beside runs/
POINT_FOLDER = re.compile(r"[a-z0-9-]+-r[0-9.e+]+-s[0-9]+")  # runs/<variant>-r<ratio>-s<seed>: compare's own folders


def clear_earlier_compare(out: Path, weights) -> None:
    """--force: the files and point folders an earlier compare wrote in `out` go (its runs/<variant>-r<ratio>-s<seed>,
    not the rest of runs/, which may be the user's), unless the run reads its --weights from one of them."""
    from ..io import refuse_clearing

    runs = out / "runs"
    points = [p for p in runs.iterdir() if p.is_dir() and POINT_FOLDER.fullmatch(p.name)] if runs.is_dir() else []
    cleared = [out / name for name in COMPARE_FILES if (out / name).exists()] + points
    if weights is not None:
        refuse_clearing(weights, cleared, out)
    for place in cleared:
        if place.is_dir() and not place.is_symlink():
            shutil.rmtree(place)
        else:
            place.unlink()


def summary_table(result: dict):
    """Per point: the seeds that ran it (n), mean [min-max] accuracy, and each variant's error minus
    sequential's paired by seed (mean ± one standard error), and minus sequential-sens's where it ran;
    the teachers' accuracy first."""
    from rich.table import Table

    from ..compare import all_paired, changed_nothing_note, summarize, uncompressed_summary

    table = Table(title=escape(f"{result['model']} on {result['data']}: mean [min-max] over the n seeds that ran each row; "
                               "bytes = the weights file on disk (mean); ratio = the uncompressed model's fp32 safetensors "
                               "file over it; "
                               "Δerror = error − the baseline's, paired by seed (± one standard error)"))
    every = result.get("paired") or all_paired(result.get("runs", []))
    stronger = sorted({p["baseline"] for p in every if p.get("baseline", "sequential") != "sequential"})
    deltas = ["Δerror vs sequential"] + [f"Δerror vs {b}" for b in stronger]  # a sensitivity-allocated baseline too
    for col in ("variant", "target", "n", "bytes", "ratio", "accuracy", "error", *deltas):
        table.add_column(col, justify="left" if col == "variant" or col in deltas else "right")
    teacher = result.get("uncompressed_summary") or uncompressed_summary(result)
    if teacher:
        table.add_row("uncompressed (teacher)", "-", str(teacher["n"]), _bytes(teacher.get("bytes_mean")), "1.0x",
                      _acc(teacher),
                      f"{100 * teacher['error_mean']:.2f}%", "")
    summary = result.get("summary") or summarize(result.get("runs", []))
    paired = {(p["variant"], p["ratio_target"], p.get("baseline", "sequential")): p for p in every}
    for s in sorted(summary, key=lambda s: (s["ratio_target"], s["variant"])):
        nothing = changed_nothing_note(s)
        table.add_row(s["variant"] + (f" ({nothing})" if nothing else ""), f"{s['ratio_target']:g}x", str(s["n"]),
                      _bytes(s.get("file_bytes_mean")), f"{s['ratio_mean']:.1f}x", _acc(s),
                      f"{100 * s['error_mean']:.2f}%",
                      *(paired_cell(paired.get((s["variant"], s["ratio_target"], b))) for b in ["sequential", *stronger]))
    return table


def _bytes(mean: float | None) -> str:
    """The mean bytes on disk, as `ls -l` counts them ('-' for a result written before they were kept)."""
    return "-" if mean is None else f"{mean:,.0f} B"


def _acc(s: dict) -> str:
    return f"{100 * s['accuracy_mean']:.2f}% [{100 * s['accuracy_min']:.2f}-{100 * s['accuracy_max']:.2f}]"


def paired_cell(p: dict | None) -> str:
    """'+0.31 ± 0.12 pts (n=3): within 2 SE'; one seed has no standard error. Files of other sizes (a target
    both undershoot) are said after the verdict."""
    if p is None:
        return ""
    from ..compare import collapsed_note, unequal_files_note

    se = f" ± {p['error_diff_se']:.2f}" if p.get("error_diff_se") is not None else ""
    notes = "".join(f"; {n}" for n in (unequal_files_note(p), collapsed_note(p)) if n)
    return f"{p['error_diff_mean']:+.2f}{se} pts (n={p['n']}): {p['verdict']}{notes}"

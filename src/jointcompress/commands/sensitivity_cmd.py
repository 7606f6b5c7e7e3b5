"""`jointcompress sensitivity RECIPE.yaml`: metric drop per layer and per channel group."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..io import output_folder
from . import MODEL_CHOICES


def register(app: typer.Typer) -> None:
    @app.command("sensitivity")
    def sensitivity_command(
        recipe_path: Path = typer.Argument(..., help="Recipe YAML (model and data are read from it; the metric is accuracy on the test split, or on the "
                                                 "training images training.validation_images holds out)."),
        model: Optional[str] = typer.Option(None, "--model", help=f"{MODEL_CHOICES} (default: the recipe's)."),
        data: Optional[str] = typer.Option(None, "--data", help="'digits' or an .npz of images (MNIST-style; default: the recipe's)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Trained weights (.safetensors, or an artifact "
                                               "directory, as compress --weights takes); default: train first."),
        teacher_epochs: int = typer.Option(10, "--teacher-epochs", min=1, help="Epochs to train when no --weights."),
        sparsities: str = typer.Option("0.5,0.8,0.9,0.95,0.98", "--sparsities", help="Unstructured sparsities per layer."),
        bits: str = typer.Option("8,4,3,2", "--bits", help="Bit-widths per layer, each layer rounded on LSQ's initial grid (where "
                                "quantization-aware training starts; it clips the largest weights, so a column reads the "
                                "start's loss, which training recovers, not rounding's alone)."),
        group_sparsities: str = typer.Option("0.25,0.5,0.75", "--group-sparsities", help="Channel sparsities per group."),
        out: Path = typer.Option(Path("runs/sensitivity"), "--out", parser=output_folder, help="Where sensitivity.json and .png go."),
        force: bool = typer.Option(False, "--force", help="Allow writing into an --out that holds other files."),
        recalibrate_norms: int = typer.Option(8, "--recalibrate-norms", min=0,
                                              help="Batches of 128 training images over which a model with BatchNorm re-estimates its "
                                                   "statistics before every reading (0: the running averages, which overstate a "
                                                   "layer's drop)."),
    ) -> None:
        """Prune or quantize one layer (or one coupled channel group) at a time and measure the drop;
        prints a layer table and a group table, writes sensitivity.json (usable by targets.resolve_target) and a heatmap PNG."""
        from ..cli import console, progress_bar, tracked
        from ..data import evaluator
        from ..errors import JointCompressError, RecipeError
        from ..io import atomic_write_json
        from ..pipeline import builder_for, load_split, load_start, train_teacher
        from ..recipe import load_recipe
        from . import refuse_hf_recipe
        from ..sensitivity import save_heatmap, scan, scanned_layers, shuffled_batches

        recipe = load_recipe(recipe_path)
        refuse_hf_recipe(recipe, recipe_path, "sensitivity",
                         "A text classifier's heads and FFN neurons are not scanned one by one yet; prune_heads / "
                         "prune_ffn learn which to remove in the run")
        name = model or recipe.model
        if not name:
            raise JointCompressError(f"{recipe_path}: no model given; set `model:` in the recipe or pass --model")
        try:
            sp = [float(v) for v in sparsities.split(",")]
            gs = [float(v) for v in group_sparsities.split(",")]
            bs = [int(v) for v in bits.split(",")]
        except ValueError:
            raise RecipeError("--sparsities/--group-sparsities take numbers like 0.5,0.9; --bits integers like 8,4,2") from None
        for flag, bad in (("--sparsities", [s for s in sp if not 0 < s < 1]),
                          ("--group-sparsities", [s for s in gs if not 0 < s < 1]),
                          ("--bits", [b for b in bs if not 2 <= b <= 8])):
            if bad:
                bounds = "integers from 2 to 8" if flag == "--bits" else "numbers strictly between 0 and 1"
                raise RecipeError(f"{flag}: {', '.join(f'{v:g}' for v in bad)} out of range; give {bounds}")
        check_out(out, force)  # before the data and any training
        split = load_split(recipe, data)
        builder = builder_for(name, split)  # a builder checked on the data once, here
        scanned_layers(builder())  # a model with nothing to scan: said before any training
        out.mkdir(parents=True, exist_ok=True)
        with progress_bar() as bar:
            if weights:
                net = load_start(builder, weights)  # a file, or an artifact directory as compress takes
            else:
                net = train_teacher(name, split, teacher_epochs, lr=recipe.training.lr, progress=tracked(bar, "train model"))
            result = scan(net, evaluator(*split.selection()), split.x_train[:2], sp, bs, gs, metric="accuracy",
                          progress=tracked(bar, "scan"), norm_batches=shuffled_batches(split.x_train, recalibrate_norms))
        result["measured_on"] = split.selected_on  # the images the baseline and every drop are measured on
        atomic_write_json(out / "sensitivity.json", result)
        save_heatmap(result, out / "sensitivity.png")
        console.print(layer_table(result, name, f"{split.name}, measured on {split.selected_on}", sp, bs))
        if result["groups"]:
            console.print(group_table(result, gs))
        console.print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'}", markup=False)


OUTPUTS = ("sensitivity.json", "sensitivity.png")  # what a scan writes (a re-run may replace them)


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that holds anything but a previous scan's outputs (another run's folder), unless --force."""
    from ..errors import JointCompressError

    if out.exists() and not out.is_dir():
        raise JointCompressError(f"--out {out}: exists and is a file, not a folder; choose another --out")
    others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.is_dir() else []
    if others and not force:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise JointCompressError(f"--out {out}: the folder already holds other files ({shown}); choose another --out, "
                                 "or pass --force to write sensitivity.json and sensitivity.png beside them")


def layer_table(result: dict, model: str, data: str, sparsities: list[float], bits: list[int]):
    """One row per layer: the accuracy drop (points) at each unstructured sparsity and bit-width."""
    from rich.table import Table

    table = Table(title=f"{model} on {data}: accuracy drop (points) per layer, baseline {100 * result['baseline']:.2f}%")
    table.add_column("layer", justify="left")
    for c in [f"s={s}" for s in sparsities] + [f"{b}b" for b in bits]:
        table.add_column(c, justify="right")
    for layer, rec in result["layers"].items():
        table.add_row(layer, *[f"{100 * rec['sparsity'][str(s)]:.2f}" for s in sparsities],
                      *[f"{100 * rec['bits'][str(b)]:.2f}" for b in bits])
    return table


def group_table(result: dict, group_sparsities: list[float]):
    """One row per coupled channel group: the accuracy drop (points) with that share of its channels removed."""
    from rich.table import Table

    table = Table(title="accuracy drop (points) per coupled channel group, share of its channels removed")
    table.add_column("group (layers)", justify="left")
    for s in group_sparsities:
        table.add_column(f"ch {s}", justify="right")
    for g, rec in result["groups"].items():
        table.add_row(f"{g} ({', '.join(rec['layers'])})",
                      *[f"{100 * rec['sparsity'][str(s)]:.2f}" if str(s) in rec["sparsity"] else "-" for s in group_sparsities])
    return table

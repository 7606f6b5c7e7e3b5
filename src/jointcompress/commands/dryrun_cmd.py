"""`jointcompress dry-run --model NAME`: what structured pruning would touch, before training.

Shows every coupled channel group (root layer, member layers, channel count) and every layer
that will not be pruned with the reason (the output layer, a target pattern, a normalization
that mixes channels, a reshape into heads, ...), and the residual blocks `prune_blocks` can
remove whole, so a wrong target pattern or an
architecture that cannot be pruned structurally is caught in seconds instead of after an
hour of training. NAME is a built-in model or the user's own builder, `package.module:function`
or `path/to/file.py:function`, traced on a random input (seeded) of `--input-shape`.
"""
from __future__ import annotations

import typer

from ..errors import RecipeError
from . import MODEL_CHOICES


def _shape_hint(model) -> str:
    """An input shape to suggest for `model`, from its first layer: rows of features for a Linear, images of its
    channels for a convolution (a table model was told to pass an image shape)."""
    import torch.nn as nn

    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    if isinstance(first, nn.Linear):
        return f"1,{first.in_features}"
    if isinstance(first, nn.modules.conv._ConvNd):
        return ",".join(["1", str(first.in_channels)] + ["32"] * (first.weight.dim() - 2))
    return "1,3,32,32"


def _noise(shape):
    import torch

    return torch.randn(list(shape), generator=torch.Generator().manual_seed(0))


def _token_ids(model, shape):
    """Seeded token ids of `shape` below the smallest nn.Embedding's vocabulary, for a model with one (a text
    model, whose forward takes integers: traced on noise it failed with the shape named as the cause)."""
    import torch

    vocab = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if not vocab:
        return None
    return torch.randint(0, min(vocab), list(shape), generator=torch.Generator().manual_seed(0))


def _model_and_input(model_name: str, image_size: int, input_shape: list[int] | None):
    """The model and the input to trace it with (seeded normal noise: on zeros, a fresh Conv -> BatchNorm model
    outputs its classifier's bias alone, so the check that a group's channels can go saw no difference and
    listed groups training then skips), checked to run (a shape the model does not take
    failed deep inside the trace)."""
    import torch

    from ..models import MODELS, build_model, is_builder

    if model_name in MODELS and not input_shape and image_size < 1:
        raise RecipeError(f"--image-size {image_size}: give the images' height and width as a positive integer, "
                          "e.g. --image-size 28 (or the whole shape with --input-shape 1,1,28,28)")
    if model_name == "lenet300" and input_shape and len(input_shape) == 2:  # rows of features, as compress reads them
        from ..models import LeNet300

        model, example = LeNet300(input_shape[1], 10).eval(), _noise(input_shape)
    elif model_name in MODELS:  # built-ins take square images: --input-shape N,C,H,W (or C,H,W) sets channels and size
        shape = list(input_shape or [1, 1, image_size, image_size])
        shape = [1] * (4 - len(shape)) + shape if len(shape) in (2, 3) else shape
        if len(shape) != 4 or shape[2] != shape[3]:
            raise RecipeError(f"--input-shape {','.join(map(str, input_shape))}: the built-in model {model_name!r} takes square "
                              "images, N,C,H,W with H = W (e.g. 1,3,32,32)")
        model, example = build_model(model_name, image_size=shape[-1], in_channels=shape[1]).eval(), _noise(shape)
    elif not is_builder(model_name):  # neither built in nor a builder: a misspelt name gets the list of names
        build_model(model_name)
    elif not input_shape:
        built = build_model(model_name)  # a file without that function, or one that fails, is named before the shape
        raise RecipeError(f"--model {model_name!r}: a model of your own needs --input-shape, e.g. --input-shape "
                          f"{_shape_hint(built)}")
    else:
        model, example = build_model(model_name).eval(), _noise(input_shape)  # checks what the builder returned
    try:
        with torch.no_grad():
            try:
                model(example)
            except Exception:
                ids = _token_ids(model, example.shape)
                if ids is None:
                    raise
                model(ids)  # a text model: its forward takes token ids, not images
                example = ids
    except Exception as exc:  # noqa: BLE001 -- any failure of the user's model on this shape: say so plainly
        first = str(exc).splitlines()[0] if str(exc) else ""
        given = f"--input-shape {','.join(map(str, example.shape))}" if input_shape else f"--image-size {image_size}"
        raise RecipeError(f"{given}: {model_name!r} does not run on an input of shape {tuple(example.shape)} "
                          f"({type(exc).__name__}: {first}); give the shape its forward takes, batch first") from None
    return model, example


def dry_run_tables(model_name: str, image_size: int = 28, targets=("*",), exclude=(), input_shape: list[int] | None = None):
    model, example = _model_and_input(model_name, image_size, input_shape)
    return _tables(model_name, model, example, targets, exclude)


def _tables(model_name: str, model, example, targets, exclude):
    """(groups table, skipped table, groups, skipped) of one built model."""
    from rich.markup import escape
    from rich.table import Table

    from ..graph import discover_groups

    groups, skipped = discover_groups(model, example, list(targets), list(exclude))
    skipped = skipped + _stored_whole(model, {name for name, _ in skipped})
    gt = Table(title=f"{model_name}: prunable channel groups ({len(groups)})")
    for col in ("group root", "channels", "members (module: out/in)"):
        gt.add_column(col)
    for g in groups:
        members = ", ".join(f"{m.module}:{m.kind}" for m in g.members)
        gt.add_row(g.name, str(g.channels), members)
    st = Table(title=f"{model_name}: layers not pruned ({len(skipped)})")
    st.add_column("layer")
    st.add_column("reason")
    for name, reason in skipped:
        st.add_row(escape(name), escape(reason))  # a shape in brackets read as markup and vanished
    return gt, st, groups, skipped


def _stored_whole(model, listed: set[str]) -> list[tuple[str, str]]:
    """The weights no technique acts on (transposed convolutions, other modules' weight matrices), which the
    groups' analysis never meets: the table of every layer not pruned left them out."""
    from ..conversions import other_weights
    from ..layer_types import TRANSPOSED_CONVOLUTIONS

    rows = [(n, f"a {type(m).__name__}: its weight is [in, out / groups, *kernel], which no technique compresses; "
                "stored in fp32, whole") for n, m in model.named_modules() if isinstance(m, TRANSPOSED_CONVOLUTIONS)]
    other, _ = other_weights(model)
    modules = dict(model.named_modules())
    rows += [(n, f"a {type(modules[n]).__name__ if n in modules else 'module'}: its own weight matrices are no "
                 "layer the techniques act on; stored in fp32, whole") for n in other]
    return [(n, why) for n, why in rows if n not in listed]


def _shape(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        shape = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        shape = []
    if not shape or any(d <= 0 for d in shape):
        raise RecipeError(f"--input-shape {text!r}: give positive integers separated by commas, e.g. 1,3,32,32")
    return shape


def register(app: typer.Typer) -> None:
    @app.command("dry-run")
    def dry_run_command(
        model: str = typer.Option("lenet5", "--model", help=MODEL_CHOICES),
        image_size: int = typer.Option(28, "--image-size", help="Input height/width used to trace a built-in model."),
        input_shape: str = typer.Option(None, "--input-shape", help="Shape of the (random) input to trace with, e.g. 1,3,32,32 (needed for your own model)."),
        target: list[str] = typer.Option(["*"], "--target", help="Glob of layer names to prune (repeatable)."),
        exclude: list[str] = typer.Option([], "--exclude", help="Glob of layer names never to prune (repeatable)."),
    ) -> None:
        """List every prunable channel group and every skipped layer with the reason."""
        from ..block_drop import residual_blocks
        from ..cli import console  # 140 columns where the output is no terminal: a log cut every name at 80
        from ..strides import stride_note

        net, example = _model_and_input(model, image_size, _shape(input_shape))  # the user's builder runs once
        gt, st, _, _ = _tables(model, net, example, target, exclude)
        console.print(gt)
        console.print(st)
        blocks = residual_blocks(net, example)
        console.print(f"residual blocks prune_blocks can remove whole: {', '.join(blocks) or 'none'}")
        console.print(stride_note(net, example))

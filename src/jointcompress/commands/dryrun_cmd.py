"""`jointcompress dry-run --model NAME`: what structured pruning would touch, before training.

Shows every coupled channel group (root layer, member layers, channel count) and every layer
that will not be pruned with the reason, so a wrong target pattern is caught in seconds
instead of after an hour of training.
"""
from __future__ import annotations

import typer


def dry_run_tables(model_name: str, image_size: int = 28, targets=("*",), exclude=()):
    import torch
    from rich.table import Table

    from ..graph import discover_groups
    from ..models import build_model

    model = build_model(model_name, image_size=image_size).eval()
    groups, skipped = discover_groups(model, torch.zeros(1, 1, image_size, image_size), list(targets), list(exclude))
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
        st.add_row(name, reason)
    return gt, st, groups, skipped


def register(app: typer.Typer) -> None:
    @app.command("dry-run")
    def dry_run_command(
        model: str = typer.Option("lenet5", "--model", help="lenet300 | lenet5 | resnet"),
        image_size: int = typer.Option(28, "--image-size", help="Input height/width used to trace the model."),
        target: list[str] = typer.Option(["*"], "--target", help="Glob of layer names to prune (repeatable)."),
        exclude: list[str] = typer.Option([], "--exclude", help="Glob of layer names never to prune (repeatable)."),
    ) -> None:
        """List every prunable channel group and every skipped layer with the reason."""
        from rich.console import Console

        gt, st, _, _ = dry_run_tables(model, image_size, target, exclude)
        console = Console()
        console.print(gt)
        console.print(st)

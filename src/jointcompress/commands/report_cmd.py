"""`jointcompress report RUN_DIR`: a self-contained HTML report plus per-layer CSV/JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_command(
        run_dir: Path = typer.Argument(..., help="Output directory of `jointcompress compress` or `compare`."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where report.html/layers.csv/layers.json go (default: RUN_DIR)."),
    ) -> None:
        """Accuracy vs bytes, per-layer sparsity and bits, loss terms and conflict rate over time."""
        from ..cli import console
        from ..io import check_folder_path
        from ..report import build_report

        check_folder_path(out, "--out", "report.html, layers.csv and layers.json")  # under a file: the OS's words, exit 1

        paths = build_report(run_dir, out)
        console.print(f"report: {paths['html']} (per-layer: {paths['csv']}, {paths['json']})", markup=False)

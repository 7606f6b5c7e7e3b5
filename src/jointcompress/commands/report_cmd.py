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
        from ..errors import JointCompressError
        from ..report import build_report

        if out is not None and out.exists() and not out.is_dir():
            raise JointCompressError(f"--out {out}: is a file; give a folder for report.html, layers.csv and layers.json")

        paths = build_report(run_dir, out)
        console.print(f"report: {paths['html']} (per-layer: {paths['csv']}, {paths['json']})", markup=False)

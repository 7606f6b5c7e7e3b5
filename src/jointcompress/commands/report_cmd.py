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

        from ..io import first_existing

        above = first_existing(out) if out is not None else None
        if above is not None and not above.is_dir():  # under a file: it failed with the OS's words, exit 1
            where = "is a file" if above == out else f"lies under {above}, which is a file"
            raise JointCompressError(f"--out {out}: {where}; give a folder for report.html, layers.csv and layers.json")

        paths = build_report(run_dir, out)
        console.print(f"report: {paths['html']} (per-layer: {paths['csv']}, {paths['json']})", markup=False)

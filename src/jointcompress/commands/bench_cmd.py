"""`jointcompress bench ARTIFACT_DIR`: measure a saved artifact against its dense architecture.

The dense side is the same architecture freshly built (fp32); its weights do not matter for
size, MACs and latency. Its accuracy is the trained baseline's, which only the compress run
knows: it is read from the manifest's extra["baseline_accuracy"] when present.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _image_size(manifest: dict) -> int:
    inputs = manifest.get("example_inputs") or []
    return int(inputs[0]["shape"][-1]) if inputs else 28


def run_bench(artifact_dir: Path, model: Optional[str], data: Optional[str], runs: int = 50, threads: int = 1) -> dict:
    import torch

    from ..artifact import byte_breakdown, load, read_manifest
    from ..bench import bench
    from ..errors import ArtifactError
    from ..models import build_model

    manifest = read_manifest(artifact_dir)
    name = model or (manifest.get("recipe") or {}).get("model")
    if not name:
        raise ArtifactError(f"{artifact_dir}/manifest.json: no recipe.model recorded; pass --model")
    split = None
    if data:
        from ..data import load_dataset

        split = load_dataset(data)
    size = split.image_size if split is not None else _image_size(manifest)
    builder = lambda: build_model(name, image_size=size)  # noqa: E731
    after = load(artifact_dir, builder)
    example = split.x_test[:64] if split is not None else torch.randn(64, 1, size, size)
    eval_fn = None
    if split is not None:
        from ..data import accuracy

        eval_fn = lambda m: accuracy(m, split.x_test, split.y_test)  # noqa: E731
    result = bench(builder(), after, example, eval_fn=eval_fn, artifact_dir=artifact_dir, runs=runs,
                   threads=threads)
    baseline = (manifest.get("extra") or {}).get("baseline_accuracy")
    if baseline is not None and eval_fn is not None:
        result["before"]["accuracy"] = float(baseline)  # the trained dense model, not the random one
        result["ratios"]["accuracy_delta"] = result["after"]["accuracy"] - float(baseline)
    elif eval_fn is not None:
        result["before"].pop("accuracy", None)  # a randomly initialised dense model's accuracy means nothing
        result["ratios"].pop("accuracy_delta", None)
    result.update(model=name, artifact=str(artifact_dir), manifest_bytes=manifest.get("bytes"),
                  breakdown=byte_breakdown(manifest))
    return result


def latency_note(result: dict) -> str:
    """How the latencies were taken, and any side whose interleaved and alone medians disagree."""
    from ..deploy.timing import Timing, describe

    timings = [Timing(**t) for t in result.get("timing", {}).values()]
    return "latency: " + ("; ".join(f"batch {k[1:]}: {describe(t)}" for k, t in zip(result.get("timing", {}), timings))
                          or "not measured")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_command(
        artifact_dir: Path = typer.Argument(..., help="Directory written by save() / compress."),
        model: Optional[str] = typer.Option(None, "--model", help="lenet300 | lenet5 | resnet (default: from the manifest)."),
        data: Optional[str] = typer.Option(None, "--data", help="'digits' or an MNIST .npz; enables accuracy."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measurements as JSON here."),
        runs: int = typer.Option(50, "--runs", min=1, help="Timed runs per batch size (median reported)."),
        threads: int = typer.Option(1, "--threads", min=1, help="Threads for both sides (PyTorch and ONNX Runtime)."),
    ) -> None:
        """Parameters, MACs, bytes on disk, latency (batch 1 and 64) and accuracy: dense vs artifact;
        then where the weights file's bytes go (values, indices, scales, biases, other, container)."""
        from rich.console import Console

        from ..bench import render_breakdown, render_table

        result = run_bench(artifact_dir, model, data, runs, threads)
        console = Console()
        console.print(render_table(result))
        console.print(latency_note(result))
        console.print(render_breakdown(result["breakdown"]))
        if json_out is not None:
            from ..io import atomic_write_text

            atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")

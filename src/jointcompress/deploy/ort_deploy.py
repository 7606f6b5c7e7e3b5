"""ONNX Runtime fp32 deployment of a finalized model: for each batch size, the graph that runs it fastest.

Why two graphs: the exact pooled-convolution rewrite (deploy.pooled_conv) cuts a pruned
LeNet-5's batch-64 call from 0.49 to 0.31 ms (4/16/64 channels, 1 thread), but adds two nodes,
and at batch 1, where ORT's per-node work rather than arithmetic sets the time, it gains
nothing (15.5 vs 15.1 us) or loses (8/16/64: 18.3 vs 22.0 us). So the deployment keeps the
plain export for batches under `fold_from_batch` and the rewritten graph from there on, both
sessions from the package's one factory (threads set, spinning off), both bound with IOBinding.
`runtime` records which graph serves which batches, with the settings, for every result that
times the deployment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .timing import DEFAULT_THREADS

FOLD_FROM_BATCH = 8  # batches from here on run the rewritten graph (measured: batch 1 gains nothing)


@dataclass
class OrtDeployment:
    """The exported graphs and which batches each serves."""

    plain: Path
    folded: Path | None  # None: nothing in the model fits or pays (deploy.pooled_conv)
    folded_convs: list[str] = field(default_factory=list)
    fold_from_batch: int = FOLD_FROM_BATCH
    threads: int = DEFAULT_THREADS

    def runtime(self) -> dict:
        import onnxruntime as ort

        large = (f"pooled convolutions folded ({', '.join(self.folded_convs)}; deploy.pooled_conv)"
                 if self.folded is not None else "the plain export (no convolution to fold)")
        return {"runtime": f"onnxruntime {ort.__version__} CPU fp32, graph optimization level all (NCHWc)",
                "threads": self.threads, "spinning": "off", "io_binding": True,
                f"batch < {self.fold_from_batch}": "the plain export",
                f"batch >= {self.fold_from_batch}": large}

    def predict(self):
        """A torch -> torch function that runs each batch on its graph's session (IOBinding)."""
        from .onnx_export import bound_predict, ort_session

        small = bound_predict(ort_session(self.plain, self.threads))
        if self.folded is None:  # one graph serves every batch
            small.runtime = self.runtime()
            return small
        large, fold_from = bound_predict(ort_session(self.folded, self.threads)), self.fold_from_batch

        def predict(x: torch.Tensor) -> torch.Tensor:
            return large(x) if x.shape[0] >= fold_from else small(x)

        predict.session, predict.runtime = small.session, self.runtime()
        return predict

    def graph_for(self, batch: int) -> Path:
        """The file that serves a batch of this size."""
        return self.folded if self.folded is not None and batch >= self.fold_from_batch else self.plain


def deploy_fp32(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                threads: int = DEFAULT_THREADS, fold_from_batch: int = FOLD_FROM_BATCH,
                block: int | None = None) -> OrtDeployment:
    """Export `model` to `path` and, next to it (`<stem>.folded.onnx`), the rewritten graph when
    any pooled convolution folds; returns the deployment (call `.predict()` to run it)."""
    from .onnx_export import export_onnx

    return deploy_onnx(export_onnx(model, path, example_input), threads, fold_from_batch, block)


def deploy_onnx(path: str | os.PathLike, threads: int = DEFAULT_THREADS, fold_from_batch: int = FOLD_FROM_BATCH,
                block: int | None = None) -> OrtDeployment:
    """The deployment of an exported fp32 file (deploy_fp32 without the export)."""
    import onnx

    from .pooled_conv import rewrite_pooled_convs

    path = Path(path)
    graph = onnx.load(str(path))
    folded_convs = rewrite_pooled_convs(graph, block)
    folded = None
    if folded_convs:
        folded = path.with_name(f"{path.stem}.folded.onnx")
        tmp = folded.with_name(f".{folded.name}.tmp")
        onnx.save(graph, str(tmp))
        os.replace(tmp, folded)
    return OrtDeployment(path, folded, folded_convs, fold_from_batch, threads)

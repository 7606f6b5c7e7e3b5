"""Export a (possibly pruned) classifier as a standard HF folder.

The folder holds config.json, model.safetensors and the tokenizer, so it loads with
AutoModelForSequenceClassification.from_pretrained and pipeline("text-classification" /
"sentiment-analysis"). Unpruned or uniformly shrunk models (e.g. students with fewer
layers) are saved as the stock class and load anywhere. Models with per-layer widths
use the pruned model_type; they load
  * with jointcompress installed: after `import jointcompress.hf` (registers the classes);
  * without it: with trust_remote_code=True, because the folder carries a copy of
    modeling_pruned.py and config.auto_map points at it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from jointcompress.errors import ArtifactError
from jointcompress.hf import modeling_pruned
from jointcompress.hf.int8 import baked_copy
from jointcompress.hf.pruned import is_pruned_class
from jointcompress.techniques.quant_lsq import has_training_hooks, rounded_inputs


def warn_input_rounding(model: nn.Module, stacklevel: int = 3) -> None:
    """A transformers folder (export_folder, save_pretrained, CompressionTrainer.save_model) has no place for the
    input rounding quant_lsq activations: true trained with."""
    rounded = rounded_inputs(model)
    if rounded:
        warnings.warn(f"the transformers folder does not round the inputs of {len(rounded)} layers as training did "
                      f"(quant_lsq activations: true, e.g. {rounded[0]}), so its logits differ a little from the "
                      "finalized model's; the packed artifact (load_hf_artifact) keeps the rounding",
                      stacklevel=stacklevel)


def check_config_builds(model: nn.Module, what: str) -> None:
    """A transformers folder is loaded by building the model's class from its config.json: a model whose
    layers that config would build at other shapes (a vision model's channels removed by prune_structured,
    which no stock config can express) wrote a folder from_pretrained refused with a size mismatch, or with
    ignore_mismatched_sizes loaded those layers at random. Refused before writing, naming the saves that
    keep the widths. The class is built on the meta device: no memory, no weights initialised."""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception:  # noqa: BLE001 - a class not built from its config alone: nothing to compare against
        return
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    misfit = next(((k, tuple(v.shape)) for k, v in model.state_dict().items()
                   if k in shapes and shapes[k] != tuple(v.shape)), None)
    if misfit is not None:
        raise ArtifactError(
            f"{what}: {misfit[0]} is {misfit[1]} but {type(model).__name__}'s config builds it as {shapes[misfit[0]]} "
            "(channels or units removed that the config cannot record), so from_pretrained could not load the folder. "
            "Save it with jointcompress.artifact.save(model, spec, path, builder=..., example_inputs=...), which "
            "records the pruning and rebuilds the widths (docs/your-model.md), or deploy it through ONNX "
            "(jointcompress.deploy.export_and_check)")


def export_folder(model: nn.Module, tokenizer, out_dir: str | Path, *, remote_code: bool = True) -> Path:
    """Write model + tokenizer to out_dir; returns the folder.

    Refuses a model that still has mask hooks attached (the saved weights would not
    reproduce the masked outputs): call prune_heads / prune_ffn and remove the hooks first.
    Fake-quant parametrizations are saved as their current values (a baked copy; the
    model passed in is not changed).
    """
    if has_training_hooks(model):
        raise ArtifactError(
            "model still has forward pre-hooks (training masks); prune physically and remove the "
            "hook handles before export"
        )
    if tokenizer is None:
        raise ArtifactError("export needs the tokenizer so pipeline() works; pass the one used for training")
    from jointcompress.hf.artifact import check_tokenizer_fits

    check_tokenizer_fits(model, tokenizer)
    warn_input_rounding(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = baked_copy(model) if any(hasattr(m, "parametrizations") for m in model.modules()) else model
    check_config_builds(model, "export_folder")
    model.save_pretrained(out, safe_serialization=True)
    if remote_code:
        add_remote_code(model, out)
    tokenizer.save_pretrained(out)
    return out


def add_remote_code(model: nn.Module, folder: str | Path) -> None:
    """A folder of a pruned class (per-layer widths) loads without jointcompress only with trust_remote_code=True
    and a copy of modeling_pruned.py that its config.json's auto_map points at: both added to a folder that
    save_pretrained wrote (modeling_pruned.write_remote_code; the pruned classes' own save_pretrained does it too).
    Nothing for a stock class."""
    if is_pruned_class(model):
        modeling_pruned.write_remote_code(model, folder)


def folder_bytes(path: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.onnx", "*.pt")) -> int:
    """Bytes of the weight files in a folder (what dominates artifact size)."""
    return sum(f.stat().st_size for p in patterns for f in Path(path).glob(p))


def load_pipeline(path: str | Path, task: str = "text-classification", **kwargs):
    """pipeline(task, model=path) with the pruned classes registered; CPU."""
    from transformers import pipeline

    return pipeline(task, model=str(path), tokenizer=str(path), device="cpu", **kwargs)

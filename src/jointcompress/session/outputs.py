"""Any output, any batch: what the session needs to read from the user's model and data.

Models return a tensor, a tuple, a dict or a Hugging Face `ModelOutput`; loaders yield
`(x, y[, index])` tuples or dicts (`input_ids`, `attention_mask`, `labels`, ...). The session
reads the logits, the labels, the sample index (teacher-logit cache) and the token mask
(token-level distillation) from either, so techniques see one shape of the world.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..model_call import call_model  # noqa: F401 -- re-exported: the session's way to run the model

INDEX_KEYS = ("index", "idx")  # a dict batch's sample index: for the teacher cache, never fed to the model
LABEL_KEYS = ("labels", "label")


@dataclass
class Batch:
    """One batch, split: `inputs` is what the model is called with (a tensor, a tuple of positional
    tensors, or a dict of keyword tensors); `targets` the labels (None when the batch has none)."""

    inputs: Any
    targets: torch.Tensor | None = None
    index: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None  # [batch, tokens]: 1 for real tokens (attention_mask)

    @property
    def teacher_inputs(self) -> Any:
        """The inputs without the labels: a teacher has no loss to compute."""
        if isinstance(self.inputs, dict):
            return {k: v for k, v in self.inputs.items() if k not in LABEL_KEYS}
        return self.inputs


def split_batch(batch, warn: bool = True) -> Batch:
    """(x, y[, index]) tuples, dicts (HF style, labels kept in the inputs as HF models expect)
    or a bare input tensor. `warn=False`: what it says of the batch is left to session.loss, which says it once."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Mapping):  # a dict, or a mapping such as what a tokenizer or DataCollatorWithPadding returns
        batch = dict(batch)
        inputs = {k: v for k, v in batch.items() if k not in INDEX_KEYS}
        targets = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        index = next((batch[k] for k in INDEX_KEYS if k in batch), None)
        mask = batch.get("attention_mask")  # else the labelled positions, as a tuple batch's (padding only in labels)
        return Batch(inputs, targets, index, mask if mask is not None else _labelled_positions(targets))
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("train_data: an empty batch; batches are (inputs, labels[, index]) or dicts")
        if warn and len(batch) == 3 and _looks_like_ids_mask_labels(*batch):
            warnings.warn("train_data: a batch of three tensors is read as (inputs, labels, sample index), and this one "
                          "looks like (input_ids, attention_mask, labels): the mask would be the labels and the labels "
                          "the index. Give ((input_ids, attention_mask), labels) or dict batches", stacklevel=3)
        labels = batch[1] if len(batch) > 1 else None
        return Batch(batch[0], labels, batch[2] if len(batch) > 2 else None, _labelled_positions(labels))
    if isinstance(batch, torch.Tensor):
        return Batch(batch)
    raise DataError(
        f"train_data: a batch of type {type(batch).__name__}; give (inputs, labels[, index]) tuples or dicts of tensors"
    )


def is_encoder_decoder(model) -> bool:
    """A Hugging Face encoder-decoder (T5, BART, Marian, ...): its logits are the decoder's positions."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_inputs(model, batch: Batch):
    """The teacher's inputs for an encoder-decoder model: without the labels its decoder had no inputs
    (T5 raised, BART read its decoder inputs off the encoder's and distilled the wrong positions), so
    they are made from the labels as the model makes its own (shifted right after the start token)."""
    inputs = batch.teacher_inputs
    if (not is_encoder_decoder(model) or not isinstance(inputs, dict) or batch.targets is None
            or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs):
        return inputs
    make = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if make is None:
        raise DataError(f"train_data: {type(model).__name__} is an encoder-decoder model; give the batches "
                        "'decoder_input_ids' beside the labels (the teacher needs its decoder's inputs)")
    return {**inputs, "decoder_input_ids": make(labels=batch.targets)}


def decoder_token_mask(batch: Batch) -> torch.Tensor | None:
    """An encoder-decoder batch's real decoder positions: its decoder_attention_mask, else the labels that
    are not -100 (its attention_mask is the encoder's, over other positions)."""
    inputs = batch.inputs if isinstance(batch.inputs, dict) else {}
    if inputs.get("decoder_attention_mask") is not None:
        return inputs["decoder_attention_mask"]
    labels = batch.targets
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        return labels != -100
    return None


def _labelled_positions(labels) -> torch.Tensor | None:
    """A tuple batch's token mask: its [batch, tokens] labels' positions other than -100 (padding, ignored),
    so token-level distillation averages over the real tokens as it does with a dict batch's attention_mask."""
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        ignored = labels == -100
        if bool(ignored.any()):
            return ~ignored
    return None


def _looks_like_ids_mask_labels(first, second, third) -> bool:
    """Integer inputs, a 0/1 tensor of their shape, a 1-D third: a TensorDataset(input_ids, attention_mask,
    labels) flattened into one batch, whose mask the (x, y, index) reading takes for the labels."""
    tensors = all(isinstance(t, torch.Tensor) for t in (first, second, third))
    return (tensors and first.dim() == 2 and not first.is_floating_point() and second.shape == first.shape
            and third.dim() == 1 and bool(((second == 0) | (second == 1)).all()))


def logits_of(outputs, whose: str = "model") -> torch.Tensor:
    """The logits in a model's outputs: the tensor itself, `.logits` of a ModelOutput or dict,
    or the first tensor of a tuple with at least one axis (HF's return_dict=False puts a
    scalar loss first). `whose`: "teacher" where they are the teacher's (what a tuple is said to mean)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
        if logits is None:
            raise DataError(f"model outputs: a dict with keys {sorted(outputs)} and no 'logits'; return the logits "
                            "under 'logits' (distill_kd needs them), or, without distill_kd, give the session a "
                            "loss_fn (or session.loss(..., task_loss=...)) of your own")
    if logits is None and isinstance(outputs, (tuple, list)):
        tensors = [o for o in outputs if isinstance(o, torch.Tensor) and o.dim() >= 1]
        logits = tensors[0] if tensors else None
        if len(tensors) > 1 and whose == "teacher":  # a frozen teacher's other outputs train nothing
            shapes = ", ".join(str(list(t.shape[1:])) for t in tensors[:3])
            said_once_per_run(f"teacher outputs: a {type(outputs).__name__} of {len(tensors)} tensors (per sample "
                              f"{shapes}); the first is read as its logits, which distillation matches; where they "
                              "are another output, make the teacher return them first (or a dict with 'logits')")
        elif len(tensors) > 1:  # (embedding, logits) trained the embedding as the logits, silently
            shapes = ", ".join(str(list(t.shape[1:])) for t in tensors[:3])
            said_once_per_run(f"model outputs: a {type(outputs).__name__} of {len(tensors)} tensors (per sample "
                              f"{shapes}); the first is read as the logits, and the others get no task loss and no "
                              "distillation: a second head drifts as the layers it shares are compressed. Distil it "
                              "too with distill_kd.features (a pair naming the head's module in student and teacher, "
                              "e.g. {student: aux, teacher: aux}) or give a loss_fn that covers it; where the logits "
                              "are another output, return them first (or a dict with 'logits')")
    if not isinstance(logits, torch.Tensor):
        raise DataError(f"model outputs of type {type(outputs).__name__} hold no logits tensor; return a tensor, "
                        "a tuple, a dict with 'logits' or a transformers ModelOutput")
    return logits


_SAID: set[str] = set()  # what said_once_per_run said since the run began (new_run)


def said_once_per_run(message: str) -> None:
    """A warning about every batch, said once a run. Python's own once-per-place memory is reset whenever a
    filter changes (catch_warnings with a filter), which the size budget's measurements of the file do on every
    calibration: a model returning a tuple got this line 37 times in 12 steps."""
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, UserWarning, stacklevel=4)


def new_run() -> None:
    """A session starts: its warnings about the model's outputs are said again, once."""
    _SAID.clear()


def model_loss(outputs) -> torch.Tensor | None:
    """The loss a model computed itself (HF models given `labels`), else None."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, dict):
        loss = outputs.get("loss")
    return loss if isinstance(loss, torch.Tensor) else None


def described(value) -> str:
    """A loss that is no scalar tensor, as its error names it: its shape, or its type."""
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def check_scalar_loss(loss, what: str = "loss_fn returned") -> None:
    """A loss_fn (or session.loss's task_loss) must be one number to minimize, as a tensor: a per-sample
    loss (reduction='none') failed later inside float() or autograd ("grad can be implicitly created
    only for scalar outputs"), and a Python number (loss.item()) in the coordinator, naming neither."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DataError(f"{what} {described(loss)}; give a scalar tensor with its graph (reduce a per-sample loss with "
                        ".mean(), or use the loss's reduction='mean'; not loss.item(), which has no gradient)")


def _check_soft_labels(y: torch.Tensor) -> None:
    """Float labels of the logits' shape are read as class probabilities: rows that do not sum to 1 are not
    (multi-label 0/1 targets: cross-entropy then trained a softmax over them, silently)."""
    sums = y.detach().float().sum(-1)
    if not bool(((sums - 1).abs() <= 1e-3).all()) or bool((y < 0).any()):
        raise DataError(f"the labels are floats of the logits' shape {tuple(y.shape)}, read as class probabilities "
                        f"(soft labels), but their rows sum to {float(sums.min()):.3g}..{float(sums.max()):.3g}, not 1 "
                        "(multi-label targets?); pass loss_fn=lambda outputs, batch: "
                        "F.binary_cross_entropy_with_logits(outputs, batch[1]), or the loss your task needs")


def default_task_loss(outputs, batch: Batch) -> torch.Tensor:
    """The model's own loss if it computed one, else cross-entropy of the logits against the
    labels: [batch, classes] with [batch], [batch, tokens, vocab] with [batch, tokens]
    (label -100 ignored, no shift: a causal LM that shifts computes its own loss), dense
    predictions [batch, classes, H, W(, D)] with [batch, H, W(, D)] (a segmentation map), or
    float soft labels [batch, classes]; other float labels (regression) need a loss_fn."""
    own = model_loss(outputs)
    if own is not None:
        return own
    logits, y = logits_of(outputs), batch.targets
    if y is None:
        raise DataError("the batch has no labels and the model returned no loss; pass loss_fn=lambda outputs, batch: ... "
                        "(or give session.loss a task_loss)")
    if torch.is_floating_point(y):
        if logits.dim() == 2 and logits.shape[1] > 1 and tuple(y.shape) == tuple(logits.shape):  # soft labels
            _check_soft_labels(y)
            return F.cross_entropy(logits, y)
        raise DataError(f"the labels are floats of shape {tuple(y.shape)} (regression targets?) and the model's outputs "
                        f"{tuple(logits.shape)}; the default task loss is cross-entropy on class indices, or on soft "
                        "labels [batch, classes]. Pass loss_fn=lambda outputs, batch: F.mse_loss(outputs, batch[1]), "
                        "or the loss your task needs")
    if y.dtype not in (torch.long, torch.uint8):  # int32 class indices (a loader's own dtype): cross-entropy takes long
        y = y.long()
    if logits.dim() == 3 and _labels_are_the_inputs(batch.inputs, y):
        # a warning, not a refusal: a model that shifts inside (causal padding: WaveNet, PixelCNN) is trained so
        warnings.warn(
            f"the labels {tuple(y.shape)} are the input token ids themselves: the default task loss compares the logits "
            "at each position with the label at that position (no shift), so a causal LM learns to repeat the token it "
            "is given. Pass dict batches {'input_ids': ..., 'attention_mask': ..., 'labels': ...} (the model's own loss "
            "shifts them), or shift them yourself: (ids[:, :-1], ids[:, 1:]); a model that shifts inside (causal "
            "padding) is trained as meant: pass loss_fn to say so", UserWarning, stacklevel=3)
    try:
        return _index_cross_entropy(logits, y)
    except IndexError as exc:  # a label outside the model's classes: torch's "Target 5 is out of bounds"
        classes = logits.shape[-1] if logits.dim() == 3 else logits.shape[1]
        raise DataError(f"the labels run from {int(y.min())} to {int(y.max())}, but the model has {classes} outputs "
                        f"(classes 0..{classes - 1}); build the model for every class of the data, or map the labels "
                        "onto 0..classes-1 (-100 marks a position to ignore)") from exc


def padding_is_labelled(batch: Batch) -> bool:
    """A dict batch whose token labels are not -100 where its attention_mask is 0 (labels copied from input_ids
    with the padding left in): the model's own loss counts those positions, so it learns that padding follows
    padding, while a token-level distillation averages over the attention mask only."""
    inputs, y = batch.inputs, batch.targets
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if not isinstance(mask, torch.Tensor) or not isinstance(y, torch.Tensor) or y.is_floating_point():
        return False
    return tuple(mask.shape) == tuple(y.shape) and bool(((mask == 0) & (y != -100)).any())


def _labels_are_the_inputs(inputs, y: torch.Tensor) -> bool:
    """Token labels equal to the input ids (the padding's -100 aside): a causal LM's (ids, ids) batch, which
    Hugging Face models shift inside their own loss, and an unshifted cross-entropy trains to copy the input."""
    if not isinstance(inputs, torch.Tensor) or inputs.shape != y.shape or torch.is_floating_point(inputs):
        return False
    real = y != -100
    return bool(real.any()) and bool((inputs[real] == y[real]).all())


def _index_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits against class indices, by the shapes default_task_loss names."""
    if logits.dim() == 2 and y.dim() == 1 and len(y) == len(logits):
        return F.cross_entropy(logits, y)
    if logits.dim() == 3 and y.dim() == 2 and tuple(y.shape) == tuple(logits.shape[:2]):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    if logits.dim() > 3 and tuple(y.shape) == (logits.shape[0], *logits.shape[2:]):
        return F.cross_entropy(logits, y, ignore_index=-100)
    classes_second = logits.dim() == 3 and tuple(y.shape) == (logits.shape[0], logits.shape[2])
    raise DataError(
        f"the model's logits have shape {tuple(logits.shape)} and the labels {tuple(y.shape)}; the default task loss is "
        "cross-entropy on [batch, classes] logits with [batch] labels, [batch, tokens, vocab] with [batch, tokens], or "
        "[batch, classes, H, W] with [batch, H, W]. "
        + ("These read as [batch, classes, positions] (a 1-D dense prediction, F.cross_entropy's layout): 3-D logits "
           "are [batch, positions, classes] here, in the task loss and in distillation, so return "
           "logits.transpose(1, 2) from the model. " if classes_second else "")
        + "Pass loss_fn=lambda outputs, batch: ... for any other loss"
    )


def first_rows(inputs, n: int = 2):
    """The first n rows of the inputs (an example for tracing and shape checks)."""
    if isinstance(inputs, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(v[:n] for v in inputs)
    return inputs[:n]


def describe(inputs) -> str:
    """Shapes and dtypes of the inputs, for error messages."""
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, torch.Tensor):
        return f"{tuple(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    return type(inputs).__name__

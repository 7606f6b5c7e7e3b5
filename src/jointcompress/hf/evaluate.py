"""Logits and accuracy of an HF classifier over tokenized rows (keyword inputs, row order kept)."""

from __future__ import annotations

import torch

from ..model_call import call_model
from .data import trimmed_length


@torch.no_grad()
def predict_logits(model: torch.nn.Module, tensors: dict[str, torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    """Logits for every row, in the original row order, with the model in eval mode.

    Rows are processed sorted by length so each batch is trimmed to similar lengths
    (several times cheaper on short-sentence data than random batches), then put back.
    """
    was_training = model.training
    model.eval()
    order = torch.argsort(tensors["attention_mask"].sum(1), stable=True)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tensors]
    outs = []
    for start in range(0, order.numel(), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: tensors[k][idx] for k in keys}
        length = trimmed_length(batch["attention_mask"])
        batch = {k: v[:, :length] for k, v in batch.items()}
        outs.append(call_model(model, batch).logits.float().cpu())  # rows to the model's device, logits back
    model.train(was_training)
    logits = torch.empty(order.numel(), outs[0].shape[-1])
    logits[order] = torch.cat(outs)
    return logits


def accuracy(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> float:
    """Fraction of rows whose argmax logit equals the label."""
    logits = predict_logits(model, tensors)
    return float((logits.argmax(-1) == tensors["labels"].cpu()).float().mean())

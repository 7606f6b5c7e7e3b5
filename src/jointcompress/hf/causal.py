"""Causal language models (GPT-2, Llama / Mistral with grouped-query attention) for the session.

What a causal LM needs beyond a classifier:
- GPT-2 keeps its projections in transformers' `Conv1D` (x @ W + b with W stored [in, out]);
  `conv1d_to_linear` swaps each for the `nn.Linear` computing the same (W transposed), so
  masks and LSQ (which act on Linear layers) apply, and the swap is exact.
- Its LM head is usually tied to the input embedding: pruning or quantizing `lm_head` would
  also change the embedding when finalize bakes the weight, so `tied_weights` names such
  layers and the recipe checks refuse them (exclude `lm_head`).
- The task loss is the model's own shifted next-token loss (pass `labels`); distillation is
  token-level over the attention mask (techniques/distill_kd.token_kd_loss).
- `perplexity` measures it on held-out token rows.
- `arithmetic_rows` makes token rows a tiny LM learns in a few epochs, so the causal path can be
  tried (tests, examples) without downloading a corpus.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import nn

from jointcompress.errors import UnsupportedModelError
from jointcompress.model_call import model_device, to_device
from jointcompress.session.checks import is_conv1d, tied_weights  # noqa: F401 - part of this module's API


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers Conv1D by an equivalent nn.Linear, in place; returns model. A
    GPT2LMHeadModel becomes hf.modeling_pruned's JCGPT2LMHeadModel (model_type jointcompress_gpt2), whose
    class builds Linear projections: saved with save_pretrained, the stock class read the transposed weights
    as Conv1D ones."""
    from jointcompress.hf.modeling_pruned import linear_projections
    from jointcompress.hf.pruned import mark_pruned

    linear_projections(model)
    if type(model).__name__ == "GPT2LMHeadModel":
        mark_pruned(model)
    else:  # its class builds Conv1D: trained and exported to ONNX, yes; saved and loaded, no
        warnings.warn(f"conv1d_to_linear: {type(model).__name__} keeps its transformers class, which builds Conv1D "
                      "projections, so after compression neither save_pretrained nor save_hf_artifact writes a model "
                      "that loads (only GPT2LMHeadModel has a class with Linear projections); deploy it through ONNX "
                      "(jointcompress.deploy.export_and_check)", UserWarning, stacklevel=2)
    return model


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) over the real tokens of the rows (eval mode, restored). Each
    token's position counts the real tokens before it (as generate() numbers them), so a left-padded row
    reads as the same row right-padded."""
    was = model.training
    model.eval()
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i:i + batch_size]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[i:i + batch_size]
        ids, mask = to_device((ids, mask), model_device(model))  # the rows go where the model is
        positions = {"position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)} if takes_positions else {}
        logits = model(input_ids=ids, attention_mask=mask, **positions).logits[:, :-1]
        target = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)  # read from a real token
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
    model.train(was)
    return math.exp(total / max(1, count))


def arithmetic_rows(n: int, seed: int, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` rows of arithmetic sequences (start + k * step mod 61, shifted past the special ids
    0-2), every 4th row padded with id 0 after 12 tokens; returns (input_ids, attention_mask).
    Needs a vocabulary of at least 64 ids."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(3, 64, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids = 3 + (start + step * torch.arange(length)) % 61
    mask = torch.ones_like(ids)
    mask[::4, 12:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def with_ffn_widths(build, widths: list[int]):
    """A builder for the packed artifact of a model whose FFN neurons were removed: the stock
    architecture from `build()`, each layer's MLP shrunk to `widths` (the loaded weights then
    fill it). `widths` is `model.config.intermediate_per_layer` after finalize."""
    from jointcompress.hf.modeling_pruned import keep_neurons, family, layers

    def builder():
        model = build()
        conv1d = next((n for n, m in model.named_modules() if is_conv1d(m)), None)
        if conv1d is not None:  # the shapes did not match, in a RuntimeError from deep inside
            raise UnsupportedModelError(f"with_ffn_widths: build() returned a model whose '{conv1d}' is a transformers "
                                        "Conv1D (GPT-2 as transformers builds it); the compressed model's layers are "
                                        "Linear: return conv1d_to_linear(model) from build()")
        fam = family(model.config)
        for layer, width in zip(layers(model), widths):
            keep_neurons(layer, fam, torch.arange(int(width)))
        return model

    return builder

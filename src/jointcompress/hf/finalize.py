"""Make a jointly compressed HF classifier permanent: bake, then remove units physically.

After `api.compress` the HF model still carries the training machinery: forward pre-hooks
multiplying head / FFN-neuron masks in, and LSQ fake-quant parametrizations on its Linear
weights. finalize_hf
  1. removes the mask hooks (prune_heads / prune_ffn techniques),
  2. removes every parametrization with leave_parametrized=True, so each weight becomes its
     fake-quantized value (on the LSQ grid: at most 2^b distinct values per row),
  3. physically removes the masked heads and neurons (prune_heads / prune_ffn in
     jointcompress.hf), which switches the model to the `jointcompress_bert` /
     `jointcompress_distilbert` classes that save and load per-layer widths.
The result is a plain HF model whose eval-mode logits equal the masked model's.

What is not kept: the LSQ step sizes and bit-widths (the core `finalize.finalize` records them
in a CompressionSpec for the packed artifact). For HF the baked fp32 weights are exported as a
standard folder and int8 deployment goes through ONNX Runtime dynamic int8, which chooses its
own (per-channel) scales, as benchmarks/hf_sst2.py does.
"""

from __future__ import annotations

import torch
from torch import nn

from jointcompress.hf.int8 import bake_parametrizations
from jointcompress.hf.wrapper import unwrap


@torch.no_grad()
def finalize_hf(model: nn.Module, techniques: list) -> nn.Module:
    """Finalize in place (model: a SequenceClassifier or the HF model); returns the HF model.

    `techniques`: `Result.techniques` from api.compress (the prune_heads / prune_ffn ones are
    read; others are ignored).
    """
    from jointcompress.hf.ffn import prune_ffn
    from jointcompress.hf.heads import prune_heads

    hf = unwrap(model)
    units = {t.kind: t for t in techniques if t.kind in ("prune_heads", "prune_ffn") and getattr(t, "mask", None) is not None}
    kept = {kind: t.kept() for kind, t in units.items()}
    for t in units.values():
        t.detach()
    _drop_input_quant(hf)
    bake_parametrizations(hf)
    if "prune_heads" in kept:
        prune_heads(hf, kept["prune_heads"])
    if "prune_ffn" in kept:
        prune_ffn(hf, kept["prune_ffn"])
    return hf


def _drop_input_quant(model: nn.Module) -> None:
    """LSQ activation quantizers (quant_lsq activations: true) are hooks; remove them too."""
    for m in model.modules():
        if hasattr(m, "input_quant"):
            for hid, hook in list(m._forward_pre_hooks.items()):
                if getattr(hook, "__name__", "") == "_quantize_input":
                    del m._forward_pre_hooks[hid]
            del m.input_quant

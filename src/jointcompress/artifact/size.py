"""Size accounting in the Deep Compression sense: values + indices + scales + everything else.

The numbers come from the very encoder `save` uses (`encode.encode_model`), so
`storage_bytes(model, spec)` equals the parts written to weights.safetensors byte for byte;
only the safetensors header (tensor names and offsets, reported separately by `save`) is
on top. The baseline for "N x smaller" is `dense_fp32_bytes`: the same model's fp32 state
dict saved with safetensors, i.e. what one would ship without jointcompress.
"""
from __future__ import annotations

import torch.nn as nn

from ..spec import CompressionSpec
from .encode import encode_model


def storage_bytes(model: nn.Module, spec: CompressionSpec, entropy: bool = True) -> dict:
    """Bytes per part: {"values", "indices", "scales", "other", "total", "layers": {name: {...}}}."""
    enc = encode_model(model, spec, entropy=entropy)
    out = enc.totals()
    out["layers"] = {
        name: {
            "bits": rec["bits"],
            "encoding": rec["encoding"],
            "sparsity": rec["sparsity"],
            "bytes": sum(p["bytes"] for p in rec["parts"].values()),
            "dense_fp32_bytes": rec["numel"] * 4,
        }
        for name, rec in enc.layers.items()
    }
    return out


def dense_fp32_bytes(model: nn.Module) -> int:
    """Size of the model's state dict as an fp32 safetensors file (floating tensors cast to fp32)."""
    from safetensors.torch import save as st_save

    state = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    return len(st_save(state))

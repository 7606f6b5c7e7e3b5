"""Size accounting in the Deep Compression sense: values + indices + scales + biases + the rest.

The numbers come from the very encoder `save` uses (`encode.encode_model`), so
`storage_bytes(model, spec)` equals the parts written to the weights file byte for byte, and
`byte_breakdown(manifest)` splits a saved file into parts that sum exactly to its size (the
container's own bytes included). The baseline for "N x smaller" is `dense_fp32_bytes`: the same
model's fp32 state dict saved with safetensors, i.e. what one would ship without jointcompress.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..spec import CompressionSpec
from .encode import BREAKDOWN_PARTS, encode_model, unique_state

KINDS = ("values", "indices", "scales", "biases", "other", "container")
_KIND_OF_PART = {"values": "values", "indices": "indices", "scale": "scales", "bias": "biases"}


def storage_bytes(model: nn.Module, spec: CompressionSpec, entropy: bool = True) -> dict:
    """Bytes per part: {"values", "indices", "scales", "biases", "other", "total", "layers": {...}}."""
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


def byte_breakdown(manifest: dict) -> dict:
    """Where the weights file's bytes go, per layer and per kind; sums exactly to the file size.

    Returns {"rows": {row name: {kind: bytes}}, "kinds": {kind: bytes}, "file": bytes} with kinds
    values / indices / scales / biases / other / container. Rows are the quantized layers, then
    "(other tensors)" and "(container)". Works for every manifest version `read_manifest` reads.
    """
    rows: dict[str, dict[str, int]] = {}
    for name, rec in manifest["layers"].items():
        row = dict.fromkeys(KINDS, 0)
        for part, prec in rec["parts"].items():
            row[_KIND_OF_PART[part]] += int(prec["bytes"])
        rows[name] = row
    other = sum(int(r.get("bytes", 0)) for r in manifest["other_tensors"].values())
    rows["(other tensors)"] = {**dict.fromkeys(KINDS, 0), "other": other}
    stored = sum(sum(r.values()) for r in rows.values())
    rows["(container)"] = {**dict.fromkeys(KINDS, 0), "container": int(manifest["weights_file_bytes"]) - stored}
    kinds = {k: sum(r[k] for r in rows.values()) for k in KINDS}
    return {"rows": rows, "kinds": kinds, "file": int(manifest["weights_file_bytes"])}


def format_breakdown(breakdown: dict) -> list[list[str]]:
    """The breakdown as table rows (header first), with a share column, for CLIs and reports."""
    total = max(1, breakdown["file"])
    table = [["part", *KINDS, "total", "%"]]
    for name, row in list(breakdown["rows"].items()) + [("all", breakdown["kinds"])]:
        t = sum(row.values())
        table.append([name, *[f"{row[k]:,}" for k in KINDS], f"{t:,}", f"{100 * t / total:.1f}"])
    return table


def floor_detail(model: nn.Module, spec: CompressionSpec) -> str:
    """Where the bytes of a (smallest allowed) artifact go, in words, for error messages:
    each layer's kept weights and their bytes, then the fixed costs."""
    from .store import file_blob

    enc = encode_model(model, spec)
    t = enc.totals()
    container = len(file_blob(enc)) - t["total"]
    layers = sorted(enc.layers.items(), key=lambda kv: -(kv[1]["parts"]["values"]["bytes"]
                                                         + kv[1]["parts"].get("indices", {}).get("bytes", 0)))
    words = [f"{name} keeps {rec['nonzero']:,} of {rec['numel']:,} weights = "
             f"{rec['parts']['values']['bytes'] + rec['parts'].get('indices', {}).get('bytes', 0):,} B"
             for name, rec in layers]
    words.append(f"scales {t['scales']:,} B, biases {t['biases']:,} B, other tensors {t['other']:,} B, "
                 f"container {container:,} B")
    return "; ".join(words)


def dense_fp32_bytes(model: nn.Module) -> int:
    """Size of the model's state dict as an fp32 safetensors file (floating tensors cast to fp32),
    each tensor once (as `safetensors.torch.save_model` stores shared tensors)."""
    from safetensors.torch import save as st_save

    state = {
        k: (v.float() if v.is_floating_point() else v).cpu().contiguous().clone()
        for k, v in unique_state(model)[0].items() if isinstance(v, torch.Tensor)
    }
    return len(st_save(state))


__all__ = ["BREAKDOWN_PARTS", "KINDS", "byte_breakdown", "dense_fp32_bytes", "floor_detail", "format_breakdown",
           "storage_bytes"]

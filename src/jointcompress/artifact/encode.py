"""Turn a finalized model + its CompressionSpec into the named byte tensors of an artifact.

`save` writes exactly what `encode_model` returns and `size.storage_bytes` sums exactly the
same parts, so the size a report claims is the size on disk by construction, not by a
separate estimate that could drift.

Parts per quantized layer (names in the safetensors file):
  ``<layer>.weight.values``  packed b-bit integers (optionally zstd)
  ``<layer>.weight.indices`` bitmask or relative indices (optionally zstd; absent for dense)
  ``<layer>.weight.scale``   fp32 per-output-channel step sizes
Every other state-dict entry (biases, BatchNorm, fp32 layers) is stored as is ("other").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..errors import ArtifactError
from ..spec import CompressionSpec, LayerSpec
from . import packing

PART_SUFFIX = {"values": ".weight.values", "indices": ".weight.indices", "scale": ".weight.scale"}
GRID_TOL = 1e-3  # max |w/scale - round(w/scale)|; fp32 rounding of q*scale is ~1e-7


@dataclass
class Encoding:
    """Everything `save` writes into weights.safetensors, plus the manifest's per-part record."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    others: dict[str, dict] = field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        t = {"values": 0, "indices": 0, "scales": 0, "other": 0}
        for rec in self.layers.values():
            t["values"] += rec["parts"]["values"]["bytes"]
            t["indices"] += rec["parts"].get("indices", {}).get("bytes", 0)
            t["scales"] += rec["parts"]["scale"]["bytes"]
        t["other"] = sum(r["bytes"] for r in self.others.values())
        t["total"] = sum(t.values())
        return t


def integer_weights(name: str, weight: torch.Tensor, ls: LayerSpec) -> tuple[np.ndarray, torch.Tensor]:
    """Recover the integer grid values q (int8) and fp32 scales of one layer's weight.

    Raises ArtifactError when the weight is not on the grid the spec claims: packing it
    anyway would silently change the model.
    """
    w = weight.detach().float().cpu()
    if ls.scale is None:
        raise ArtifactError(f"spec.layers[{name!r}] has bits={ls.bits} but no scale; finalize() must set it")
    scale = torch.as_tensor(ls.scale).detach().float().cpu().reshape(-1)
    if scale.numel() == 1:  # a per-tensor step size: store it per channel so load has one path
        scale = scale.expand(w.shape[0]).clone()
    if scale.numel() != w.shape[0]:
        raise ArtifactError(
            f"spec.layers[{name!r}].scale has {scale.numel()} entries but the weight has "
            f"{w.shape[0]} output channels; the scale must match the (pruned) weight"
        )
    s = scale.view(-1, *([1] * (w.dim() - 1)))
    ratio = torch.where(s != 0, w / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(w))
    q = torch.round(ratio)
    qmax = 2 ** (ls.bits - 1) - 1
    off = (ratio - q).abs().max().item() if w.numel() else 0.0
    if off > GRID_TOL or (q.abs() > qmax).any() or ((s == 0) & (w != 0)).any():
        raise ArtifactError(
            f"weight of layer {name!r} is not on its {ls.bits}-bit grid (max off-grid {off:.3g}, "
            f"max |q| {q.abs().max().item():.0f} > {qmax}?); save the model returned by finalize()"
        )
    return q.to(torch.int8).numpy(), scale


def _quantized_layers(model: nn.Module, spec: CompressionSpec) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name, ls in spec.layers.items():
        if ls.bits is None:
            continue
        mod = modules.get(name)
        if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise ArtifactError(f"spec.layers names {name!r}, which is not a layer with a weight in the model")
        out[name] = mod
    return out


def _part(key: str, data: np.ndarray, entropy: bool) -> tuple[torch.Tensor, dict]:
    raw = int(data.size)
    stored, codec = packing.maybe_zstd(data) if entropy else (np.asarray(data, np.uint8), "raw")
    t = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.uint8).copy())
    return t, {"key": key, "bytes": int(t.numel()), "codec": codec, "raw_bytes": raw}


def encode_model(model: nn.Module, spec: CompressionSpec, entropy: bool = True) -> Encoding:
    """Encode every quantized layer with its smallest sparse format; keep the rest as is."""
    enc = Encoding()
    quantized = _quantized_layers(model, spec)
    skip = {f"{n}.weight" for n in quantized}
    for name, mod in quantized.items():
        ls = spec.layers[name]
        q, scale = integer_weights(name, mod.weight, ls)
        e = packing.encode_ints(q, ls.bits)
        parts = {}
        for part, data in (("values", e.values), ("indices", e.indices)):
            if part == "indices" and e.encoding == "dense":
                continue
            key = name + PART_SUFFIX[part]
            enc.tensors[key], parts[part] = _part(key, data, entropy)
        key = name + PART_SUFFIX["scale"]
        enc.tensors[key] = scale.contiguous().clone()
        parts["scale"] = {"key": key, "bytes": scale.numel() * 4, "codec": "raw", "raw_bytes": scale.numel() * 4}
        nnz = int(np.count_nonzero(q))
        enc.layers[name] = {
            "shape": list(mod.weight.shape),
            "bits": int(ls.bits),
            "numel": int(q.size),
            "nonzero": nnz,
            "sparsity": 1.0 - nnz / max(q.size, 1),
            "encoding": e.encoding,
            "index_bits": e.index_bits,
            "entries": e.entries,
            "act_bits": ls.act_bits,
            "act_scale": None if ls.act_scale is None else float(ls.act_scale),
            "parts": parts,
        }
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        t = t.detach().cpu().contiguous().clone()
        enc.tensors[key] = t
        enc.others[key] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                           "bytes": t.numel() * t.element_size()}
    return enc


def _part_bytes(tensors: dict[str, torch.Tensor], rec: dict, where: str) -> np.ndarray:
    key = rec["key"]
    if key not in tensors:
        raise ArtifactError(f"{where}: tensor {key!r} listed in the manifest is missing")
    t = tensors[key]
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ArtifactError(f"{where}: tensor {key!r} should be 1-D uint8 bytes, it is {t.dtype} {list(t.shape)}")
    data = t.numpy()
    if data.size != rec["bytes"]:
        raise ArtifactError(f"{where}: tensor {key!r} has {data.size} bytes, manifest says {rec['bytes']}")
    if rec["codec"] == "zstd":
        try:
            data = np.frombuffer(packing.zstd_decompress(data.tobytes(), rec["raw_bytes"]), np.uint8)
        except Exception as exc:
            raise ArtifactError(f"{where}: cannot decompress {key!r}: {exc}") from exc
    return data


def decode_layer(name: str, rec: dict, tensors: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weight, fp32 scale) of one quantized layer, exactly q * scale as finalize made it."""
    parts = rec["parts"]
    values = _part_bytes(tensors, parts["values"], where)
    indices = _part_bytes(tensors, parts["indices"], where) if "indices" in parts else np.zeros(0, np.uint8)
    try:
        q = packing.decode_ints(rec["encoding"], rec["bits"], rec["numel"], values, indices,
                                rec["entries"], rec.get("index_bits"))
    except ValueError as exc:
        raise ArtifactError(f"{where}: layer {name!r} cannot be unpacked: {exc}") from exc
    skey = parts["scale"]["key"]
    if skey not in tensors:
        raise ArtifactError(f"{where}: tensor {skey!r} listed in the manifest is missing")
    if tensors[skey].dtype != torch.float32:
        raise ArtifactError(f"{where}: scale tensor {skey!r} should be float32, it is {tensors[skey].dtype}")
    scale = tensors[skey].reshape(-1)
    shape = rec["shape"]
    if scale.numel() != shape[0] or int(np.prod(shape)) != rec["numel"]:
        raise ArtifactError(f"{where}: layer {name!r} scale/shape records are inconsistent")
    q = torch.from_numpy(q.astype(np.float32)).reshape(shape)
    return q * scale.view(-1, *([1] * (len(shape) - 1))), scale

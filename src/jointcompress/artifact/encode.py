"""Turn a finalized model + its CompressionSpec into the named byte parts of an artifact.

`save` writes exactly the parts `encode_model` returns (in the container it is asked for) and
`size.storage_bytes` sums exactly the same parts, so the size a report claims is the size on
disk by construction, not by a separate estimate that could drift.

Parts per quantized layer (keys in the container index, in this order):
  ``<layer>.weight.values``   packed b-bit integers (raw, zstd or ans; layer_codec.py)
  ``<layer>.weight.indices``  bitmask or relative indices (absent for dense)
  ``<layer>.weight.scale``    step sizes, smallest exact format (precision.py)
  ``<layer>.bias``            the layer's bias, smallest exact format (absent without bias)
Every other state-dict entry (BatchNorm, fp32 layers) is stored as is ("other"), in fp16 where
it holds only fp16 values, an integer tensor in the narrowest integer type that holds its values
(bit for bit; the manifest's `loaded_as` names the dtype it loads as).
A state-dict key whose tensor is one already stored under an earlier key (a module registered
under two names, a tied weight) is stored once: `aliases` maps it to that earlier key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import ArtifactError
from ..spec import CompressionSpec, LayerSpec
from . import entropy, layer_codec, precision

PART_SUFFIX = {"values": ".weight.values", "indices": ".weight.indices", "scale": ".weight.scale", "bias": ".bias"}
GRID_TOL = 1e-3  # max |w/scale - round(w/scale)|; fp32 rounding of q*scale is ~1e-7
BREAKDOWN_PARTS = ("values", "indices", "scales", "biases", "other")
_PART_TOTAL = {"values": "values", "indices": "indices", "scale": "scales", "bias": "biases"}


@dataclass
class Encoding:
    """Everything `save` writes into the weights file, plus the manifest's per-part record.

    `parts` holds the stored bytes of every part in file order (layer parts and the raw
    little-endian bytes of every other tensor); `tensors` the other tensors themselves (for
    the safetensors container, which stores them natively).
    """

    parts: dict[str, bytes] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    others: dict[str, dict] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        """Bytes per kind of part; "total" is their sum (the weights file minus its container)."""
        t = dict.fromkeys(BREAKDOWN_PARTS, 0)
        for rec in self.layers.values():
            for part, prec in rec["parts"].items():
                t[_PART_TOTAL[part]] += prec["bytes"]
        t["other"] = sum(r["bytes"] for r in self.others.values())
        t["total"] = sum(t[k] for k in BREAKDOWN_PARTS)
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
    if scale.numel() == 1:  # a per-tensor step size: expanded here, stored once (precision.encode_scale)
        scale = scale.expand(w.shape[0]).clone()
    if scale.numel() != w.shape[0]:
        raise ArtifactError(
            f"spec.layers[{name!r}].scale has {scale.numel()} entries but the weight has "
            f"{w.shape[0]} output channels; the scale must match the (pruned) weight"
        )
    s = scale.view(-1, *([1] * (w.dim() - 1)))
    ratio = torch.where(s != 0, w / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(w))
    q = torch.round(ratio)
    if ls.nonzero_levels and ls.bits > 7:
        raise ArtifactError(f"spec.layers[{name!r}] has non-zero levels at {ls.bits} bits; their level "
                            f"{2 ** (ls.bits - 1)} fits no int8: non-zero levels go up to 7 bits")
    qmax = ls.qmax
    off = (ratio - q).abs().max().item() if w.numel() else 0.0
    if off > GRID_TOL or (q.abs() > qmax).any() or ((s == 0) & (w != 0)).any():
        raise ArtifactError(
            f"weight of layer {name!r} is not on its {ls.bits}-bit grid (max off-grid {off:.3g}, "
            f"max |q| {q.abs().max().item():.0f} > {qmax}?); save the model returned by finalize()"
        )
    return q.to(torch.int8).numpy(), scale


def _put_back_hint(modules: dict[str, nn.Module], name: str) -> str:
    """Where the missing layer is a recurrent module's Linear (recurrent.LinearRNN's ih_l0 / hh_l0) and torch's
    module stands there now: the model was put back with linear_to_rnn before save."""
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    if isinstance(modules.get(owner), (nn.LSTM, nn.GRU, nn.RNN)):
        return (f" ({owner} is torch's recurrent module again: save the finalized model as compressed, before "
                "linear_to_rnn, and apply linear_to_rnn to the model load returns)")
    return ""


def _quantized_layers(model: nn.Module, spec: CompressionSpec) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name, ls in spec.layers.items():
        if ls.bits is None:
            continue
        mod = modules.get(name)
        if mod is None or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise ArtifactError(f"spec.layers names {name!r}, which is not a layer with a weight in the model"
                                + _put_back_hint(modules, name))
        out[name] = mod
    return out


def _layer_bias(mod: nn.Module) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return b if isinstance(b, torch.Tensor) and b.dim() == 1 else None


def live_channels(q: torch.Tensor | np.ndarray, bias: torch.Tensor | None, scale: torch.Tensor | None = None,
                  int_bias: bool | None = None) -> torch.Tensor:
    """The output channels whose step the model needs: a kept weight, or a nonzero bias stored as a
    multiple of the step (the `int` bias format, `int_bias`; by default the format the writer picks
    for `bias` on `scale`). Any other channel computes its bias, or zero, whatever its step: the
    artifact does not store that step (`live_only`)."""
    q = torch.as_tensor(q)
    live = (q.reshape(q.shape[0], -1) != 0).any(1) if q.shape[0] else torch.zeros(0, dtype=torch.bool)
    if bias is None:
        return live
    if int_bias is None:
        int_bias = precision.encode_bias(bias, scale)[1]["codec"] == "int"
    return live | (bias.detach().cpu().reshape(-1) != 0) if int_bias else live


def stored_steps(scale: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the steps the artifact stores, whether only the live channels'): every step where every channel
    is live, else the live ones' (the first channel's where none is); `filled_steps` undoes it."""
    if bool(live.all()):
        return scale, False
    return (scale[live] if bool(live.any()) else scale[:1]), True


def filled_steps(stored: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Every channel's step from `stored_steps`' live ones: a dead channel gets the first stored step
    (finalize gives it that step too, so a spec survives save and load unchanged)."""
    scale = stored[:1].expand(live.numel()).clone()
    if bool(live.any()):
        scale[live] = stored
    return scale


def _encode_layer(enc: Encoding, name: str, mod: nn.Module, ls: LayerSpec, entropy_coding: bool) -> None:
    q, scale = integer_weights(name, mod.weight, ls)
    coded = layer_codec.encode_layer(q, ls.bits, entropy_coding, ls.nonzero_levels)
    parts = {}
    for part, (stored, codec, raw) in coded.parts.items():
        key = name + PART_SUFFIX[part]
        enc.parts[key], parts[part] = stored, {"key": key, "bytes": len(stored), "codec": codec, "raw_bytes": raw}
    bias = _layer_bias(mod)
    bias_raw, bias_rec = precision.encode_bias(bias, scale) if bias is not None else (None, None)
    int_bias = bias_rec is not None and bias_rec["codec"] == "int"
    steps, live_only = stored_steps(scale, live_channels(q, bias, int_bias=int_bias))
    raw, srec = precision.encode_scale(steps)
    key = name + PART_SUFFIX["scale"]
    stored, codec = entropy.code_part(raw, 8, len(raw)) if entropy_coding else (raw, "raw")
    enc.parts[key], parts["scale"] = stored, {"key": key, "bytes": len(stored), "codec": codec, "raw_bytes": len(raw),
                                              "format": srec["codec"], "channels": srec["channels"]}
    if live_only:  # written only where a channel is dead: older files store every channel's step
        parts["scale"]["live_only"] = True
    if bias is not None:
        brec = {"format": bias_rec["codec"], **({"bits": bias_rec["bits"]} if "bits" in bias_rec else {})}
        stored, codec = (entropy.code_part(bias_raw, *side_symbols(brec, len(bias_raw), bias.numel())) if entropy_coding
                         else (bias_raw, "raw"))
        key = name + PART_SUFFIX["bias"]
        enc.parts[key] = stored
        parts["bias"] = {"key": key, "bytes": len(stored), "codec": codec, "raw_bytes": len(bias_raw), **brec}
    nnz = int(np.count_nonzero(q))
    enc.layers[name] = {
        "shape": list(mod.weight.shape), "bits": int(ls.bits), "numel": int(q.size), "nonzero": nnz,
        "sparsity": 1.0 - nnz / max(q.size, 1), "encoding": coded.encoding, "index_bits": coded.index_bits,
        "entries": coded.entries, "act_bits": ls.act_bits,
        "act_scale": None if ls.act_scale is None else float(ls.act_scale), "parts": parts,
    }
    if ls.act_bits is not None and not ls.act_signed:  # written only when unsigned: older files read as signed
        enc.layers[name]["act_signed"] = False
    if ls.nonzero_levels:  # written only when set: older files hold the symmetric levels
        enc.layers[name]["levels"] = "nonzero"


def side_symbols(rec: dict, raw_bytes: int, channels: int) -> tuple[int | None, int]:
    """(symbol bits, count) the entropy coder sees for a scale or bias part: an integer bias's
    own fields when they fit in a byte, else the part's bytes."""
    if rec.get("format") == "int":
        return (rec["bits"], channels) if rec["bits"] <= entropy.MAX_ANS_SYMBOL_BITS else (None, channels)
    return 8, raw_bytes


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, including bfloat16 and 0-d)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def unique_state(model: nn.Module, prefer: set[str] = frozenset()
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with each tensor once, {other key: the key that holds the same tensor}).

    A module registered under two names (`self.head = self.blocks[-1]`) or a weight tied across
    modules appears in `state_dict()` under every name; storing it once keeps the file, the size
    target and the dense baseline from counting it twice. The kept key is the first in `prefer`
    (a quantized layer's own key), else the first in state-dict order; a key in `prefer` is never
    an alias (each quantized layer's parts are written by the layer's own encoder)."""
    groups: dict[int, list[str]] = {}
    full = model.state_dict(keep_vars=True)
    for key, t in full.items():
        groups.setdefault(id(t) if isinstance(t, torch.Tensor) else id(key), []).append(key)
    state, aliases = {}, {}
    for key, t in full.items():
        group = groups[id(t) if isinstance(t, torch.Tensor) else id(key)]
        kept = next((k for k in group if k in prefer), group[0])
        if key != kept and key not in prefer:
            aliases[key] = kept
        else:  # two quantized layers of one tensor (tied embeddings both quantized) each keep their own parts
            state[key] = t.detach() if isinstance(t, torch.Tensor) else t
    return state, aliases


def encode_model(model: nn.Module, spec: CompressionSpec, entropy: bool = True,
                 narrow: Callable[[str], bool] | None = None) -> Encoding:
    """Encode every quantized layer (weights, scale, bias) in its smallest form; keep the rest as
    is, in fp16 where it holds only fp16 values and `narrow(key)` allows it (default: always; the
    size allocator predicts a file from a teacher whose values training will still move, so it
    allows only what training keeps on fp16 values). A model on a GPU is encoded from a CPU copy."""
    from ..model_copy import on_cpu

    model, spec = on_cpu(model, spec)
    enc = Encoding()
    quantized = _quantized_layers(model, spec)
    skip = set()
    for name, mod in quantized.items():
        _encode_layer(enc, name, mod, spec.layers[name], entropy)
        skip |= {f"{name}.weight"} | ({f"{name}.bias"} if _layer_bias(mod) is not None else set())
    state, enc.aliases = unique_state(model, prefer=skip)
    filled = {f"{name}.{stat}" for name in spec.folded_norms for stat in ("running_mean", "running_var")}
    for key, t in state.items():
        if key in skip:
            continue
        if not isinstance(t, torch.Tensor):  # a module's get_extra_state(): any Python object
            from ..session.checks import non_tensor_message

            raise ArtifactError(non_tensor_message(key, t, "the artifact holds tensors only (nothing is pickled)"))
        _encode_other(enc, key, t.detach().cpu().contiguous().clone(), narrow is None or narrow(key), key in filled)
    return enc


def _encode_other(enc: Encoding, key: str, t: torch.Tensor, narrow: bool = True, fill: bool = False) -> None:
    """A tensor no technique compresses, as it is; an fp32 tensor that holds only fp16 values
    (normalization layers trained as stored, quant_lsq.norm_format) in fp16, and an integer one
    (BatchNorm's num_batches_tracked) in the narrowest integer type holding its values, bit for
    bit, with the dtype the model gets back on load. `fill`: a tensor constant by its format (a folded
    BatchNorm's statistics), stored as one entry when it is; a tensor merely constant now (an
    untrained BatchNorm) is not, as training will move it and the allocator predicts from it."""
    record, shape = {}, list(t.shape)
    if fill and constant(t):
        record["fill"] = True
        t = t.reshape(-1)[:1].clone()
    stored_as = torch.float16 if narrow and t.numel() and precision.fp16_exact(t) else precision.narrowest_int(t)
    if stored_as is not None:  # integers always: they load back exactly whatever their values
        record["loaded_as"] = str(t.dtype).replace("torch.", "")
        t = t.to(stored_as)
    enc.tensors[key] = t
    enc.parts[key] = tensor_bytes(t)
    enc.others[key] = {"shape": shape, "dtype": str(t.dtype).replace("torch.", ""),
                       "bytes": t.numel() * t.element_size(), **record}


def constant(t: torch.Tensor) -> bool:
    """Whether a tensor of two or more entries holds one value, bit for bit (-0.0 is not 0.0)."""
    if t.numel() < 2:
        return False
    rows = t.contiguous().reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size())
    return bool((rows == rows[:1]).all())


def part_bytes(parts: dict[str, bytes], rec: dict, where: str) -> bytes:
    """The stored bytes of one part, checked against its manifest record."""
    key = rec["key"]
    if key not in parts:
        raise ArtifactError(f"{where}: part {key!r} listed in the manifest is missing")
    data = parts[key]
    if len(data) != rec["bytes"]:
        raise ArtifactError(f"{where}: part {key!r} has {len(data)} bytes, manifest says {rec['bytes']}")
    return data


def _decoded(parts: dict[str, bytes], rec: dict, sym: tuple[int | None, int], where: str) -> bytes:
    data = part_bytes(parts, rec, where)
    try:
        return entropy.decode_part(data, rec["codec"], rec["raw_bytes"], *sym)
    except Exception as exc:
        raise ArtifactError(f"{where}: cannot decode part {rec['key']!r} ({rec['codec']}): {exc}") from exc


def decode_layer(name: str, rec: dict, parts: dict[str, bytes], where: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(fp32 weight, fp32 scale, bias or None) of one quantized layer, exactly as finalize made it."""
    p = rec["parts"]
    values = np.frombuffer(_decoded(parts, p["values"], layer_codec.symbol_stream(rec, "values"), where), np.uint8)
    indices = (np.frombuffer(_decoded(parts, p["indices"], layer_codec.symbol_stream(rec, "indices"), where), np.uint8)
               if "indices" in p else np.zeros(0, np.uint8))
    from . import packing

    shape = rec["shape"]
    try:
        q = packing.decode_ints(rec["encoding"], rec["bits"], rec["numel"], values, indices,
                                rec["entries"], rec.get("index_bits"), rec.get("levels") == "nonzero")
        q = torch.from_numpy(q.astype(np.float32)).reshape(shape)
        bias_data = bias_rec = None
        if "bias" in p:
            brec = p["bias"]
            bias_data = _decoded(parts, brec, side_symbols(brec, brec["raw_bytes"], shape[0]), where)
            bias_rec = {**brec, "codec": brec["format"]}
        scale = _decoded_steps(parts, p["scale"], q, bias_data, bias_rec, where)
        bias = None if bias_data is None else precision.decode_bias(bias_data, bias_rec, scale)
    except (ValueError, KeyError) as exc:
        raise ArtifactError(f"{where}: layer {name!r} cannot be unpacked: {exc}") from exc
    return q * scale.view(-1, *([1] * (len(shape) - 1))), scale, bias


def _decoded_steps(parts: dict[str, bytes], srec: dict, q: torch.Tensor, bias_data: bytes | None,
                   bias_rec: dict | None, where: str) -> torch.Tensor:
    """Every output channel's step; with `live_only`, the live channels' (live_channels: read from the
    integers and an int bias, decoded on unit steps) and the first stored one for the rest."""
    data, fmt = _decoded(parts, srec, (8, srec["raw_bytes"]), where), {"codec": srec["format"], "channels": srec["channels"]}
    if not srec.get("live_only"):
        return precision.decode_scale(data, fmt, q.shape[0])
    int_bias = bias_rec is not None and bias_rec["codec"] == "int"
    multiples = precision.decode_bias(bias_data, bias_rec, torch.ones(q.shape[0])) if int_bias else None
    live = live_channels(q, multiples, int_bias=int_bias)
    if bool(live.all()):
        raise ValueError("its steps are stored for the live channels only (live_only), but every channel is live")
    return filled_steps(precision.decode_scale(data, fmt, max(int(live.sum()), 1)), live)

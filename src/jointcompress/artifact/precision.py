"""How step sizes (scales) and biases are stored, and the rounding training uses to match it.

At extreme compression fp32 side data decides what fits: LeNet-5 has 580 output channels, so
fp32 scales and fp32 biases alone are 4.6 KB, more than the whole 400x budget. So:

* **scales** are stored in the smallest format that holds them *exactly*: one value when all
  channels share it (per-tensor), ``log8`` (one byte per channel on the grid 2**(k/16), with a
  2-byte base code), ``fp16``, or ``fp32``. Training rounds its step to the storage format in
  the forward pass (`round_step`), so a finalized model's scales are already fp16 (or log8)
  values and storing them changes nothing.
* **biases** of quantized layers likewise: ``int`` (an integer multiple of the layer's own
  per-channel step, packed at the fewest bits that hold the largest multiple, then entropy-coded
  like the weights), ``fp16`` or ``fp32``; training fake-quantizes them (techniques/bias_quant).

The encoder never rounds: it checks that the chosen format reproduces every value bit for bit,
and falls back to a wider one otherwise, so saving can never change a model's logits.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LOG_STEPS_PER_OCTAVE = 16  # log8 grid: 2**(k/16), a 4.4% spacing
FP16_MIN = 2.0 ** -24  # smallest positive fp16 (subnormal); steps never round to zero
FP16_MAX = 65504.0
STEP_FORMATS = ("fp16", "log8", "fp32")
BIAS_FORMATS = ("fp16", "int", "fp32")
MAX_BIAS_BITS = 24  # an integer bias (multiple of the step) wider than this is stored as float


# ---------------------------------------------------------------------------- training side

def log8_code(s: torch.Tensor) -> torch.Tensor:
    """The integer k with 2**(k/16) nearest to s (in the log domain)."""
    return torch.round(torch.log2(s.double().clamp_min(1e-30)) * LOG_STEPS_PER_OCTAVE)


def log8_value(code: torch.Tensor) -> torch.Tensor:
    """fp32 value of grid code k, computed in float64 and rounded once, identically everywhere."""
    return torch.exp2(code.double() / LOG_STEPS_PER_OCTAVE).float()


def fp16_values(t: torch.Tensor) -> torch.Tensor:
    """`t` (within fp16's range) rounded to the nearest fp16 values, ties to even, in t's dtype.

    Eager: a cast to fp16 and back. Under torch.compile (a user compiling the model being trained)
    the same rounding by arithmetic: inductor folds the two casts into nothing, and the compiled
    model trained on steps the artifact never stores (6,399 of 8,192 4-bit weights of a layer on
    other levels). The spacing of fp16 values at |t| is 2^(e - 11) for t = m * 2^e, m in [0.5, 1),
    and 2^-24 below the normal range; t / spacing and back are exact powers of two."""
    if not torch.compiler.is_compiling():
        return t.to(torch.float16).to(t.dtype)
    _, exponent = torch.frexp(t.float())  # fp32's exponent (inductor's C++ for a float64 frexp fails to build)
    spacing = torch.exp2((exponent - 11).clamp_min(-24).to(t.dtype))
    return torch.round(t / spacing) * spacing


def round_step(s: torch.Tensor, fmt: str | None = "fp16") -> torch.Tensor:
    """The step size exactly as the artifact will store it (same dtype as `s`).

    Used in LSQ's forward pass, so the weights a run evaluates are q * stored_step.
    """
    if fmt is None or fmt == "fp32":
        return s
    if fmt == "fp16":
        return fp16_values(s.clamp(FP16_MIN, FP16_MAX))
    if fmt == "log8":  # in fp16's range too: unclamped, emptied channels trained to non-finite step gradients
        return log8_value(log8_code(s.clamp(FP16_MIN, FP16_MAX))).to(s.dtype)
    raise ValueError(f"step format {fmt!r}: choose one of {STEP_FORMATS}")


def round_bias(b: torch.Tensor, fmt: str | None, step: torch.Tensor | None = None) -> torch.Tensor:
    """A bias exactly as the artifact will store it (no gradient path; callers add the STE).

    ``int``: the nearest integer multiple of the layer's per-output-channel `step`.
    """
    if fmt is None or fmt == "fp32":
        return b
    if fmt == "fp16":
        return fp16_values(b.clamp(-FP16_MAX, FP16_MAX))
    if fmt == "int":
        if step is None:
            raise ValueError("bias format 'int' needs the layer's step sizes")
        s = step.detach().reshape(-1).to(b.dtype).expand(b.shape[0]) if step.numel() == 1 else step.detach().reshape(-1).to(b.dtype)
        return torch.round(b / s) * s
    raise ValueError(f"bias format {fmt!r}: choose one of {BIAS_FORMATS}")


def round_fp16_storable(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the nearest fp16 values (same dtype), so the writer stores it in half the
    bytes, bit for bit; unchanged if any entry lies beyond fp16's range (it is then stored wide,
    and nothing saturates)."""
    if t.numel() == 0 or not t.is_floating_point() or bool(t.detach().abs().max() > FP16_MAX):
        return t
    return fp16_values(t)


# ---------------------------------------------------------------------------- storage side

def fp16_exact(t: torch.Tensor) -> bool:
    """Whether an fp32 tensor holds only fp16 values (NaN never does), so fp16 stores it exactly."""
    return t.dtype == torch.float32 and bool(torch.equal(t.to(torch.float16).to(torch.float32), t))


NARROW_INTS = (torch.int8, torch.int16, torch.int32)
WIDE_INTS = (torch.int16, torch.int32, torch.int64)


def narrowest_int(t: torch.Tensor) -> torch.dtype | None:
    """The narrowest signed integer dtype holding every value of a signed integer tensor, where it
    is narrower than the tensor's own (a BatchNorm's int64 num_batches_tracked fits 2 or 4 bytes
    of its 8); None otherwise (floats, bools, unsigned or empty tensors, values that need the full
    width)."""
    if t.dtype not in WIDE_INTS or t.numel() == 0:
        return None
    lo, hi = int(t.min()), int(t.max())
    for dtype in NARROW_INTS:
        if dtype.itemsize >= t.dtype.itemsize:
            return None
        if torch.iinfo(dtype).min <= lo and hi <= torch.iinfo(dtype).max:
            return dtype
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.float(), b.float()))


def signed_bits(max_abs: int) -> int:
    """Fewest two's-complement bits holding every integer in [-max_abs, max_abs] (at least 2)."""
    return max(2, int(max_abs).bit_length() + 1)


def pack_signed(values: np.ndarray, bits: int) -> bytes:
    """Signed integers of any width 2..32, two's complement, LSB first, back to back."""
    v = np.asarray(values, dtype=np.int64).ravel() & ((1 << bits) - 1)
    planes = (v[:, None] >> np.arange(bits, dtype=np.int64)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_signed(data: bytes, bits: int, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size * 8 < count * bits:
        raise ValueError(f"{raw.size} bytes hold fewer than {count} values of {bits} bits")
    planes = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits).astype(np.int64)
    u = (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return np.where(u >= (1 << (bits - 1)), u - (1 << bits), u)


def encode_scale(scale: torch.Tensor) -> tuple[bytes, dict]:
    """The smallest exact encoding of per-channel step sizes: (bytes, record)."""
    s = scale.detach().float().cpu().reshape(-1)
    channels = s.numel()
    if channels > 1 and bool((s == s[0]).all()):
        s, per_tensor = s[:1], True
    else:
        per_tensor = False
    rec = {"channels": 1 if per_tensor else channels}
    options = []  # every exact format; the smallest wins (a per-tensor log8 step: 3 bytes, not fp32's 4)
    if _same(s.half().float(), s):
        options.append((s.half().numpy().tobytes(), {**rec, "codec": "fp16"}))
    if bool((s > 0).all()):
        codes = log8_code(s)
        lo, hi = int(codes.min()), int(codes.max())
        if hi - lo < 256 and -32768 <= lo < 32768 and _same(log8_value(codes), s):
            options.append((struct_i16(lo) + (codes - lo).to(torch.uint8).numpy().tobytes(), {**rec, "codec": "log8"}))
    options.append((s.numpy().astype("<f4").tobytes(), {**rec, "codec": "fp32"}))
    return min(options, key=lambda o: len(o[0]))  # ties: the earlier, fp16 before log8 as before


def struct_i16(v: int) -> bytes:
    return int(v).to_bytes(2, "little", signed=True)


def scale_nbytes(rec: dict) -> int:
    n = rec["channels"]
    return {"log8": 2 + n, "fp16": 2 * n, "fp32": 4 * n}[rec["codec"]]


def decode_scale(data: bytes, rec: dict, channels: int) -> torch.Tensor:
    """fp32 per-channel steps ([channels]) from `encode_scale`'s bytes."""
    n, codec = rec["channels"], rec["codec"]
    if len(data) != scale_nbytes(rec):
        raise ValueError(f"scale has {len(data)} bytes, {codec} x {n} needs {scale_nbytes(rec)}")
    if codec == "fp32":
        s = torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
    elif codec == "fp16":
        s = torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))
    elif codec == "log8":
        lo = int.from_bytes(data[:2], "little", signed=True)
        s = log8_value(torch.from_numpy(np.frombuffer(data[2:], dtype=np.uint8).astype(np.int64)) + lo)
    else:
        raise ValueError(f"unknown scale codec {codec!r}")
    if n == 1:
        return s.expand(channels).clone()
    if n != channels:
        raise ValueError(f"{n} scales stored for {channels} channels")
    return s


def encode_bias(bias: torch.Tensor, scale: torch.Tensor) -> tuple[bytes, dict]:
    """The smallest exact encoding of a quantized layer's bias: (packed bytes, record).

    ``int`` records the bit width; its bytes are then entropy-coded like the weights.
    """
    b = bias.detach().float().cpu().reshape(-1)
    s = scale.detach().float().cpu().reshape(-1)
    options = []
    if b.numel() and bool((s > 0).all()):
        k = torch.round(b / s)
        if bool(torch.isfinite(k).all()) and _same(k * s, b):
            bits = signed_bits(int(k.abs().max()))
            if bits <= MAX_BIAS_BITS:
                options.append((pack_signed(k.long().numpy(), bits), {"codec": "int", "bits": bits}))
    if _same(b.half().float(), b):
        options.append((b.half().numpy().tobytes(), {"codec": "fp16"}))
    options.append((b.numpy().astype("<f4").tobytes(), {"codec": "fp32"}))
    return min(options, key=lambda o: len(o[0]))


def bias_nbytes(rec: dict, channels: int) -> int:
    if rec["codec"] == "int":
        return math.ceil(channels * int(rec.get("bits") or 0) / 8)
    return {"fp16": 2 * channels, "fp32": 4 * channels}[rec["codec"]]


def decode_bias(data: bytes, rec: dict, scale: torch.Tensor) -> torch.Tensor:
    channels = scale.numel()
    if len(data) != bias_nbytes(rec, channels):
        raise ValueError(f"bias has {len(data)} bytes, {rec['codec']} x {channels} needs {bias_nbytes(rec, channels)}")
    if rec["codec"] == "fp32":
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
    if rec["codec"] == "fp16":
        return torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))
    if rec["codec"] == "int":
        k = torch.from_numpy(unpack_signed(data, rec["bits"], channels).astype(np.float32))
        return k * scale.float().reshape(-1)
    raise ValueError(f"unknown bias codec {rec['codec']!r}")

"""Bit-packing of low-bit integers and sparse storage of a layer's quantized weights.

A 4-bit weight stored in an int8 tensor still costs 8 bits, and a zero costs as much as any
other value; the compression claims are only honest if the artifact really stores b bits per
kept value plus the position information. This module turns a flat array of signed integers
into bytes three ways and `encode_ints` keeps whichever is smallest for the layer:

* ``dense``    - every value at ``bits`` bits, no positions (best when almost nothing is zero);
* ``bitmask``  - one bit per position saying "non-zero", then the non-zero values;
* ``relative`` - Deep Compression (Han et al. 2016) relative indices: for every kept value the
  number of zeros skipped since the previous one, at ``index_bits`` bits; a gap too long for
  the index width is bridged with *filler* entries (index = max, value = 0). The index width
  (2..8) is chosen per layer to minimise the total.

Everything is vectorized numpy; no Python loop runs over weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_BITS, MAX_BITS = 2, 8
INDEX_BITS = tuple(range(2, 9))
ENCODINGS = ("dense", "bitmask", "relative")


def _check_bits(bits: int, what: str = "bits") -> None:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what}={bits!r}: packing supports {MIN_BITS}..{MAX_BITS} bits")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes used by `count` values of `bits` bits each (the last byte is zero-padded)."""
    return (int(count) * int(bits) + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed integers in [-2**(bits-1), 2**(bits-1)-1] into a uint8 array.

    Values are stored in two's complement, least significant bit first, back to back
    across byte boundaries, so n values take exactly ceil(n*bits/8) bytes.
    """
    _check_bits(bits)
    v = np.asarray(values).astype(np.int64).ravel()
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"values out of range for {bits}-bit signed ints: [{v.min()}, {v.max()}]")
    u = (v & ((1 << bits) - 1)).astype(np.uint8)
    bitplanes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bitplanes.ravel(), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` signed integers (int8) from packed bytes."""
    _check_bits(bits)
    data = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=np.uint8)
    if data.size < packed_nbytes(count, bits):
        raise ValueError(f"{data.size} bytes hold fewer than {count} values of {bits} bits")
    flat = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    u = (flat.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=1)
    u = np.where(u >= (1 << (bits - 1)), u - (1 << bits), u)  # sign-extend
    return u.astype(np.int8)


def pack_unsigned(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers in [0, 2**bits-1] (used for relative indices)."""
    _check_bits(bits, "index_bits")
    u = np.asarray(values).astype(np.int64).ravel()
    if u.size and (u.min() < 0 or u.max() >= (1 << bits)):
        raise ValueError(f"indices out of range for {bits}-bit unsigned ints")
    signed = np.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return pack_bits(signed, bits)


def unpack_unsigned(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    return unpack_bits(data, bits, count).astype(np.int64) & ((1 << bits) - 1)


# ----------------------------------------------------------------------------- sparse formats


@dataclass
class Encoded:
    """One layer's integer weights as bytes. `entries` counts stored values (incl. fillers)."""

    encoding: str
    bits: int
    numel: int
    values: np.ndarray  # uint8, packed values
    indices: np.ndarray  # uint8, bitmask or packed relative indices; empty for dense
    entries: int
    index_bits: int | None = None

    @property
    def nbytes(self) -> int:
        return int(self.values.size + self.indices.size)


def _relative_gaps(positions: np.ndarray) -> np.ndarray:
    """Zeros skipped before each kept position (first position counts from -1)."""
    return np.diff(positions, prepend=-1) - 1


def relative_entries(positions: np.ndarray, index_bits: int) -> int:
    """Number of entries (kept values + fillers) the relative format needs at this width."""
    span = 1 << index_bits
    return int(positions.size + (_relative_gaps(positions) // span).sum())


def encode_relative(q: np.ndarray, bits: int, index_bits: int) -> Encoded:
    """Deep Compression relative indexing with filler zeros for gaps >= 2**index_bits."""
    _check_bits(index_bits, "index_bits")
    flat = np.asarray(q).ravel()
    pos = np.flatnonzero(flat)
    span = 1 << index_bits
    gaps = _relative_gaps(pos)
    fillers = gaps // span  # each filler covers `span` positions: span-1 zeros + itself
    counts = fillers + 1
    total = int(counts.sum())
    idx = np.full(total, span - 1, dtype=np.int64)
    val = np.zeros(total, dtype=np.int64)
    real = np.cumsum(counts) - 1
    idx[real] = gaps - fillers * span
    val[real] = flat[pos]
    return Encoded("relative", bits, flat.size, pack_bits(val, bits), pack_unsigned(idx, index_bits), total, index_bits)


def encode_bitmask(q: np.ndarray, bits: int, nonzero_levels: bool = False) -> Encoded:
    """The kept positions as a bitmask, their values at `bits` bits. `nonzero_levels`: the values are
    +-1..+-2**(bits-1), stored as q - 1 where positive (no code is spent on zero; decode_ints undoes it)."""
    flat = np.asarray(q).ravel()
    mask = flat != 0
    kept = flat[mask].astype(np.int64)
    if nonzero_levels:
        kept = kept - (kept > 0)
    return Encoded("bitmask", bits, flat.size, pack_bits(kept, bits), np.packbits(mask, bitorder="little"), int(mask.sum()))


def encode_dense(q: np.ndarray, bits: int) -> Encoded:
    flat = np.asarray(q).ravel()
    return Encoded("dense", bits, flat.size, pack_bits(flat, bits), np.zeros(0, np.uint8), flat.size)


def encode_ints(q: np.ndarray, bits: int, encoding: str | None = None) -> Encoded:
    """Encode integer weights with the smallest format (or the one named by `encoding`).

    Sizes are computed arithmetically first so only the winner is actually packed.
    """
    _check_bits(bits)
    flat = np.asarray(q).ravel()
    pos = np.flatnonzero(flat)
    costs = {
        ("dense", None): packed_nbytes(flat.size, bits),
        ("bitmask", None): packed_nbytes(pos.size, bits) + packed_nbytes(flat.size, 1),
    }
    for w in INDEX_BITS:
        n = relative_entries(pos, w)
        costs[("relative", w)] = packed_nbytes(n, bits) + packed_nbytes(n, w)
    if encoding is not None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding={encoding!r}: choose one of {ENCODINGS}")
        costs = {k: v for k, v in costs.items() if k[0] == encoding}
    (enc, w), _ = min(costs.items(), key=lambda kv: (kv[1], ENCODINGS.index(kv[0][0])))
    if enc == "dense":
        return encode_dense(flat, bits)
    if enc == "bitmask":
        return encode_bitmask(flat, bits)
    return encode_relative(flat, bits, w)


def decode_ints(enc: str, bits: int, numel: int, values: np.ndarray, indices: np.ndarray,
                entries: int, index_bits: int | None = None, nonzero_levels: bool = False) -> np.ndarray:
    """Inverse of the encoders: a flat int8 array of `numel` weights."""
    vals = unpack_bits(values, bits, entries)
    if nonzero_levels:  # encode_bitmask's shift undone: only the bitmask layout stores no zero value
        if enc != "bitmask":
            raise ValueError(f"non-zero levels are stored in the bitmask encoding, not {enc!r}")
        vals = vals + (vals >= 0).astype(np.int8)
    out = np.zeros(numel, dtype=np.int8)
    if enc == "dense":
        if entries != numel:
            raise ValueError(f"dense encoding has {entries} entries for {numel} weights")
        return vals
    if enc == "bitmask":
        mask = np.unpackbits(np.asarray(indices, np.uint8), count=numel, bitorder="little").astype(bool)
        if int(mask.sum()) != entries:
            raise ValueError(f"bitmask marks {int(mask.sum())} weights but {entries} values are stored")
        out[mask] = vals
        return out
    if enc == "relative":
        idx = unpack_unsigned(indices, index_bits, entries)
        pos = np.cumsum(idx + 1) - 1
        if pos.size and pos[-1] >= numel:
            raise ValueError(f"relative indices point past the end ({pos[-1]} >= {numel})")
        out[pos] = vals
        return out
    raise ValueError(f"unknown encoding {enc!r}; expected one of {ENCODINGS}")


# ----------------------------------------------------------------------------- entropy coding


def zstd_compress(data: bytes, level: int = 19) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=level).compress(data)


def zstd_decompress(data: bytes, size: int) -> bytes:
    """Decompress, refusing output of any size but the expected one (a cheap integrity check)."""
    import zstandard

    out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    if len(out) != size:
        raise ValueError(f"zstd frame decompressed to {len(out)} bytes, expected {size}")
    return out


def maybe_zstd(data: np.ndarray, level: int = 19) -> tuple[np.ndarray, str]:
    """zstd-compress a byte array if that makes it smaller; returns (bytes, codec name)."""
    raw = np.asarray(data, dtype=np.uint8)
    if raw.size < 64:  # a zstd frame header alone is ~10 bytes; not worth it
        return raw, "raw"
    comp = zstd_compress(raw.tobytes(), level)
    if len(comp) < raw.size:
        return np.frombuffer(comp, dtype=np.uint8).copy(), "zstd"
    return raw, "raw"

"""Choose, per layer, the sparse layout and entropy codec that store its integer weights smallest.

Layouts (packing.py): dense, bitmask, relative indices at 2..8 bits. Codecs (entropy.py): raw,
zstd, ans. Trying all 9 x 3 x 3 combinations for real would be slow inside the size allocator
(which encodes a model dozens of times), so each layout is first *priced* from its symbol
histograms alone (exact for raw; the ideal rANS size for ans, which the coder reaches within a
word), and only the two cheapest layouts are packed and coded for real. The choice is
deterministic, so the allocator's prediction and the file `save` writes agree byte for byte.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from . import entropy, packing

FINALISTS = 2  # layouts actually encoded after pricing
CACHE_BYTES = 64 * 2 ** 20  # stored bytes the encoding cache holds at most (least recently used dropped first)


@dataclass
class CodedLayer:
    """One layer's weights as stored parts: {"values"|"indices": (stored bytes, codec, raw bytes)}."""

    encoding: str
    bits: int
    numel: int
    entries: int
    index_bits: int | None
    parts: dict[str, tuple[bytes, str, int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(len(p[0]) for p in self.parts.values())


def ans_price(counts: np.ndarray) -> int:
    """Bytes `entropy.ans_encode` needs for symbols with this histogram (ideal code length)."""
    counts = np.asarray(counts, dtype=np.int64)
    scaled, header, bits = entropy.model_counts(counts)
    if np.count_nonzero(scaled) <= 1:
        return header
    return header + 4 * max(1, math.ceil((bits + 1) / 32))


def _value_hist(values: np.ndarray, bits: int, extra_zeros: int = 0) -> np.ndarray:
    h = np.bincount(np.asarray(values, np.int64) & ((1 << bits) - 1), minlength=1 << bits).astype(np.int64)
    h[0] += extra_zeros
    return h


def price_layouts(flat: np.ndarray, bits: int, entropy_coding: bool) -> dict[tuple[str, int | None], int]:
    """Estimated stored bytes of every layout (min of raw and ans per part)."""
    pos = np.flatnonzero(flat)
    nz = flat[pos]
    n, k = flat.size, pos.size
    pick = (lambda raw, hist: min(raw, ans_price(hist))) if entropy_coding else (lambda raw, hist: raw)
    prices = {("dense", None): pick(packing.packed_nbytes(n, bits), _value_hist(flat, bits))}
    mask_hist = np.array([n - k, k])
    prices[("bitmask", None)] = pick(packing.packed_nbytes(k, bits), _value_hist(nz, bits)) + pick(
        packing.packed_nbytes(n, 1), mask_hist)
    gaps = np.diff(pos, prepend=-1) - 1
    for w in packing.INDEX_BITS:
        span = 1 << w
        fillers = int((gaps // span).sum())
        entries = k + fillers
        idx_hist = np.bincount(gaps % span, minlength=span).astype(np.int64)
        idx_hist[span - 1] += fillers
        prices[("relative", w)] = (pick(packing.packed_nbytes(entries, bits), _value_hist(nz, bits, fillers))
                                   + pick(packing.packed_nbytes(entries, w), idx_hist))
    return prices


def _code(e: packing.Encoded, entropy_coding: bool, zstd: bool) -> CodedLayer:
    out = CodedLayer(e.encoding, e.bits, e.numel, e.entries, e.index_bits)
    streams = [("values", e.values, e.bits, e.entries)]
    if e.encoding == "bitmask":
        streams.append(("indices", e.indices, 1, e.numel))
    elif e.encoding == "relative":
        streams.append(("indices", e.indices, e.index_bits, e.entries))
    for part, data, sym_bits, count in streams:
        raw = np.asarray(data, np.uint8).tobytes()
        if entropy_coding:
            stored, codec = entropy.code_part(raw, sym_bits, count, zstd_min=64 if zstd else None)
        else:
            stored, codec = raw, "raw"
        out.parts[part] = (stored, codec, len(raw))
    return out


class _EncodingCache:
    """The layers encoded last, by a digest of their integer weights: the size allocator and the
    landing measure the whole file again and again (a bisection over a global ranking) while most
    layers' integers stay as they were -- about half of the layers measured in a MobileNetV2 joint
    run. The choice is deterministic, so a hit is the bytes a fresh encoding would give."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.limit, self.held = limit, 0
        self.entries: OrderedDict[tuple, CodedLayer] = OrderedDict()
        self.lock = threading.Lock()  # a user's threads may save or measure two models at once

    @staticmethod
    def key(flat: np.ndarray, bits: int, entropy_coding: bool, nonzero_levels: bool = False) -> tuple:
        digest = hashlib.blake2b(np.ascontiguousarray(flat).view(np.uint8), digest_size=20).digest()
        return bits, entropy_coding, nonzero_levels, flat.dtype.str, flat.size, digest

    def get(self, key: tuple) -> CodedLayer | None:
        with self.lock:
            coded = self.entries.get(key)
            if coded is not None:
                self.entries.move_to_end(key)
            return coded

    def put(self, key: tuple, coded: CodedLayer) -> None:
        with self.lock:
            if coded.nbytes > self.limit or key in self.entries:
                return
            self.entries[key] = coded
            self.held += coded.nbytes
            while self.held > self.limit:
                _, dropped = self.entries.popitem(last=False)
                self.held -= dropped.nbytes


_CACHE = _EncodingCache()


def encode_layer(q: np.ndarray, bits: int, entropy_coding: bool = True, nonzero_levels: bool = False) -> CodedLayer:
    """The smallest stored form of one layer's integer weights q (any shape, int8), from the
    cache where these integers were encoded lately (a copy: callers own what they get).
    `nonzero_levels` (quant_lsq.nonzero_grid): q's non-zero values are +-1..+-2**(bits-1), which only
    the bitmask layout stores at `bits` bits (packing.encode_bitmask), so it is the one layout."""
    flat = np.asarray(q).ravel()
    key = _CACHE.key(flat, bits, entropy_coding, nonzero_levels)
    coded = _CACHE.get(key)
    if coded is None:
        if nonzero_levels:
            e = packing.encode_bitmask(flat, bits, nonzero_levels=True)
            coded = _code(e, entropy_coding, zstd=entropy_coding)
        else:
            coded = _encode_flat(flat, bits, entropy_coding)
        _CACHE.put(key, coded)
    return replace(coded, parts=dict(coded.parts))


def _encode_flat(flat: np.ndarray, bits: int, entropy_coding: bool) -> CodedLayer:
    """encode_layer's work: the finalists are coded with raw / ans; zstd (slow at its best level)
    is then tried on the winner's layout only."""
    prices = price_layouts(flat, bits, entropy_coding)
    order = sorted(prices, key=lambda lw: (prices[lw], packing.ENCODINGS.index(lw[0]), lw[1] or 0))
    best = best_enc = None
    for layout, width in order[:FINALISTS]:
        e = packing.encode_ints(flat, bits, layout) if layout != "relative" else packing.encode_relative(flat, bits, width)
        coded = _code(e, entropy_coding, zstd=False)
        if best is None or coded.nbytes < best.nbytes:
            best, best_enc = coded, e
    return _code(best_enc, entropy_coding, zstd=True) if entropy_coding else best


def symbol_stream(rec: dict, part: str) -> tuple[int, int]:
    """(symbol bits, symbol count) of a layer's "values" or "indices" part, from its record."""
    if part == "values":
        return rec["bits"], rec["entries"]
    if rec["encoding"] == "bitmask":
        return 1, rec["numel"]
    return rec["index_bits"], rec["entries"]

"""Reference codings to measure the artifact's index/value coding against (bits per stored weight).

* Deep Compression (Han et al. 2016): relative indices with filler zeros, then *static Huffman*
  codes for the index stream and for the value stream. `deep_compression_bytes` uses the best
  index width (2..8 bits) and counts the Huffman payload only (the paper does not count the
  code tables), so it is a slightly optimistic baseline.
* `zstd_only_bytes`: the artifact's layouts with zstd as the only entropy coder (what version 1
  of the format did).
* `entropy_bound_bytes`: the empirical entropy of the positions (binary, i.i.d.) plus that of
  the non-zero values: what any coder that treats positions as independent can at best reach.
"""
from __future__ import annotations

import heapq

import numpy as np

from . import entropy, packing


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol of a static Huffman code for these counts (0 for absent symbols)."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.int64)
    present = [(int(c), i, (i,)) for i, c in enumerate(counts) if c > 0]
    if len(present) == 1:
        lengths[present[0][1]] = 1
        return lengths
    heapq.heapify(present)
    while len(present) > 1:
        c1, i1, s1 = heapq.heappop(present)
        c2, i2, s2 = heapq.heappop(present)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(present, (c1 + c2, min(i1, i2), s1 + s2))
    return lengths


def _huffman_bytes(symbols: np.ndarray, alphabet: int) -> int:
    counts = np.bincount(np.asarray(symbols, np.int64), minlength=alphabet)
    return int((counts * huffman_lengths(counts)).sum() + 7) // 8


def deep_compression_bytes(q: np.ndarray, bits: int) -> dict:
    """Relative indices + Huffman (values and indices), at the best index width."""
    flat = np.asarray(q).ravel()
    best = None
    for w in packing.INDEX_BITS:
        e = packing.encode_relative(flat, bits, w)
        idx = entropy.symbols_of(e.indices.tobytes(), w, e.entries)
        val = entropy.symbols_of(e.values.tobytes(), bits, e.entries)
        res = {"index_bits": w, "values": _huffman_bytes(val, 1 << bits), "indices": _huffman_bytes(idx, 1 << w)}
        res["total"] = res["values"] + res["indices"]
        if best is None or res["total"] < best["total"]:
            best = res
    return best


def zstd_only_bytes(q: np.ndarray, bits: int) -> int:
    """Smallest layout (dense / bitmask / relative) with each part raw or zstd, as version 1 stored it."""
    flat = np.asarray(q).ravel()
    encs = [packing.encode_ints(flat, bits, "dense"), packing.encode_ints(flat, bits, "bitmask")]
    encs += [packing.encode_relative(flat, bits, w) for w in packing.INDEX_BITS]
    sizes = []
    for e in encs:
        parts = [e.values] + ([e.indices] if e.encoding != "dense" else [])
        sizes.append(sum(packing.maybe_zstd(p)[0].size for p in parts))
    return min(sizes)


def entropy_bound_bytes(q: np.ndarray, bits: int) -> float:
    """i.i.d. entropy of the positions (numel x H(density)) + of the non-zero values."""
    flat = np.asarray(q).ravel()
    n, k = flat.size, int(np.count_nonzero(flat))
    if k in (0, n):
        pos_bits = 0.0
    else:
        p = k / n
        pos_bits = -n * (p * np.log2(p) + (1 - p) * np.log2(1 - p))
    counts = np.bincount(flat[flat != 0].astype(np.int64) & ((1 << bits) - 1), minlength=1 << bits)
    probs = counts[counts > 0] / max(k, 1)
    val_bits = float(-(counts[counts > 0] * np.log2(probs)).sum())
    return (pos_bits + val_bits) / 8

"""Entropy coding of one packed part (values, indices, integer biases): raw, zstd or ANS.

zstd is a generic LZ + Huffman/FSE coder: on a layer of a few hundred bytes its frame header
and its need to see repeats make it pay little or nothing. What a sparse layer's streams really
are is a sequence of small symbols from a skewed, static distribution (4-bit values peaked
near the grid's middle, 1-bit masks with a few % ones, relative gaps), for which an
arithmetic-class coder with the symbol histogram reaches the empirical entropy within a few
bytes. ``ans`` is that coder (rANS from the `constriction` package, Rust, vectorized):

    ans part = varint K | K varints: histogram of symbols 0..K-1 (counts >> s, 0 = absent)
               | rANS words (uint32, little-endian)

The symbol count is known from the layer record, so it is not stored. A stream of a single
distinct symbol needs no words at all. `code_part` tries raw, zstd and ans and keeps the
smallest, so coding never makes a part bigger than its packed bytes.
"""
from __future__ import annotations

import numpy as np

from . import packing

CODECS = ("raw", "zstd", "ans")
MAX_ANS_SYMBOL_BITS = 8


def write_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); raises ValueError on a truncated or absurd varint."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def symbols_of(raw: bytes | np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned `bits`-bit symbols (LSB-first packing, as packing.pack_bits writes them). Widths
    that divide a byte are shifted out of each byte directly (a 4-bit layer: ~8x faster than
    through its bit planes, and the size budget unpacks every layer at each calibration)."""
    data = np.frombuffer(bytes(raw), dtype=np.uint8)
    if 8 % bits == 0:
        shifts = np.arange(8 // bits, dtype=np.uint8) * bits
        return ((data[:, None] >> shifts) & ((1 << bits) - 1)).ravel()[:count].astype(np.int64)
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=1)


def pack_symbols(symbols: np.ndarray, bits: int) -> bytes:
    s = np.asarray(symbols, dtype=np.int64).ravel()
    planes = (s[:, None] >> np.arange(bits, dtype=np.int64)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def model_counts(counts: np.ndarray) -> tuple[np.ndarray, int, float]:
    """The stored histogram for symbols with these exact counts: (scaled counts, header bytes,
    ideal code length in bits).

    Exact counts cost up to 3 varint bytes each; counts shifted right by s cost fewer but model
    the distribution less precisely (a 1-bit mask at 0.1% density needs the fine resolution,
    16 4-bit values do not). The shift that minimises header + payload is chosen; the decoder
    needs only the scaled counts (probabilities are their ratios).
    """
    counts = np.asarray(counts, dtype=np.int64)
    k = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
    if k == 0:
        return np.zeros(0, np.int64), len(write_varint(0)), 0.0
    counts = counts[:k]
    present = counts > 0
    # every shift at once, one row each (the size budget prices every layer's layouts at each
    # calibration): the same integers, and per row the same float operations and sums as one shift alone
    shifts = np.arange(max(1, int(counts.max()).bit_length()), dtype=np.int64)[:, None]
    scaled = np.where(present, np.maximum((counts + (1 << shifts) - 1) >> shifts, 1), 0)
    headers = len(write_varint(k)) + _varint_lengths(scaled).sum(axis=1)
    if present.sum() > 1:
        kept = scaled[:, present]
        terms = -(counts[present] * np.log2(kept / kept.sum(axis=1, keepdims=True)))
        bits = np.array([row.sum() for row in terms])  # a row's own sum: a 2-D sum(axis=1) adds in another order
    else:
        bits = np.zeros(len(scaled))
    best = int(np.argmin(headers * 8 + bits))  # the first of equal costs, as a loop keeping strict improvements
    return scaled[best], int(headers[best]), float(bits[best])


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """len(write_varint(v)) of every non-negative int in `values`, elementwise."""
    n = np.ones(values.shape, dtype=np.int64)
    rest = values >> 7
    while rest.any():
        n += rest != 0
        rest = rest >> 7
    return n


def _model(scaled: np.ndarray):
    import constriction

    h = scaled.astype(np.float64)
    return constriction.stream.model.Categorical(h / h.sum(), perfect=False)


def ans_encode(symbols: np.ndarray) -> bytes:
    """Symbols (non-negative ints < 256) -> histogram header + rANS words."""
    import constriction

    s = np.asarray(symbols, dtype=np.int32).ravel()
    if s.size == 0:
        return write_varint(0)
    scaled, _, _ = model_counts(np.bincount(s))
    header = write_varint(scaled.size) + b"".join(write_varint(int(c)) for c in scaled)
    if np.count_nonzero(scaled) == 1:
        return header
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(s, _model(scaled))
    return header + coder.get_compressed().astype("<u4").tobytes()


def ans_decode(data: bytes, count: int) -> np.ndarray:
    import constriction

    k, pos = read_varint(data, 0)
    if k > 256:
        raise ValueError(f"ans histogram of {k} symbols (at most 256)")
    scaled = []
    for _ in range(k):
        c, pos = read_varint(data, pos)
        scaled.append(c)
    if count == 0:
        return np.zeros(0, np.int32)
    scaled = np.array(scaled, dtype=np.int64)
    words = data[pos:]
    nonzero = np.flatnonzero(scaled)
    if nonzero.size == 0:
        raise ValueError("ans histogram is empty")
    if nonzero.size == 1:
        if words:
            raise ValueError("ans stream of one symbol carries data")
        return np.full(count, nonzero[0], np.int32)
    if len(words) % 4:
        raise ValueError("ans stream is not a whole number of 32-bit words")
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))
    out = np.asarray(coder.decode(_model(scaled), count), dtype=np.int32)
    if not coder.is_empty():
        raise ValueError("ans stream has data left after the last symbol")
    return out


ZSTD_SAMPLE = 1 << 18  # bytes; a larger part's level-19 gain is first read off four quarters of this


def code_part(raw: bytes, symbol_bits: int | None, count: int, zstd_min: int | None = 64) -> tuple[bytes, str]:
    """The smallest of raw / zstd / ans for one packed part: (stored bytes, codec).
    zstd is tried on parts of at least `zstd_min` bytes (None: not at all)."""
    options = [(raw, "raw")]
    if symbol_bits is not None and 1 <= symbol_bits <= MAX_ANS_SYMBOL_BITS and count > 0:
        options.append((ans_encode(symbols_of(raw, symbol_bits, count)), "ans"))
    if zstd_min is not None and len(raw) >= zstd_min and _zstd_may_win(raw, min(len(o[0]) for o in options)):
        options.append((packing.zstd_compress(raw), "zstd"))
    return min(options, key=lambda o: (len(o[0]), CODECS.index(o[1])))


def _zstd_may_win(raw: bytes, best_other: int) -> bool:
    """Whether zstd level 19 can beat `best_other` bytes on a part larger than ZSTD_SAMPLE: level 19
    over level 3 on a sample of the part, times level 3 on the whole (fast), estimates it.

    Why: level 19 was half the time of encoding a large model (31 of 63 s for BERT-base), and the
    size budget measures the file some 50 times a run; on quantized weights' symbol streams ans wins
    (level 19 is no smaller than level 3 there), so those seconds bought nothing. A smaller part is
    always tried, so every artifact of the models the benchmarks use is coded as before."""
    if len(raw) <= ZSTD_SAMPLE:
        return True
    quarter, stride = ZSTD_SAMPLE // 4, len(raw) // 4
    sample = b"".join(raw[i * stride:i * stride + quarter] for i in range(4))
    gain = len(packing.zstd_compress(sample)) / max(1, len(packing.zstd_compress(sample, 3)))
    return gain * len(packing.zstd_compress(raw, 3)) <= best_other


def decode_part(stored: bytes, codec: str, raw_bytes: int, symbol_bits: int | None, count: int) -> bytes:
    """Inverse of `code_part`: the packed bytes (exactly `raw_bytes` of them)."""
    if codec == "raw":
        out = bytes(stored)
    elif codec == "zstd":
        out = packing.zstd_decompress(bytes(stored), raw_bytes)
    elif codec == "ans":
        if symbol_bits is None:
            raise ValueError("ans part without a symbol width")
        symbols = ans_decode(bytes(stored), count)
        if symbols.size and symbols.max() >= (1 << symbol_bits):
            raise ValueError(f"ans decoded a symbol wider than {symbol_bits} bits")
        out = pack_symbols(symbols, symbol_bits)
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    if len(out) != raw_bytes:
        raise ValueError(f"part decodes to {len(out)} bytes, expected {raw_bytes}")
    return out

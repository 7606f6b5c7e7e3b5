"""Bit-packing and sparse encodings round-trip exactly and cost what they claim."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jointcompress.artifact import layer_codec, packing


def _ints(bits, n, sparsity, seed):
    rng = np.random.default_rng(seed)
    qmax = 2 ** (bits - 1) - 1
    q = rng.integers(-qmax, qmax + 1, size=n)
    q[rng.random(n) < sparsity] = 0
    return q.astype(np.int8)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_full_range(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    v = np.arange(lo, hi + 1).repeat(3)
    packed = packing.pack_bits(v, bits)
    assert packed.dtype == np.uint8 and packed.size == (v.size * bits + 7) // 8
    assert np.array_equal(packing.unpack_bits(packed, bits, v.size), v)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        packing.pack_bits(np.zeros(4, np.int8), bits)


def test_out_of_range_values_rejected():
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_bits(np.array([8]), 4)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(0, 3000), sparsity=st.floats(0, 1), seed=st.integers(0, 10**6),
       encoding=st.sampled_from(["dense", "bitmask", "relative", None]))
def test_encode_decode_roundtrip(bits, n, sparsity, seed, encoding):
    q = _ints(bits, n, sparsity, seed)
    e = packing.encode_ints(q, bits, encoding)
    if encoding:
        assert e.encoding == encoding
    out = packing.decode_ints(e.encoding, bits, n, e.values, e.indices, e.entries, e.index_bits)
    assert np.array_equal(out, q)
    assert e.values.size == (e.entries * bits + 7) // 8


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), index_bits=st.integers(2, 8), n=st.integers(1, 2000),
       sparsity=st.floats(0.5, 1.0), seed=st.integers(0, 10**6))
def test_relative_every_index_width_roundtrips(bits, index_bits, n, sparsity, seed):
    q = _ints(bits, n, sparsity, seed)
    e = packing.encode_relative(q, bits, index_bits)
    assert e.entries == packing.relative_entries(np.flatnonzero(q), index_bits)
    assert np.array_equal(packing.decode_ints("relative", bits, n, e.values, e.indices, e.entries, index_bits), q)


def test_relative_uses_fillers_for_long_gaps():
    # Deep Compression example: gap of 20 zeros with 3-bit indices (max 7) needs 2 fillers.
    q = np.zeros(30, np.int8)
    q[[0, 21, 29]] = [1, -2, 3]
    e = packing.encode_relative(q, 4, 3)
    idx = packing.unpack_unsigned(e.indices, 3, e.entries)
    vals = packing.unpack_bits(e.values, 4, e.entries)
    assert idx.tolist() == [0, 7, 7, 4, 7]
    assert vals.tolist() == [1, 0, 0, -2, 3]


def test_smallest_encoding_is_chosen():
    dense = _ints(4, 4096, 0.0, 0)
    assert packing.encode_ints(dense, 4).encoding == "dense"
    mid = _ints(4, 4096, 0.5, 0)
    assert packing.encode_ints(mid, 4).encoding == "bitmask"
    very_sparse = _ints(4, 4096, 0.98, 0)
    e = packing.encode_ints(very_sparse, 4)
    assert e.encoding == "relative"
    alternatives = [packing.encode_bitmask(very_sparse, 4).nbytes, packing.encode_dense(very_sparse, 4).nbytes]
    alternatives += [packing.encode_relative(very_sparse, 4, w).nbytes for w in range(2, 9)]
    assert e.nbytes == min(alternatives)


def test_zstd_only_when_smaller():
    zeros = np.zeros(10000, np.uint8)
    data, codec = packing.maybe_zstd(zeros)
    assert codec == "zstd" and data.size < 100
    assert np.array_equal(np.frombuffer(packing.zstd_decompress(data.tobytes(), 10000), np.uint8), zeros)
    noise = np.random.default_rng(0).integers(0, 256, 10000).astype(np.uint8)
    data, codec = packing.maybe_zstd(noise)
    assert codec == "raw" and np.array_equal(data, noise)


@pytest.mark.parametrize("bits", range(1, 9))
def test_symbols_are_read_back_from_their_packed_bytes_at_every_width(bits):
    """entropy.symbols_of inverts pack_symbols at every width: the widths that divide a byte take
    the direct path, the others the bit planes, and both give the symbols in order, as int64."""
    from jointcompress.artifact.entropy import pack_symbols, symbols_of

    rng = np.random.default_rng(bits)
    for count in (1, 7, 1000, 1001):
        symbols = rng.integers(0, 1 << bits, count)
        out = symbols_of(pack_symbols(symbols, bits), bits, count)
        assert out.dtype == np.int64 and np.array_equal(out, symbols)


def _model_counts_one_shift_at_a_time(counts):
    """entropy.model_counts as a loop over the shifts (its definition): the reference."""
    from jointcompress.artifact.entropy import write_varint

    counts = np.asarray(counts, dtype=np.int64)
    k = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
    counts, best, present = counts[:k], None, counts[:k] > 0
    for shift in range(0, max(1, int(counts.max()).bit_length() if k else 1)):
        scaled = np.where(present, np.maximum((counts + (1 << shift) - 1) >> shift, 1), 0)
        header = len(write_varint(k)) + sum(len(write_varint(int(c))) for c in scaled)
        p = scaled[present] / scaled.sum()
        bits = float(-(counts[present] * np.log2(p)).sum()) if present.sum() > 1 else 0.0
        if best is None or header * 8 + bits < best[1] * 8 + best[2]:
            best = (scaled, header, bits)
    return best if best is not None else (np.zeros(0, np.int64), 1, 0.0)


def test_the_stored_histogram_is_the_one_the_shift_by_shift_search_picks():
    """model_counts prices every shift at once; its pick (the histogram the file stores), header and
    code length are exactly those of trying the shifts one at a time, on skewed and flat histograms
    of every size a layer's parts have."""
    from jointcompress.artifact.entropy import model_counts

    rng = np.random.default_rng(0)
    cases = [np.zeros(4, np.int64), np.array([0, 0, 7]), np.array([5]), np.array([1, 0, 0, 1])]
    for _ in range(300):
        k = int(rng.choice([2, 3, 4, 8, 16, 64, 129, 256]))
        n = int(rng.choice([10, 1_000, 100_000, 2_000_000]))
        p = rng.dirichlet(np.full(k, float(rng.choice([0.05, 0.5, 5.0]))))
        counts = rng.multinomial(n, p)
        if rng.random() < 0.3:
            counts[rng.integers(0, k)] = 0
        cases.append(counts)
    for counts in cases:
        scaled, header, bits = model_counts(counts)
        ref_scaled, ref_header, ref_bits = _model_counts_one_shift_at_a_time(counts)
        assert np.array_equal(scaled, ref_scaled) and header == ref_header and bits == ref_bits, counts


def test_a_layer_encoded_again_comes_from_the_cache_byte_for_byte_and_the_cache_stays_in_its_bound(monkeypatch):
    """The allocator and the landing measure the file again and again with most layers unchanged: a layer
    whose integers (and width) were encoded lately is not encoded again, and gets the same bytes."""
    rng = np.random.default_rng(5)
    q = (rng.integers(-7, 8, 4096) * (rng.random(4096) < 0.2)).astype(np.int8)
    reference = layer_codec._encode_flat(q, 4, True)
    cache = layer_codec._EncodingCache(limit=3 * reference.nbytes)
    monkeypatch.setattr(layer_codec, "_CACHE", cache)
    fresh = []
    monkeypatch.setattr(layer_codec, "_encode_flat", lambda *a, real=layer_codec._encode_flat: fresh.append(a) or real(*a))
    first = layer_codec.encode_layer(q.reshape(64, 64), 4)
    first.parts.clear()  # what a caller does with its copy does not reach the cache
    again = layer_codec.encode_layer(q, 4)
    assert len(fresh) == 1 and again.parts == reference.parts and again.encoding == reference.encoding
    layer_codec.encode_layer(q, 5)  # another width, another entry
    flipped = q.copy()
    flipped[0] = 3 - flipped[0]
    layer_codec.encode_layer(flipped, 4)  # one integer changed: encoded afresh
    assert len(fresh) == 3
    for seed in range(6):  # more layers than the bound holds: the least recently used go first
        layer_codec.encode_layer(np.random.default_rng(seed).integers(-7, 8, 4096).astype(np.int8), 4)
    assert cache.held <= cache.limit and cache.held == sum(c.nbytes for c in cache.entries.values())
    assert len(cache.entries) < 10


def _code_part_level_19_always(raw, symbol_bits, count):
    """code_part as it was: level 19 tried on every part."""
    from jointcompress.artifact import entropy

    options = [(raw, "raw"), (packing.zstd_compress(raw), "zstd"),
               (entropy.ans_encode(entropy.symbols_of(raw, symbol_bits, count)), "ans")]
    return min(options, key=lambda o: (len(o[0]), entropy.CODECS.index(o[1])))


def test_a_large_part_skips_zstd_level_19_only_where_it_cannot_win(monkeypatch):
    """Level 19 was half the time of encoding a large model; on a quantized weight's 4-bit symbols ans
    wins and level 19 is not run, on a repetitive part it still is, and both parts are coded as before."""
    from jointcompress.artifact import entropy

    levels = []
    real = packing.zstd_compress
    monkeypatch.setattr(packing, "zstd_compress", lambda data, level=19: levels.append((len(data), level)) or real(data, level))
    rng = np.random.default_rng(0)
    n = 4 * entropy.ZSTD_SAMPLE  # 4-bit symbols peaked at the middle of the grid, as trained weights are
    weights = packing.pack_bits(np.clip(np.rint(rng.normal(0, 3, n)), -8, 7).astype(np.int8), 4).tobytes()
    coded = entropy.code_part(weights, 4, n)
    assert coded[1] == "ans" and not [size for size, level in levels if level == 19 and size == len(weights)]
    assert coded == _code_part_level_19_always(weights, 4, n)
    tiled = bytes(rng.integers(0, 16, 4096, dtype=np.uint8)) * (len(weights) // 4096)  # repeats: zstd's case
    assert entropy.code_part(tiled, 8, len(tiled)) == _code_part_level_19_always(tiled, 8, len(tiled))
    assert entropy.code_part(tiled, 8, len(tiled))[1] == "zstd"


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 7), n=st.integers(0, 3000), sparsity=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_nonzero_levels_use_every_code_and_roundtrip(bits, n, sparsity, seed):
    """quant_lsq.nonzero_grid: kept values +-1..+-2**(bits-1), stored at `bits` bits each (zero is the bitmask's)."""
    rng = np.random.default_rng(seed)
    top = 2 ** (bits - 1)
    q = (rng.integers(1, top + 1, size=n) * rng.choice([-1, 1], size=n)).astype(np.int8)
    q[rng.random(n) < sparsity] = 0
    coded = layer_codec.encode_layer(q, bits, entropy_coding=False, nonzero_levels=True)
    assert coded.encoding == "bitmask" and coded.entries == np.count_nonzero(q)
    values, codec, raw = coded.parts["values"]
    assert codec == "raw" and len(values) == (coded.entries * bits + 7) // 8
    indices = np.frombuffer(coded.parts["indices"][0], np.uint8)
    out = packing.decode_ints("bitmask", bits, n, np.frombuffer(values, np.uint8), indices, coded.entries,
                              nonzero_levels=True)
    assert np.array_equal(out, q)
    if (q == top).any():  # the top level has no code of its own in the two's complement values
        with pytest.raises(ValueError, match="out of range"):
            packing.encode_bitmask(q, bits)


def test_nonzero_levels_are_read_from_the_bitmask_layout_only():
    e = packing.encode_relative(np.array([0, 1, 0, -2], np.int8), 2, 2)
    with pytest.raises(ValueError, match="non-zero levels are stored in the bitmask encoding, not 'relative'"):
        packing.decode_ints("relative", 2, 4, e.values, e.indices, e.entries, 2, nonzero_levels=True)

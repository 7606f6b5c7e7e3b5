"""Bit-packing and sparse encodings round-trip exactly and cost what they claim."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jointcompress.artifact import packing


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

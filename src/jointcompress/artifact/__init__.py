"""Deployable artifacts: low-bit packed, sparse, checksummed weights + a JSON manifest."""
from .packing import decode_ints, encode_ints, pack_bits, unpack_bits
from .size import dense_fp32_bytes, storage_bytes
from .store import FORMAT_VERSION, load, load_with_spec, read_manifest, save

__all__ = [
    "FORMAT_VERSION", "decode_ints", "dense_fp32_bytes", "encode_ints", "load", "load_with_spec",
    "pack_bits", "read_manifest", "save", "storage_bytes", "unpack_bits",
]

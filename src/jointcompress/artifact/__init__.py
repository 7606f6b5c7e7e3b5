"""Deployable artifacts: low-bit packed, sparse, checksummed weights + a JSON manifest."""
from .packing import decode_ints, encode_ints, pack_bits, unpack_bits
from .size import byte_breakdown, dense_fp32_bytes, format_breakdown, storage_bytes
from .store import FORMAT_VERSION, file_blob, file_sizes, load, load_with_spec, read_manifest, save

__all__ = [
    "FORMAT_VERSION", "byte_breakdown", "decode_ints", "dense_fp32_bytes", "encode_ints", "file_blob", "file_sizes",
    "format_breakdown", "load", "load_with_spec", "pack_bits", "read_manifest", "save", "storage_bytes",
    "unpack_bits",
]

"""The weights file: a minimal, checksummed, pickle-free container for the artifact's parts.

A safetensors file spends ~40-80 bytes of JSON header per tensor (name, dtype, shape,
offsets): 976 bytes for LeNet-300-100, 9% of its 100x artifact. Everything that header says
is already in manifest.json, so the weights file only needs to delimit the parts:

    offset  size  field
    0       3     magic b"JCW"
    3       1     container version (2)
    4       v     varint: number of parts N
    ...     v*N   varint: byte length of each part, in manifest["blob_keys"] order
    ...     sum   the parts, back to back
    end-4   4     CRC-32 (zlib, little-endian) of every byte before it

So a 4-layer model costs 4 + 1 + (about 1-2 bytes per part) + 4 bytes of container. The
manifest additionally holds the file's sha256 and size; the CRC lets the file be checked on
its own. Reading never executes anything: it is a few integer parses and slices.
"""
from __future__ import annotations

import struct
import zlib

from .entropy import read_varint, write_varint

MAGIC = b"JCW"
VERSION = 2
SUFFIX = ".jcw"


def pack(parts: list[bytes]) -> bytes:
    """The weights file for `parts` (in order): byte-identical for identical input."""
    head = MAGIC + bytes([VERSION]) + write_varint(len(parts)) + b"".join(write_varint(len(p)) for p in parts)
    body = head + b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def overhead(lengths: list[int]) -> int:
    """Container bytes (everything but the parts) for parts of these lengths."""
    return 4 + len(write_varint(len(lengths))) + sum(len(write_varint(n)) for n in lengths) + 4


def unpack(blob: bytes) -> list[bytes]:
    """The parts of a weights file; ValueError saying what is wrong with a damaged one."""
    if len(blob) < 9 or blob[:3] != MAGIC:
        raise ValueError("not a jointcompress weights file (bad magic)")
    if blob[3] != VERSION:
        raise ValueError(f"container version {blob[3]} is not supported (reads {VERSION})")
    (crc,) = struct.unpack("<I", blob[-4:])
    if zlib.crc32(blob[:-4]) & 0xFFFFFFFF != crc:
        raise ValueError("CRC-32 does not match: the file is corrupted")
    count, pos = read_varint(blob, 4)
    if count > len(blob):
        raise ValueError(f"index claims {count} parts in a {len(blob)}-byte file")
    lengths = []
    for _ in range(count):
        n, pos = read_varint(blob, pos)
        lengths.append(n)
    if pos + sum(lengths) != len(blob) - 4:
        raise ValueError(f"index describes {pos + sum(lengths) + 4} bytes, the file has {len(blob)}")
    parts = []
    for n in lengths:
        parts.append(bytes(blob[pos:pos + n]))
        pos += n
    return parts

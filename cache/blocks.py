"""What a block is: one immutable object version, cut into blocks of one size.

Names only: the version a block belongs to (`ObjectVersion`, its ``oid``),
the key a block goes by (`BlockKey`), and the arithmetic from bytes to blocks.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectVersion:
    """What a block belongs to: one immutable version of one object."""

    bucket: str
    key: str
    etag: str
    size: int

    @functools.cached_property
    def oid(self) -> str:  # cached: it names the version in every cache lookup
        digest = hashlib.sha256(f"{self.bucket}\0{self.key}\0{self.etag}".encode())
        return digest.hexdigest()[:40]


BlockKey = tuple[str, int]  # (oid, block index)


def block_span(index: int, block_size: int, size: int) -> tuple[int, int]:
    """Byte range ``[start, end)`` of block ``index`` in an object of ``size`` bytes."""
    start = index * block_size
    return start, min(start + block_size, size)


def block_count(block_size: int, size: int) -> int:
    """How many blocks an object of ``size`` bytes has."""
    return -(-size // block_size)


def block_len(index: int, block_size: int, size: int) -> int:
    """How many bytes block ``index`` holds (the last one may be short)."""
    start, end = block_span(index, block_size, size)
    return end - start


def blocks_for_range(offset: int, length: int, block_size: int, size: int) -> range:
    """Indices of the blocks that hold bytes ``[offset, offset+length)``, clipped to EOF."""
    end = min(offset + length, size)
    if offset >= end:
        return range(0)
    return range(offset // block_size, (end - 1) // block_size + 1)

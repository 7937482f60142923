"""Reading a GET body: exact pieces, whole objects checked against their MD5 first.

A body is read in pieces aligned to the cache's chunks (`piece_size`), so the
caller can hand each block on as soon as it has arrived; a body that ends
early is a `TransientError` (the caller resumes from the first piece not yet
delivered). A whole single-part object is read to its end and checked against
its MD5 ETag before any piece is handed on (`Md5Mismatch` otherwise). The
retry itself is the caller's (`S3Store.iter_range`, under `store.retry`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from s3cachefs.base.errors import BadResponseError, TransientError


def read_pieces(
    body: Any, start: int, pos: int, end: int, chunk: int, first: int, md5: str | None, what: str
) -> Iterator[bytes]:
    """Bytes ``[pos, end)`` of a body, in the pieces of a range that began at ``start``.

    With ``md5`` (a whole single-part object, ``pos`` 0): not one piece before the
    whole body matched it.
    """
    if md5 is not None:
        yield from read_verified(body, end, chunk, first, md5, what)
        return
    while pos < end:
        piece = read_exactly(body, min(piece_size(pos - start, chunk, first), end - pos))
        if piece is None:
            raise TransientError(f"{what}: body ended early at byte {pos}")
        pos += len(piece)
        yield piece


def piece_size(done: int, chunk: int, first: int) -> int:
    """The next piece after ``done`` bytes: chunk-aligned, the first chunk split at ``first``."""
    if 0 < first < chunk and done < first:
        return first - done
    return chunk - done % chunk


def release(body: Any, whole: bool) -> None:
    """Give a read-to-the-end connection back to the pool; close one left mid-body."""
    if whole and hasattr(body, "release_conn"):
        body.release_conn()
    else:
        body.close()


def read_verified(body: Any, size: int, chunk: int, first: int, md5: str, what: str) -> list[bytes]:
    """A whole object's body in pieces, read to its end and checked against its MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    pieces: list[bytes] = []
    pos = 0
    while pos < size:
        piece = read_exactly(body, min(piece_size(pos, chunk, first), size - pos))
        if piece is None:
            raise TransientError(f"{what}: body ended early at byte {pos}")
        digest.update(piece)
        pieces.append(piece)
        pos += len(piece)
    if digest.hexdigest() != md5:
        raise Md5Mismatch(what, digest.hexdigest())
    return pieces


class Md5Mismatch(BadResponseError):
    """A whole body that is not its MD5 ETag; ``digest``: what it was (a retry may match)."""

    def __init__(self, what: str, digest: str) -> None:
        super().__init__(what, "md5", "body does not match its MD5 ETag")
        self.digest = digest


def read_exactly(body: Any, size: int) -> bytes | None:
    """``size`` bytes from a streaming body, or None if it ends first."""
    parts: list[bytes] = []
    missing = size
    while missing:
        data = body.read(missing)
        if not data:
            return None
        parts.append(data)
        missing -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)

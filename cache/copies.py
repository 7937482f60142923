"""Copies of whole objects inside the cache (`cache.reuse`): made the cheapest way the
filesystem offers, read back against the source's block CRCs. Blocking steps, and
the limiter they run under.

A copy (and its read-back) of a large object holds its thread for long: it runs
under a limiter of its own (`COPIES_AT_ONCE`), never the shared disk limiter's
slots that foreground reads wait for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import zlib
from pathlib import Path

import trio

from s3cachefs.cache.blocks import block_span

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
WAYS = ("clone", "copy_file_range", "read-write")
# A way this filesystem (or kernel) does not offer: the next one is tried.
_NOT_HERE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
# Copies running at once, per cache: the disk stays free for reads.
COPIES_AT_ONCE = 2


class Copies:
    """A cache's copies: their own limiter."""

    def __init__(self) -> None:
        self.limiter = trio.CapacityLimiter(COPIES_AT_ONCE)


def copy_and_check(
    source: Path, target: Path, crcs: dict[int, int], block_size: int, size: int
) -> tuple[Path, str] | int:
    """Copy ``source`` beside ``target`` and read it back against ``crcs``. Blocking.

    Returns (the copy, the way it was made), or the first block that did not
    match (the copy removed).
    """
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.reuse-")
    copy = Path(name)
    try:
        with open(source, "rb") as src:
            how = next(
                way
                for way in WAYS
                if copy_with(way, src.fileno(), fd, size, block_size) is not None
            )
        bad = _first_bad(fd, crcs, block_size, size)
    except BaseException:
        os.close(fd)
        copy.unlink(missing_ok=True)
        raise
    os.close(fd)
    if bad is not None:
        copy.unlink()
        return bad
    return copy, how


def copy_with(way: str, src: int, dst: int, size: int, block_size: int) -> str | None:
    """Copy ``size`` bytes from ``src`` to the empty ``dst`` one way; None if the
    filesystem does not offer it (``dst`` is then empty again). Blocking."""
    try:
        if way == "clone":
            fcntl.ioctl(dst, FICLONE, src)
        elif way == "copy_file_range":
            done = 0
            while done < size and (n := os.copy_file_range(src, dst, size - done, done, done)):
                done += n  # 0: the source is shorter; the read back finds it
        else:
            for start in range(0, size, block_size):
                data = os.pread(src, min(block_size, size - start), start)
                if os.pwrite(dst, data, start) != len(data):
                    raise OSError(errno.EIO, "short write")
    except OSError as exc:
        if exc.errno not in _NOT_HERE or way == WAYS[-1]:
            raise
        os.ftruncate(dst, 0)
        return None
    return way


def _first_bad(fd: int, crcs: dict[int, int], block_size: int, size: int) -> int | None:
    """The first block of the file that is not ``crcs``' bytes; None if every one is."""
    os.ftruncate(fd, size)  # exactly the object, as `cache.layout` keeps every file
    for idx in range(-(-size // block_size)):
        start, end = block_span(idx, block_size, size)
        data = os.pread(fd, end - start, start)
        if len(data) != end - start or zlib.crc32(data) != crcs.get(idx):
            return idx
    return None

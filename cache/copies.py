"""Copies of whole objects inside the cache (`cache.reuse`): made the cheapest way the
filesystem offers, read back against the source's block CRCs. Blocking steps, and
the limiter they run under.

A copy (and its read-back) of a large object holds its thread for long: it runs
under a limiter of its own (`COPIES_AT_ONCE`), never the shared disk limiter's
slots that foreground reads wait for. The way that works is learnt once per
cache (`Copies`), not per object.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
import threading
from pathlib import Path

import trio

from s3cachefs.cache.blocks import block_span
from s3cachefs.store.crc import crc32

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
WAYS = ("clone", "copy_file_range", "read-write")
# The usual answers of a filesystem (or kernel) that does not offer a way: logged at
# INFO when it is dropped; any other error before a byte is written, at WARNING.
_NOT_HERE = {
    errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
    524,  # ENOTSUPP, the kernel's own (not in errno)
}  # fmt: skip
# Copies running at once, per cache: the disk stays free for reads.
COPIES_AT_ONCE = 2

log = logging.getLogger(__name__)


class Copies:
    """A cache's copies: their own limiter, and the ways that work on its filesystem.

    A way that fails before it writes a byte (not offered here: EOPNOTSUPP on ext4
    for a reflink, EPERM, ENOTSUPP, ...) is dropped for the cache's life, with one
    log line, and the next is tried; read and write is always left. Called from
    worker threads: the list changes under a lock.
    """

    def __init__(self) -> None:
        self.limiter = trio.CapacityLimiter(COPIES_AT_ONCE)
        self.ways = list(WAYS)
        self._lock = threading.Lock()

    def copy(self, src: int, dst: int, size: int, block_size: int) -> str:
        """Copy ``size`` bytes from ``src`` to the empty ``dst`` the first way that works
        here; the way. Blocking; raises OSError if even read and write fails."""
        for way in list(self.ways):
            failed = copy_with(way, src, dst, size, block_size)
            if failed is None:
                return way
            self._drop(way, failed)
        raise AssertionError("read and write is never dropped")  # pragma: no cover

    def _drop(self, way: str, failed: OSError) -> None:
        with self._lock:
            if way not in self.ways:
                return  # another thread's copy dropped it meanwhile
            self.ways.remove(way)
        level = logging.INFO if failed.errno in _NOT_HERE else logging.WARNING
        log.log(level, "cache copies: %s failed (%s); not tried again", way, failed)

    def copy_and_check(
        self, source: Path, target: Path, crcs: dict[int, int], block_size: int, size: int
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
                how = self.copy(src.fileno(), fd, size, block_size)
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


def copy_with(way: str, src: int, dst: int, size: int, block_size: int) -> OSError | None:
    """Copy ``size`` bytes from ``src`` to the empty ``dst`` one way: None once done; the
    error if it failed before a byte was written (``dst`` empty again: the next way may
    be tried). Raises OSError if it failed after (or read and write failed). Blocking."""
    done = 0
    try:
        if way == "clone":
            fcntl.ioctl(dst, FICLONE, src)  # all or nothing
        elif way == "copy_file_range":
            while done < size and (n := os.copy_file_range(src, dst, size - done, done, done)):
                done += n  # 0: the source is shorter; the read back finds it
        else:
            for start in range(0, size, block_size):
                data = os.pread(src, min(block_size, size - start), start)
                if os.pwrite(dst, data, start) != len(data):
                    raise OSError(errno.EIO, "short write")
    except OSError as exc:
        if done or way == WAYS[-1]:
            raise
        os.ftruncate(dst, 0)
        return exc
    return None


def _first_bad(fd: int, crcs: dict[int, int], block_size: int, size: int) -> int | None:
    """The first block of the file that is not ``crcs``' bytes; None if every one is."""
    os.ftruncate(fd, size)  # exactly the object, as `cache.layout` keeps every file
    for idx in range(-(-size // block_size)):
        start, end = block_span(idx, block_size, size)
        data = os.pread(fd, end - start, start)
        if len(data) != end - start or crc32(data) != crcs.get(idx):
            return idx
    return None

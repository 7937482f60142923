"""The check of a cache file before `fs.passthrough` hands it to the kernel: every block
read through the very descriptor that will be registered, and its CRC compared with the
ledger's; the descriptor flocked (shared) for as long as the kernel holds the file.

Runs in a worker thread on plain values: no ledger, no trio.
"""

from __future__ import annotations

import fcntl
import os
import threading

from s3cachefs.cache.blocks import block_span
from s3cachefs.store.crc import crc32

# A cache file as checked: device, inode, size, mtime, ctime.
Identity = tuple[int, int, int, int, int]


def verified_fd(
    path: str, size: int, block_size: int, crcs: dict[int, int], stop: threading.Event
) -> tuple[int | None, Identity]:
    """A read-only descriptor of a cache file whose every block passed its CRC through it
    (None if one failed, or ``stop`` was set), and the file's identity as it was read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Held for as long as the kernel holds this open file (past our close, and past a
        # kill -9 of this daemon): eviction never punches a file locked so (`cache.layout`).
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a punch is under way: not this time
            os.close(fd)
            return None, (0, 0, 0, 0, 0)
        identity = identity_of(os.fstat(fd))
        if identity[2] != size:
            os.close(fd)
            return None, identity
        for idx in range(-(-size // block_size)):
            start, end = block_span(idx, block_size, size)
            if stop.is_set():  # unmounting
                os.close(fd)
                return None, identity
            data = os.pread(fd, end - start, start)
            if idx not in crcs or len(data) != end - start or crc32(data) != crcs[idx]:
                os.close(fd)
                return None, identity
    except BaseException:
        os.close(fd)
        raise
    return fd, identity


def identity_of(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

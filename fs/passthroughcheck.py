"""The check of a cache file before `fs.passthrough` hands it to the kernel: every block
read through the very descriptor that will be registered, and its CRC compared with the
ledger's; the descriptor flocked (shared) for as long as the kernel holds the file.

Read CHECK_CHUNK bytes per call, each a worker thread's call under one disk token: a
check of a multi-GiB file takes no token for its whole read, and stops between two
calls once unmount begins (`Passthrough.stop`).

Runs in a worker thread on plain values: no ledger, no trio.
"""

from __future__ import annotations

import fcntl
import os

from s3cachefs.cache.blocks import block_span
from s3cachefs.store.crc import crc32

# A cache file as checked: device, inode, size, mtime, ctime.
Identity = tuple[int, int, int, int, int]

# Bytes checked per worker-thread call (whole blocks, at least one).
CHECK_CHUNK = 4 << 20


def verified_fd(
    path: str, size: int, block_size: int, crcs: dict[int, int], upto: int
) -> tuple[int | None, Identity]:
    """A read-only descriptor of a cache file whose blocks below ``upto`` passed their
    CRC through it (None if one failed), and the file's identity as it was read."""
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
        if identity[2] != size or not blocks_pass(fd, size, block_size, crcs, 0, upto):
            os.close(fd)
            return None, identity
    except BaseException:
        os.close(fd)
        raise
    return fd, identity


def blocks_pass(
    fd: int, size: int, block_size: int, crcs: dict[int, int], first: int, last: int
) -> bool:
    """Whether blocks ``first`` to ``last`` (excluded) read through ``fd`` pass their CRC."""
    for idx in range(first, last):
        start, end = block_span(idx, block_size, size)
        data = os.pread(fd, end - start, start)
        if idx not in crcs or len(data) != end - start or crc32(data) != crcs[idx]:
            return False
    return True


def identity_of(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

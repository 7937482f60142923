"""Giving freed memory back to the operating system.

A prefetch passes gigabytes through 1 MiB buffers. glibc keeps what they
freed in its heap (its mmap threshold grows to the largest chunk freed), so
without a trim the daemon's RSS stays near its high-water mark after a
prefetch (`python -m bench.prefetchrss`, 3 x 512 MiB + 300 pages: 196-219 MiB after the
prefetch without, 163 MiB with a trim). Trimming once after each prefetch
and on the status tick costs a few milliseconds; a fixed mmap threshold
(every buffer mmap'd) cost ~10% more prefetch CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name) if _libc_name else None


# glibc gives each busy thread its own heap ("arena"), up to 8 per core; with 64
# S3 threads passing 1 MiB buffers, each arena keeps its own free pages. Two
# arenas: a 3 x 512 MiB prefetch peaked at 324 MiB RSS instead of 371 MiB, at
# the same CPU time (one run each).
_M_ARENA_MAX = -8  # <malloc.h>
ARENAS = 2


def limit_arenas() -> None:
    """Fewer malloc arenas (call before threads start); a no-op without glibc."""
    if _libc is not None:
        with contextlib.suppress(AttributeError):
            _libc.mallopt(_M_ARENA_MAX, ARENAS)


def trim() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    if _libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc (musl)
            _libc.malloc_trim(0)

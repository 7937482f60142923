"""What the systems are made to do: parallel whole-file reads, a stat walk, first bytes.

Readers are separate processes (fork) reading whole files with 1 MiB reads,
each taking every Nth file, so N readers share the work evenly.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

BUF = 1024 * 1024


def _read(paths: list[str]) -> int:
    buf = bytearray(BUF)
    view = memoryview(buf)
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return total


def read_all(paths: list[Path], readers: int) -> tuple[float, int]:
    """Seconds and bytes for ``readers`` processes to read every path once."""
    names = [str(p) for p in paths]
    chunks = [names[i::readers] for i in range(readers)]
    with multiprocessing.get_context("fork").Pool(readers) as pool:
        pool.map(_noop, range(readers))  # the workers exist before the clock starts
        start = time.perf_counter()
        total = sum(pool.map(_read, chunks, chunksize=1))
        return time.perf_counter() - start, total


def _noop(_: int) -> None:
    pass


def walk(root: Path) -> tuple[float, int]:
    """os.walk + stat of every entry: seconds and entries."""
    start = time.perf_counter()
    count = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.stat(os.path.join(dirpath, name))
            count += 1
    return time.perf_counter() - start, count


def one_first_byte(path: Path) -> float:
    """Seconds from open() to the first byte of ``path``."""
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        f.read(1)
    return time.perf_counter() - start


def first_byte(paths: list[Path]) -> float:
    """Median seconds from open() to the first byte, over ``paths``, one at a time."""
    times = []
    for path in paths:
        start = time.perf_counter()
        with path.open("rb", buffering=0) as f:
            f.read(1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_of(fn: Callable[[str], object], keys: list[str]) -> float:
    times = []
    for key in keys:
        start = time.perf_counter()
        fn(key)
        times.append(time.perf_counter() - start)
    return statistics.median(times)

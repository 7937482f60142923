"""Checks of kernel-served files: every block against its CRC32, read from disk at low priority.

The kernel serves a bound tree without the daemon, so nothing checks those
bytes on the way to a reader (the FUSE path checks every block it serves).
What guards them is this check: each file the tree links is read back and
every block compared with the CRC32 the cache recorded when the block's bytes
were fetched and verified end to end. `datasets.kernelserve` runs it before it
binds a tree at start, on a schedule (``--verify-interval``), and acts on what
it finds (unbind, so the FUSE path serves the dataset).

How the reading is done, and why:
- ``O_DIRECT`` where the file system supports it: the bytes on the disk are
  checked (a page cache that still holds good bytes would hide a bad sector
  until it is evicted), and a scan of a dataset larger than memory does not
  evict the pages the job is reading. Dirty pages are written back first by the
  kernel, so a direct read sees every write.
- In a thread of its own, at the lowest CPU priority (nice 19) and the idle
  I/O class for scheduled checks (best effort, lowest level, for the check at
  start, which the dataset waits on to be kernel-served): a job's reads come
  first. A thread of its own, not one of trio's cached workers, because
  priorities are per thread and would stick to the worker.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import trio

from s3cachefs.store.crc import crc32

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class FileCheck:
    """One file to check: where it is, how long it must be, and each block's CRC32."""

    key: str
    path: Path
    size: int
    crcs: dict[int, int]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check of one dataset (immutable: the metrics thread reads it)."""

    trigger: str  # "start", "scheduled" or "verify"
    finished: float  # time.time()
    objects: int
    bytes: int
    damaged: tuple[str, ...]  # keys whose file failed

    @property
    def ok(self) -> bool:
        return not self.damaged

    def describe(self) -> dict[str, object]:
        return {
            "trigger": self.trigger,
            "at": self.finished,
            "ok": self.ok,
            "objects": self.objects,
            "bytes": self.bytes,
            "damaged": list(self.damaged[:20]),
            "damaged_count": len(self.damaged),
        }


class Stopped(Exception):
    """The check was cancelled (the daemon is stopping)."""


def scan(
    files: list[FileCheck],
    block_size: int,
    stop: threading.Event | None = None,
    root: Path | None = None,
) -> list[str]:
    """Keys of the files that fail. Blocking; raises Stopped when ``stop`` is set, or when
    ``root`` (the tree the files are in) went away under the scan: one line, not one a file."""
    buffer = mmap.mmap(-1, block_size)  # page-aligned, as O_DIRECT wants
    try:
        damaged = []
        for check in files:
            if stop is not None and stop.is_set():
                raise Stopped
            failure = _file_failure(check, buffer, block_size)
            if failure is None:
                continue
            if failure:  # not a block that failed its CRC32: the file may have gone
                if (stop is not None and stop.is_set()) or (root is not None and not root.exists()):
                    log.info("check ended: %s went away (unbound or evicted)", root or check.path)
                    raise Stopped
                log.warning("check key=%s: %s", check.key, failure)
            damaged.append(check.key)
        return damaged
    finally:
        buffer.close()


def _file_failure(
    check: FileCheck, buffer: mmap.mmap, block_size: int, *, direct: bool = True
) -> str | None:
    """Why the file fails: None if intact, "" if a block fails its CRC32 (the check's
    summary line says so), else what went wrong. A read error of the device is damage too."""
    try:
        fd = os.open(check.path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:  # no O_DIRECT on this file system (tmpfs)
            return _file_failure(check, buffer, block_size, direct=False)
        return f"cannot open {check.path}: {exc.strerror}"
    try:
        return None if _blocks_intact(fd, check, buffer, block_size) else ""
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:  # an alignment the device does not take
            return _file_failure(check, buffer, block_size, direct=False)
        return f"read failed: {exc.strerror}"
    finally:
        os.close(fd)


def _blocks_intact(fd: int, check: FileCheck, buffer: mmap.mmap, block_size: int) -> bool:
    if os.fstat(fd).st_size != check.size:
        return False
    with memoryview(buffer) as view:
        for index in range(-(-check.size // block_size)):
            start = index * block_size
            length = min(block_size, check.size - start)
            if index not in check.crcs or os.preadv(fd, [buffer], start) < length:
                return False
            if crc32(view[:length]) != check.crcs[index]:
                return False
    return True


def lower_priority(*, idle: bool) -> None:
    """Make the calling thread yield to everything else: nice 19, idle (or lowest) I/O class."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)  # per thread on Linux
    try:
        thread = psutil.Process(tid)
        if idle:
            thread.ionice(psutil.IOPRIO_CLASS_IDLE)
        else:
            thread.ionice(psutil.IOPRIO_CLASS_BE, 7)
    except (psutil.Error, OSError, AttributeError) as exc:  # not Linux, or no such thread
        log.debug("cannot lower the I/O priority of the check: %s", exc)


async def run_in_own_thread(fn: Callable[[threading.Event], T], *, name: str) -> T:
    """Run ``fn(stop)`` in a new thread and wait for it; a cancelled wait sets ``stop``."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    stop = threading.Event()
    results: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            results.append(fn(stop))
        except BaseException as exc:  # noqa: BLE001  handed to the waiting task
            errors.append(exc)
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(done.set, trio_token=token)

    threading.Thread(target=body, name=name, daemon=True).start()
    try:
        await done.wait()
    finally:
        stop.set()
    if errors:
        raise errors[0]
    return results[0]


async def check_files(
    files: list[FileCheck], block_size: int, *, idle: bool, root: Path | None = None
) -> list[str]:
    """`scan` in a thread of its own at low priority; keys of the files that failed."""

    def body(stop: threading.Event) -> list[str]:
        lower_priority(idle=idle)
        started = time.monotonic()
        damaged = scan(files, block_size, stop, root)
        log.debug("check files=%d took %.1fs", len(files), time.monotonic() - started)
        return damaged

    return await run_in_own_thread(body, name="s3cachefs-check")

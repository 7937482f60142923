"""Where the cache lives on disk: the directory lock, the format file, the object files.

Layout (versioned, so a future format ignores this one instead of misreading it)::

    CACHE_DIR/lock                       flock'd by the one daemon using the dir
    CACHE_DIR/v1/format.json             {"format": 1, "block_size": ...}
    CACHE_DIR/v1/index/                  diskcache (SQLite): object and block records
    CACHE_DIR/v1/objects/ab/cd/<oid>     one sparse file per object version

One file per object *version* (oid = hash of bucket, key, ETag), filled block
by block with ``pwrite`` at the block's offset, so that a complete file is a
byte-exact copy of the object: a pinned dataset can later be exposed to the
kernel as plain files (hard links) with no daemon on the read path. An evicted
block becomes a hole (``FALLOC_FL_PUNCH_HOLE``), the file keeps its length.

The file calls here are blocking (worker threads, `cache.disk`); which comes
before which index row is the crash discipline, in `cache.disk`. The checks of
a cache dir before anything is written into it are in `cache.cachedir`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import logging
import os
from collections.abc import Container
from pathlib import Path

from s3cachefs.base.errors import CacheDirError
from s3cachefs.cache.cachedir import FORMAT_VERSION, ensure_private_dir

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    ret = _libc.fallocate(
        fd,
        _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
        ctypes.c_long(offset),
        ctypes.c_long(length),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Layout:
    """The paths of one cache dir, its lock, its format file and its object files."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.root = cache_dir / f"v{FORMAT_VERSION}"
        self.index_dir = self.root / "index"
        self.objects_dir = self.root / "objects"
        self._lock_fd: int | None = None

    def claim(self, block_size: int) -> int:
        """Make the dir private, lock it, read (or write) its format file. Blocking.

        Returns the block size to use: the one the dir was made with.
        """
        for note in ensure_private_dir(self.cache_dir):
            log.warning("%s", note)
        try:
            self.objects_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheDirError(f"cannot use cache dir {self.cache_dir}: {exc.strerror}") from None
        self._lock()
        return self._check_format(block_size)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        path = self.cache_dir / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CacheDirError(f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CacheDirError(
                f"cache dir {self.cache_dir} is in use by another s3cachefs daemon (pid {owner});"
                " give this mount its own --cache-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _check_format(self, block_size: int) -> int:
        path = self.root / "format.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"format": FORMAT_VERSION, "block_size": block_size}))
            os.replace(tmp, path)
            return block_size
        except (OSError, ValueError) as exc:
            raise CacheDirError(f"unreadable cache format file {path}: {exc}") from None
        stored = int(meta.get("block_size", 0))
        if stored != block_size:
            log.info("cache_dir=%s keeps its block_size=%d", self.cache_dir, stored)
        return stored

    # ---- object files (blocking) -----------------------------------------

    def path(self, oid: str) -> Path:
        return self.objects_dir / oid[:2] / oid[2:4] / oid

    def strays(self, known: Container[str]) -> list[Path]:
        """Object files whose oid is not ``known`` (the sweep at start)."""
        return [p for p in self.objects_dir.glob("*/*/*") if p.name not in known and p.is_file()]

    def write_block(self, oid: str, size: int, offset: int, data: bytes) -> None:
        """``data`` at ``offset`` of the object's file, created sparse at its full ``size``."""
        path = self.path(oid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        except FileNotFoundError:  # first block of a new fan-out directory
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse, full length: a complete file is the object
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def read(self, oid: str, offset: int, length: int) -> bytes:
        fd = os.open(self.path(oid), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def punch(self, oid: str, offset: int, length: int) -> None:
        """Give an evicted block's bytes back to the disk (a file already gone: nothing).

        Not while the kernel reads the file as a FUSE passthrough backing file: that
        file holds a shared flock (`fs.passthrough`) for as long as the kernel holds it,
        also past a kill -9 of the daemon that registered it (a reader of the old mount
        reads on), and a hole would be zeros to that reader. The block is off the books
        either way; its bytes stay until the file is deleted."""
        try:
            fd = os.open(self.path(oid), os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.debug("%s: read by the kernel (passthrough), not punched", oid)
                return
            _punch_hole(fd, offset, length)
        finally:
            os.close(fd)

    def place(self, oid: str, source: Path) -> Path:
        """Move a complete file (same filesystem) into place as the object's file."""
        target = self.path(oid)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(source, target)
        return target

    def remove(self, oid: str) -> None:
        self.path(oid).unlink(missing_ok=True)

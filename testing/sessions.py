"""One filesystem interface, two implementations: the core (no kernel) and a real mount.

Behaviour tests are written once against `Session` and run against both
(STYLE #11): what passes on the core but fails through the kernel points at
the adapter or kernel caching. Both sides raise OSError with the same errno:
the core's errors go through the adapter's one table (`errno_for`).

Writes follow the kernel's sequence: ``create`` (or ``open_write``), ``write``
at offsets, ``fsync``, and ``close_file``, which is FLUSH (the upload, whose
error close() returns) then RELEASE.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import S3CacheFSError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets.pins import PinStore
from s3cachefs.datasets.prefetch import PrefetchJob
from s3cachefs.fs.attributes import FsStats
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import ROOT_INODE
from s3cachefs.fs.operations import errno_for
from s3cachefs.staging.writeback import Writeback
from s3cachefs.store.s3 import S3Store

T = TypeVar("T")


@dataclass(frozen=True)
class Stat:
    is_dir: bool
    size: int
    mtime_ns: int
    mode: int  # permission bits


class Session(Protocol):
    def listdir(self, path: str) -> list[str]: ...
    def stat(self, path: str) -> Stat: ...
    def statfs(self) -> FsStats: ...
    def read(self, path: str, offset: int = 0, length: int = -1) -> bytes: ...
    def create(self, path: str) -> int: ...
    def open_write(self, path: str, *, truncate: bool) -> int: ...
    def write(self, fh: int, offset: int, data: bytes) -> int: ...
    def fsync(self, fh: int) -> None: ...
    def close_file(self, fh: int) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def pin(self, dataset: str) -> None: ...
    def close(self) -> None: ...


def write_file(session: Session, path: str, data: bytes, chunk: int = 256 * 1024) -> None:
    """Create ``path``, write ``data`` sequentially and close it (the upload)."""
    fh = session.create(path)
    try:
        for pos in range(0, len(data), chunk):
            session.write(fh, pos, data[pos : pos + chunk])
    finally:
        session.close_file(fh)


class MountSession:
    def __init__(self, root: Path) -> None:
        self.root = root

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.root / path))

    def stat(self, path: str) -> Stat:
        st = os.stat(self.root / path)
        return Stat(stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))

    def statfs(self) -> FsStats:
        st = os.statvfs(self.root)
        return FsStats(
            block_size=st.f_bsize,
            blocks=st.f_blocks,
            free_blocks=st.f_bavail,
            files=st.f_files,
            free_files=st.f_ffree,
            name_max=st.f_namemax,
        )

    def read(self, path: str, offset: int = 0, length: int = -1) -> bytes:
        fd = os.open(self.root / path, os.O_RDONLY)
        try:
            if length < 0:
                length = os.fstat(fd).st_size - offset
            chunks = []
            while length > 0:
                chunk = os.pread(fd, length, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def create(self, path: str) -> int:
        return os.open(self.root / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def open_write(self, path: str, *, truncate: bool) -> int:
        return os.open(self.root / path, os.O_WRONLY | (os.O_TRUNC if truncate else 0))

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return os.pwrite(fh, data, offset)

    def fsync(self, fh: int) -> None:
        os.fsync(fh)

    def close_file(self, fh: int) -> None:
        os.close(fh)

    def mkdir(self, path: str) -> None:
        os.mkdir(self.root / path)

    def unlink(self, path: str) -> None:
        os.unlink(self.root / path)

    def rmdir(self, path: str) -> None:
        os.rmdir(self.root / path)

    def rename(self, old: str, new: str) -> None:
        os.rename(self.root / old, self.root / new)

    def pin(self, dataset: str) -> None:
        """``s3cachefs prefetch DATASET``: cached, verified and pinned."""
        result = subprocess.run(
            [sys.executable, "-m", "s3cachefs", "prefetch", dataset, "--mount", str(self.root)],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"prefetch {dataset} failed:\n{result.stdout}{result.stderr}")

    def close(self) -> None:
        pass


class CoreSession:
    """Drives `FsCore` on a trio loop in a background thread; errors become OSError.

    Built as the daemon builds it (`daemon.app`), from the same `MountConfig`:
    writable when ``config.writable``, pinned datasets through a `PinStore`.
    """

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.store = S3Store(config)
        s3_limiter = trio.CapacityLimiter(config.s3_concurrency)
        disk_limiter = trio.CapacityLimiter(4)
        self.cache = BlockCache.from_config(
            config, self.store, s3_limiter=s3_limiter, disk_limiter=disk_limiter
        )
        self.cache.open()
        self.pins = PinStore(self.cache.root, config.bucket, self.cache.ledger)
        self.pins.load()
        writeback = None
        if config.writable:
            writeback = Writeback(
                self.cache,
                self.store,
                part_size=config.upload_part_size,
                s3_limiter=s3_limiter,
                disk_limiter=disk_limiter,
            )
            writeback.open()
        self.core = FsCore(
            self.store,
            self.cache,
            prefix=config.prefix,
            metadata_ttl=config.metadata_ttl,
            s3_limiter=s3_limiter,
            pins=self.pins,
            writeback=writeback,
            allow_overwrite=config.allow_overwrite,
            allow_delete=config.allow_delete,
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        started = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.cache.run)
                started.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        started.wait(10)

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def wrapped() -> T:
            try:
                return await fn()
            except S3CacheFSError as exc:
                code = errno_for(exc)
                raise OSError(code, os.strerror(code)) from exc

        return trio.from_thread.run(wrapped, trio_token=self._token)

    async def _resolve(self, path: str) -> int:
        ino = ROOT_INODE
        for part in [p for p in path.split("/") if p]:
            node = await self.core.lookup(ino, part)
            if node is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            ino = node.ino
        return ino

    async def _parent(self, path: str) -> tuple[int, str]:
        parent, _, name = path.strip("/").rpartition("/")
        return await self._resolve(parent), name

    def listdir(self, path: str) -> list[str]:
        async def go() -> list[str]:
            fh = await self.core.opendir(await self._resolve(path))
            try:
                return [name for name, _, _ in self.core.readdir(fh, 0)]
            finally:
                self.core.releasedir(fh)

        return sorted(self._call(go))

    def stat(self, path: str) -> Stat:
        async def go() -> Stat:
            attrs = self.core.attributes(await self.core.getattr(await self._resolve(path)))
            mode = attrs.mode
            return Stat(stat.S_ISDIR(mode), attrs.size, attrs.mtime_ns, stat.S_IMODE(mode))

        return self._call(go)

    def statfs(self) -> FsStats:
        async def go() -> FsStats:
            return self.core.statfs()

        return self._call(go)

    def read(self, path: str, offset: int = 0, length: int = -1) -> bytes:
        async def go() -> bytes:
            ino = await self._resolve(path)
            fh, _ = await self.core.open(ino)
            try:
                size = self.core.node(ino).size
                n = size - offset if length < 0 else length
                return await self.core.read(fh, offset, n)
            finally:
                await self.core.close(fh)

        return self._call(go)

    def create(self, path: str) -> int:
        async def go() -> int:
            fh, _ = await self.core.create(*await self._parent(path))
            return fh

        return self._call(go)

    def open_write(self, path: str, *, truncate: bool) -> int:
        async def go() -> int:
            return await self.core.open_write(await self._resolve(path), truncate=truncate)

        return self._call(go)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return self._call(lambda: self.core.write(fh, offset, data))

    def fsync(self, fh: int) -> None:
        self._call(lambda: self.core.flush(fh))

    def close_file(self, fh: int) -> None:
        async def go() -> None:
            try:
                await self.core.flush(fh)
            finally:
                await self.core.close(fh)

        self._call(go)

    def mkdir(self, path: str) -> None:
        async def go() -> None:
            await self.core.mkdir(*await self._parent(path))

        self._call(go)

    def unlink(self, path: str) -> None:
        async def go() -> None:
            await self.core.unlink(*await self._parent(path))

        self._call(go)

    def rmdir(self, path: str) -> None:
        async def go() -> None:
            await self.core.rmdir(*await self._parent(path))

        self._call(go)

    def rename(self, old: str, new: str) -> None:
        async def go() -> None:
            old_parent, old_name = await self._parent(old)
            new_parent, new_name = await self._parent(new)
            self.core.rename(old_parent, old_name, new_parent, new_name)

        self._call(go)

    def pin(self, dataset: str) -> None:
        """What ``s3cachefs prefetch DATASET`` asks of the daemon (`daemon.commands`)."""

        async def go() -> dict[str, Any]:
            job = PrefetchJob(
                self.store,
                self.cache,
                self.pins,
                prefix=self.config.prefix + dataset.strip("/") + "/",
                shard=None,
                jobs=self.config.prefetch_jobs,
                etag_md5s=self.config.etag_md5s,
            )
            try:
                return await job.run(_ignore)
            finally:
                self.core.pins_changed()

        final = self._call(go)
        if not final["ok"]:
            raise AssertionError(f"prefetch {dataset} failed: {final}")

    def close(self) -> None:
        if self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)
        self.cache.close()


async def _ignore(event: dict[str, Any]) -> None:
    """Prefetch progress: not shown."""

"""One filesystem interface, two implementations: the core (no kernel) and a real mount.

Behaviour tests are written once against `Session` and run against both
(STYLE #11): what passes on the core but fails through the kernel points at
the adapter or kernel caching.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import S3CacheFSError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import ROOT_INODE
from s3cachefs.fs.operations import errno_for
from s3cachefs.store.s3 import S3Store

T = TypeVar("T")


@dataclass(frozen=True)
class Stat:
    is_dir: bool
    size: int
    mtime_ns: int
    mode: int


class Session(Protocol):
    def listdir(self, path: str) -> list[str]: ...
    def stat(self, path: str) -> Stat: ...
    def read(self, path: str, offset: int = 0, length: int = -1) -> bytes: ...
    def close(self) -> None: ...


class MountSession:
    def __init__(self, root: Path) -> None:
        self.root = root

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.root / path))

    def stat(self, path: str) -> Stat:
        st = os.stat(self.root / path)
        return Stat(stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))

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

    def close(self) -> None:
        pass


class CoreSession:
    """Drives `FsCore` on a trio loop in a background thread; errors become OSError."""

    def __init__(self, config: MountConfig) -> None:
        self.store = S3Store(config)
        s3_limiter = trio.CapacityLimiter(config.s3_concurrency)
        self.cache = BlockCache(
            config.cache_dir,
            self.store,
            block_size=config.block_size,
            cache_size=config.cache_size,
            min_free=config.min_free,
            memory_bytes=config.memory_cache_bytes,
            s3_limiter=s3_limiter,
            disk_limiter=trio.CapacityLimiter(4),
        )
        self.cache.open()
        self.core = FsCore(
            self.store,
            self.cache,
            prefix=config.prefix,
            metadata_ttl=config.metadata_ttl,
            s3_limiter=s3_limiter,
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
            node = await self.core.getattr(await self._resolve(path))
            return Stat(node.is_dir, node.size, node.mtime_ns, 0o555 if node.is_dir else 0o444)

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
                self.core.release(fh)

        return self._call(go)

    def close(self) -> None:
        if self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)
        self.cache.close()

"""The filesystem core: one facade over the tree, the handles and the version rules.

It knows nothing of pyfuse3 or the kernel; `fs.operations` adapts it, and the
tests drive it directly (`s3cachefs.testing.sessions`). It raises only
`s3cachefs.base.errors` exceptions.

Who owns what:
- `fs.tree`: inodes, lookups, listings (and pinned listings), what the kernel must forget;
- `fs.handles`: open files and directories, reads and readahead;
- `fs.versions`: which object version an inode and a handle serve;
- `fs.writes`: write-through, on a writable mount (without one, every change is EROFS);
- `fs.attributes`: modes, timeouts, negative entries, statfs figures;
- `fs.renames`: the rename policy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NoReturn

import trio

from s3cachefs.base.errors import ReadOnlyError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets.pins import PinStore
from s3cachefs.fs.attributes import Attributes, FsStats, attributes, fs_stats, negative
from s3cachefs.fs.handles import Handles
from s3cachefs.fs.nodes import FileHandle, Node
from s3cachefs.fs.renames import READ_ONLY, refuse_rename
from s3cachefs.fs.tree import Entries, Tree
from s3cachefs.fs.versions import VersionGuard
from s3cachefs.fs.writes import Writer
from s3cachefs.staging.writeback import Writeback
from s3cachefs.store.types import ObjectStore


class FsCore:
    """A tree over ``bucket/prefix`` served through a `BlockCache`.

    Read-only unless given a ``writeback`` (``--writable``): then writes go
    through a `Writer` under ``allow_overwrite`` and ``allow_delete``.
    """

    def __init__(
        self,
        store: ObjectStore,
        cache: BlockCache,
        *,
        prefix: str,
        metadata_ttl: float,
        s3_limiter: trio.CapacityLimiter,
        readahead_blocks: int = 8,
        keep_cache: bool = True,
        pins: PinStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        writeback: Writeback | None = None,
        allow_overwrite: bool = False,
        allow_delete: bool = False,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.metadata_ttl = metadata_ttl
        self.pins = pins
        self.versions = VersionGuard(store, s3_limiter)
        self.tree = Tree(
            store,
            prefix=prefix,
            metadata_ttl=metadata_ttl,
            s3_limiter=s3_limiter,
            pins=pins,
            clock=clock,
        )
        self.handles = Handles(
            self.tree,
            cache,
            self.versions,
            readahead_blocks=readahead_blocks,
            keep_cache=keep_cache,
        )
        self.writer: Writer | None = None
        if writeback is not None:
            self.writer = Writer(
                self.tree,
                self.handles,
                writeback,
                allow_overwrite=allow_overwrite,
                allow_delete=allow_delete,
                s3_limiter=s3_limiter,
            )
        # A reading handle's last close (`datasets.readserve` links what is complete).
        self.on_closed: Callable[[FileHandle], None] | None = None
        self.uid = os.getuid() if uid is None else uid  # the owner of every file
        self.gid = os.getgid() if gid is None else gid

    def on_invalidate(self, invalidate: Callable[[Entries], None]) -> None:
        """Who makes the kernel forget directory entries (the adapter).

        Called on the trio thread, never awaited: it must only queue the work.
        """
        self.tree.invalidate = invalidate

    # ---- metadata --------------------------------------------------------

    def node(self, ino: int) -> Node:
        return self.tree.node(ino)

    async def lookup(self, parent_ino: int, name: str) -> Node | None:
        """The child ``name`` of a directory, or None (a cacheable negative answer)."""
        return await self.tree.lookup(parent_ino, name)

    async def getattr(self, ino: int) -> Node:
        """Attributes as last listed; never an S3 request (lookups refresh them)."""
        return await self.tree.getattr(ino)

    def remember(self, node: Node) -> None:
        """The kernel got an entry for ``node`` (lookup, readdirplus, create, mkdir)."""
        self.tree.remember(node)

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references. Must not raise."""
        self.tree.forget(ino, nlookup)

    def attributes(self, node: Node) -> Attributes:
        """What the kernel is told about ``node`` (`fs.attributes`)."""
        return attributes(
            node,
            writable=self.writer is not None and not self.tree.in_pinned(node),
            timeout=self.tree.timeout(node),
            uid=self.uid,
            gid=self.gid,
            block_size=self.cache.block_size,
        )

    def entry(self, node: Node | None) -> Attributes:
        """The answer to a lookup: ``node``'s attributes, or a negative entry for None."""
        return negative(self.metadata_ttl) if node is None else self.attributes(node)

    def statfs(self) -> FsStats:
        return fs_stats(self.cache)

    def key_changed(self, key: str) -> None:
        """An object changed behind the tree's back (a staged upload): re-list its directory.

        The kernel is told to forget the name (`on_invalidate`).
        """
        self.tree.key_changed(key)

    def pins_changed(self) -> None:
        """A manifest was saved or deleted: forget every listing a manifest gave.

        The kernel is told to forget their entries (`on_invalidate`).
        """
        self.tree.pins_changed()

    # ---- directories -----------------------------------------------------

    async def opendir(self, ino: int) -> int:
        return await self.handles.opendir(ino)

    def readdir(self, fh: int, start: int) -> list[tuple[str, Node, int]]:
        """Entries from position ``start``: (name, node, position of the next entry)."""
        return self.handles.readdir(fh, start)

    def releasedir(self, fh: int) -> None:
        self.handles.releasedir(fh)

    # ---- files -----------------------------------------------------------

    async def open(self, ino: int) -> tuple[int, bool]:
        """Open a file for reading: its handle, and whether kernel pages are still valid."""
        return await self.handles.open(ino)

    async def read(self, fh: int, offset: int, length: int) -> bytes:
        return await self.handles.read(fh, offset, length)

    def release(self, fh: int) -> FileHandle | None:
        """Drop a reading handle at once (no upload); the kernel's RELEASE is `close`."""
        return self.handles.release(fh)

    def file_handle(self, fh: int) -> FileHandle:
        return self.handles.file_handle(fh)

    async def close(self, fh: int) -> None:
        """The last close of a handle (the kernel's RELEASE); a written file's ends here."""
        if self.writer is None:
            handle = self.handles.release(fh)
            if handle is not None and self.on_closed is not None:
                self.on_closed(handle)
        else:
            await self.writer.release(fh)

    # ---- writes: ReadOnlyError (EROFS) unless the mount is writable --------

    def _writer(self) -> Writer:
        if self.writer is None:  # the kernel refuses writes on an "ro" mount already
            raise ReadOnlyError(READ_ONLY)
        return self.writer

    async def create(self, parent_ino: int, name: str) -> tuple[int, Node]:
        """A new, empty file open for writing: its handle and node."""
        return await self._writer().create(parent_ino, name)

    async def open_write(self, ino: int, *, truncate: bool) -> int:
        """Open an existing file for writing."""
        return await self._writer().open(ino, truncate=truncate)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self._writer().write(fh, offset, data)

    async def flush(self, fh: int) -> None:
        """close() and fsync(): once S3 holds what was written; nothing on a read-only mount."""
        if self.writer is not None:
            await self.writer.flush(fh)

    async def setattr(self, ino: int, *, size: int | None) -> Node:
        """A truncate when ``size`` is given; modes, owners and times are accepted, not kept.

        (S3 has no such metadata; tools such as `cp -p` and `touch` set them.)
        """
        writer = self._writer()
        if size is not None:
            return await writer.truncate(ino, size)
        return await self.tree.getattr(ino)

    async def mkdir(self, parent_ino: int, name: str) -> Node:
        return await self._writer().mkdir(parent_ino, name)

    async def unlink(self, parent_ino: int, name: str) -> None:
        await self._writer().unlink(parent_ino, name)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        await self._writer().rmdir(parent_ino, name)

    def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str) -> NoReturn:
        """Always refused (`fs.renames`)."""
        refuse_rename(old_name, new_name, writable=self.writer is not None)

"""The filesystem core: one facade over the tree, the handles and the version rules.

It knows nothing of pyfuse3 or the kernel; `fs.operations` adapts it, and the
tests drive it directly (`s3cachefs.testing.sessions`). It raises only
`s3cachefs.base.errors` exceptions.

Who owns what:
- `fs.tree`: inodes, lookups, listings (and pinned listings), what the kernel must forget;
- `fs.handles`: open files and directories, reads and readahead;
- `fs.versions`: which object version an inode and a handle serve.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets.pins import PinStore
from s3cachefs.fs.handles import Handles
from s3cachefs.fs.nodes import FileHandle, Node
from s3cachefs.fs.tree import Entries, Tree
from s3cachefs.fs.versions import VersionGuard
from s3cachefs.store.s3 import ObjectStore


class FsCore:
    """A tree over ``bucket/prefix`` served through a `BlockCache`."""

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

    async def children(self, directory: Node) -> dict[str, int]:
        return await self.tree.children(directory)

    def remember(self, node: Node) -> None:
        """The kernel got an entry for ``node`` (lookup, readdirplus, create, mkdir)."""
        self.tree.remember(node)

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references. Must not raise."""
        self.tree.forget(ino, nlookup)

    def in_pinned(self, node: Node) -> bool:
        """Inside a pinned dataset: never writable."""
        return self.tree.in_pinned(node)

    def timeout(self, node: Node) -> float:
        """How long the kernel may trust this entry: pinned data does not change under us."""
        return self.tree.timeout(node)

    def relist(self, directory: Node) -> None:
        """Make the next lookup in ``directory`` list it again."""
        self.tree.relist(directory)

    def key_changed(self, key: str) -> Entries:
        """An object changed behind the tree's back (a staged upload): re-list its directory."""
        return self.tree.key_changed(key)

    def pins_changed(self) -> Entries:
        """A manifest was saved or deleted: forget every listing a manifest gave."""
        return self.tree.pins_changed()

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
        return self.handles.release(fh)

    def file_handle(self, fh: int) -> FileHandle:
        return self.handles.file_handle(fh)

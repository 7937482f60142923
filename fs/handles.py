"""Open files and directories: handles, reads and readahead.

- A directory handle is a snapshot of the listing at ``opendir``; an inode of
  it dropped since (its file changed) reads as what the name means now.
- A file handle reads the version it was opened at (`fs.versions`); if S3 now
  holds another version, its uncached reads fail with ESTALE, the node is
  retired and the name re-listed, so the next open sees the new version.
- A file being written through this mount is read from its staged bytes, then
  from the cache once its upload is adopted.
- Sequential readers grow a readahead window (`_plan_readahead`).

Concurrency: handles change only on the trio thread; `_plan_readahead` must not await.
"""

from __future__ import annotations

import itertools
import os

import trio

from s3cachefs.base.errors import BadHandleError, IsADirError, NotADirError, StaleError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.fs.nodes import DirHandle, FileHandle, Node
from s3cachefs.fs.tree import Tree
from s3cachefs.fs.versions import VersionGuard

# How far out of order a read may arrive and still count as sequential
# (a few of the kernel's 128 KiB FUSE reads in flight at once).
SEQUENTIAL_SLACK = 1024 * 1024


class Handles:
    """The file and directory handles of a `Tree`, and reads through a `BlockCache`."""

    def __init__(
        self,
        tree: Tree,
        cache: BlockCache,
        versions: VersionGuard,
        *,
        readahead_blocks: int,
        keep_cache: bool,
    ) -> None:
        self.tree = tree
        self.cache = cache
        self.versions = versions
        self.readahead_blocks = readahead_blocks
        self.keep_cache = keep_cache
        self._next_fh = itertools.count(1)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}

    async def opendir(self, ino: int) -> int:
        directory = self.tree.node(ino)
        if not directory.is_dir:
            raise NotADirError(f"{directory.key}: not a directory")
        children = await self.tree.children(directory)
        fh = next(self._next_fh)
        self._dirs[fh] = DirHandle(ino, sorted(children.items()))
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[str, Node, int]]:
        """Entries from position ``start``: (name, node, position of the next entry).

        An inode of the snapshot dropped since (its file changed) is replaced by
        what the name means now, or left out if the name is gone.
        """
        handle = self._dir_handle(fh)
        now = self.tree.node(handle.ino).children or {}
        entries = []
        for pos, (name, ino) in enumerate(handle.entries):
            node = self.tree.get(ino) or self.tree.get(now.get(name, -1))
            if pos >= start and node is not None:
                entries.append((name, node, pos + 1))
        return entries

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def _dir_handle(self, fh: int) -> DirHandle:
        try:
            return self._dirs[fh]
        except KeyError:
            raise BadHandleError(f"directory handle {fh}: unknown") from None

    # ---- files -----------------------------------------------------------

    async def open(self, ino: int) -> tuple[int, bool]:
        """Open a file for reading: its handle, and whether kernel pages are still valid."""
        node = self.tree.node(ino)
        if node.is_dir:
            raise IsADirError(f"{node.key}: is a directory")
        if node.staged is not None:  # being written here: read the staged bytes
            try:  # through a descriptor of our own: the data file moves when the upload ends
                fd = await trio.to_thread.run_sync(os.open, node.staged.path, os.O_RDONLY)
            except FileNotFoundError:
                pass  # finished meanwhile: the node names the uploaded version now
            else:
                version = ObjectVersion(self.tree.store.bucket, node.key, "", 0)
                return self.add_handle(FileHandle(node, version, staged=node.staged, fd=fd)), False
        version = ObjectVersion(self.tree.store.bucket, node.key, node.etag, node.size)
        # The kernel's pages are valid while the version is the one they were read from
        # (always, but for a file rewritten through this mount: an inode is one version).
        keep_cache = self.keep_cache and node.opened_etag in (None, node.etag)
        if not keep_cache or node.opened_etag is None:  # else the kernel likely has the pages
            self.cache.open_hint(version)
        node.opened_etag = node.etag
        return self.add_handle(FileHandle(node, version)), keep_cache

    def add_handle(self, handle: FileHandle) -> int:
        fh = next(self._next_fh)
        self._files[fh] = handle
        handle.node.handles += 1
        return fh

    async def read(self, fh: int, offset: int, length: int) -> bytes:
        handle = self.file_handle(fh)
        if handle.fd is not None and handle.staged is not None and handle.staged.final:
            # Written and uploaded: its data is the cache's now, checked and evictable.
            os.close(handle.fd)
            handle.version, handle.fd, handle.staged = handle.staged.final, None, None
        if handle.fd is not None:  # a reader of a file being written
            return await trio.to_thread.run_sync(os.pread, handle.fd, length, offset)
        if handle.staged is not None:  # its writer
            return await trio.to_thread.run_sync(handle.staged.pread, offset, length)
        if offset >= handle.version.size or length <= 0:
            return b""
        self._plan_readahead(handle, offset, length)
        retried = False
        while True:
            version = handle.version
            try:
                data = await self.cache.read(version, offset, length)
                if data:
                    self.versions.served(handle, version)
                return data
            except StaleError:
                # One retry, at the version HEAD confirms, for what has served nothing yet.
                if not retried and await self.versions.rebind(handle, version):
                    retried = True
                    continue
                self.tree.retire(handle.node)
                raise

    def _plan_readahead(self, handle: FileHandle, offset: int, length: int) -> None:
        """Grow a window of blocks fetched ahead while reads stay sequential. Must not await.

        "Sequential" tolerates reordering: the kernel sends its own readahead
        reads concurrently, so they arrive slightly out of order (within
        ``SEQUENTIAL_SLACK`` of where the reader is); a jump further away
        restarts the window.
        """
        if handle.next_offset > 0 and abs(offset - handle.next_offset) <= SEQUENTIAL_SLACK:
            handle.sequential_run += 1
        elif offset != handle.next_offset:
            handle.sequential_run = 0
        handle.next_offset = max(handle.next_offset, offset + length)
        if handle.sequential_run == 0 or self.readahead_blocks == 0:
            handle.readahead_until = 0
            return
        block_size = self.cache.block_size
        window = min(self.readahead_blocks, 2 ** (handle.sequential_run - 1))
        last = (min(offset + length, handle.version.size) - 1) // block_size
        nblocks = -(-handle.version.size // block_size)
        start = max(last + 1, handle.readahead_until)
        stop = min(nblocks, last + 1 + window)
        # Top the window up in batches, not a block at a time: a batch is one GET.
        batch = max(1, min(self.cache.run_blocks, window // 2))
        if stop - start >= batch or (stop == nblocks and stop > start):
            handle.readahead_until = self.cache.readahead(handle.version, range(start, stop))

    def release(self, fh: int) -> FileHandle | None:
        handle = self._files.pop(fh, None)
        if handle is None:
            return None
        if handle.fd is not None:
            os.close(handle.fd)
        handle.node.handles -= 1
        self.tree.drop_if_unused(handle.node)
        return handle

    def file_handle(self, fh: int) -> FileHandle:
        try:
            return self._files[fh]
        except KeyError:
            raise BadHandleError(f"file handle {fh}: unknown") from None

"""The filesystem core: inodes, lookups, directory handles and reads.

It knows nothing of pyfuse3 or the kernel; `fs.operations` adapts it, and the
tests drive it directly. It raises only `s3cachefs.base.errors` exceptions.

Semantics (README, "Semantics"):
- A directory is a prefix; its entries come from one paginated
  ListObjectsV2 with delimiter, cached for ``metadata_ttl`` seconds, which also
  answers negative lookups in that directory.
- When a key is both an object and a prefix (``a`` and ``a/b``), the
  directory wins and the object is hidden, with a warning.
- Keys with segments that are not valid names (`fs.names`) are skipped.
- An inode is one object version (key, ETag, size): a re-listing that shows
  another version for a name maps the name to a new inode, so the kernel's
  page cache (kept per inode) cannot mix versions. The old inode stays valid
  for its open handles and is dropped once the kernel forgets it
  (`remember`/`forget` keep the kernel's lookup count). Directories keep
  their inodes.
- A file handle reads the version it was opened at (`fs.versions`); if S3 now
  holds another version, its uncached reads fail with ESTALE, the node is
  retired and the name re-listed, so the next open sees the new version.

Concurrency: dictionaries here change only on the trio thread. ``_apply_listing``
must not await: it swaps a directory's children in one step.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from s3cachefs.base.config import INDEFINITE_TTL
from s3cachefs.base.errors import (
    BadHandleError,
    IsADirError,
    NotADirError,
    NotFoundError,
    StaleError,
    TransientError,
)
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.pins import PinStore
from s3cachefs.fs.versions import VersionGuard
from s3cachefs.staging.writeback import Staged
from s3cachefs.store.keys import valid_name
from s3cachefs.store.s3 import Listing, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

ROOT_INODE = 1
# With S3 unreachable, how long a directory serves its last listing before trying again.
S3_DOWN_RETRY = 10.0
# How far out of order a read may arrive and still count as sequential
# (a few of the kernel's 128 KiB FUSE reads in flight at once).
SEQUENTIAL_SLACK = 1024 * 1024


@dataclass
class Node:
    """A file (an object) or a directory (a prefix)."""

    ino: int
    parent: int
    name: str
    key: str  # object key, or the prefix ending in "/" for a directory
    is_dir: bool
    size: int = 0
    etag: str = ""
    mtime_ns: int = 0
    # directories: name -> inode, and when that listing was taken
    children: dict[str, int] | None = None
    listed_at: float | None = None
    # files: ETag of the last open, to tell the kernel whether its pages are still good
    opened_etag: str | None = None
    # files: the ETag the listing gave (``etag`` is the server's, see `fs.versions`)
    listed_etag: str = ""
    # files: the version whose bytes this inode returned (the kernel may cache them)
    served_etag: str | None = None
    retired: bool = False  # S3 holds another version: the name gets a new inode
    lookups: int = 0  # the kernel's lookup count of this inode
    handles: int = 0  # open file handles
    # inside a pinned dataset: answered from its manifest, never expires
    pinned: bool = False
    pin_generation: int = -1
    # a file being written through this mount: reads come from the staged bytes
    staged: Staged | None = None


@dataclass
class FileHandle:
    node: Node
    version: ObjectVersion
    next_offset: int = 0  # where a sequential reader reads next
    sequential_run: int = 0  # consecutive sequential reads, sizes the readahead window
    readahead_until: int = 0  # blocks before this one have been asked for ahead of the reader
    staged: Staged | None = None  # reading or writing a file being written
    writable: bool = False
    fd: int | None = None  # a reader's own descriptor of the staged data
    served: bool = False  # it returned bytes: it is never re-bound to another version


@dataclass
class DirHandle:
    ino: int
    entries: list[tuple[str, int]] = field(default_factory=list)


class FsCore:
    """A read-only tree over ``bucket/prefix`` served through a `BlockCache`."""

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
        self.readahead_blocks = readahead_blocks
        self.keep_cache = keep_cache
        self.pins = pins
        self._s3_limiter = s3_limiter
        self._clock = clock
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, ROOT_INODE, "", prefix, is_dir=True, mtime_ns=0)
        }
        self._next_ino = itertools.count(ROOT_INODE + 1)
        self._next_fh = itertools.count(1)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._listing: dict[int, trio.Event] = {}
        self.versions = VersionGuard(store, s3_limiter)
        # Directory entries the kernel must forget (a name now names another inode);
        # the adapter sets it. Called on the trio thread, must not await.
        self.on_stale_entries: Callable[[list[tuple[int, str]]], None] = lambda entries: None

    # ---- metadata --------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NotFoundError(f"inode {ino}: unknown") from None

    async def lookup(self, parent_ino: int, name: str) -> Node | None:
        """The child ``name`` of a directory, or None (a cacheable negative answer)."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise NotADirError(f"{parent.key}: not a directory")
        if name == ".":
            return parent
        if name == "..":
            return self._nodes[parent.parent]
        children = await self.children(parent)
        ino = children.get(name)
        return None if ino is None else self._nodes[ino]

    async def getattr(self, ino: int) -> Node:
        """Attributes as last listed; never an S3 request (lookups refresh them)."""
        return self.node(ino)

    async def children(self, directory: Node) -> dict[str, int]:
        pinned = self.pins.listing(directory.key) if self.pins else None
        if pinned is not None:  # inside a pinned dataset: the manifest, no S3 request
            assert self.pins is not None
            if directory.pin_generation != self.pins.generation:
                self._apply_listing(directory, pinned, pinned=True)
                directory.pin_generation = self.pins.generation
            assert directory.children is not None
            return directory.children
        while not self._fresh(directory):
            pending = self._listing.get(directory.ino)
            if pending is not None:  # single-flight: one LIST per directory at a time
                await pending.wait()
                continue
            done = self._listing[directory.ino] = trio.Event()
            try:
                listing = await trio.to_thread.run_sync(
                    self.store.list_dir, directory.key, limiter=self._s3_limiter
                )
                self._apply_listing(directory, listing)
            except TransientError:
                if not self._serve_stale(directory):
                    raise
            finally:
                del self._listing[directory.ino]
                done.set()
            break
        assert directory.children is not None
        return directory.children

    def remember(self, node: Node) -> None:
        """The kernel got an entry for ``node`` (lookup, readdirplus, create, mkdir)."""
        node.lookups += 1

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references. Must not raise."""
        node = self._nodes.get(ino)
        if node is not None:
            node.lookups = max(0, node.lookups - nlookup)
            self._drop_if_unused(node)

    def _drop_if_unused(self, node: Node) -> None:
        """Forget a file inode that no name, kernel reference or handle leads to any more."""
        if node.is_dir or node.lookups > 0 or node.handles > 0 or self._is_current(node):
            return
        self._nodes.pop(node.ino, None)

    def _is_current(self, node: Node) -> bool:
        """Whether ``node`` is what its name in its directory means now."""
        parent = self._nodes.get(node.parent)
        return parent is not None and (parent.children or {}).get(node.name) == node.ino

    def _retire(self, node: Node) -> None:
        """S3 refused ``node``'s version: the next lookup of its name makes a new inode.

        Must not await.
        """
        if node.retired:
            return
        node.retired = True
        log.info(
            "key=%s changed in S3 (ETag %s was opened): uncached reads of it get ESTALE,"
            " the next open sees the current version",
            node.key,
            node.etag,
        )
        if self._is_current(node):
            self.relist(self._nodes[node.parent])
            self.on_stale_entries([(node.parent, node.name)])

    def add_node(self, parent: Node, name: str, *, is_dir: bool) -> Node:
        """A name created through this mount (writable mounts). Must not await."""
        key = parent.key + name + ("/" if is_dir else "")
        node = Node(next(self._next_ino), parent.ino, name, key, is_dir, mtime_ns=time.time_ns())
        if is_dir:  # new and empty: nothing to list until the TTL runs out
            node.children, node.listed_at = {}, self._clock()
        self._nodes[node.ino] = node
        assert parent.children is not None
        parent.children[name] = node.ino
        return node

    def remove_name(self, parent: Node, name: str) -> None:
        """Drop a deleted name. The node stays: open handles may still read it."""
        if parent.children is not None:
            parent.children.pop(name, None)

    def relist(self, directory: Node) -> None:
        """Make the next lookup in ``directory`` list it again."""
        directory.listed_at = None

    def key_changed(self, key: str) -> list[tuple[int, str]]:
        """An object changed behind the tree's back (a staged upload): re-list its directory.

        Returns the entry the kernel must forget (it may hold a negative one).
        """
        parent, _, name = key.rpartition("/")
        parent_key = parent + "/" if parent else ""
        stale = []
        for node in self._nodes.values():
            if node.is_dir and node.key == parent_key:
                self.relist(node)
                stale.append((node.ino, name))
        return stale

    def in_pinned(self, node: Node) -> bool:
        """Inside a pinned dataset: never writable."""
        if node.pinned or node.pin_generation >= 0:
            return True
        return node.is_dir and self.pins is not None and self.pins.listing(node.key) is not None

    def _serve_stale(self, directory: Node) -> bool:
        """S3 is unreachable: keep the last listing, or the way down to pinned datasets."""
        below = self.pins.ancestors(directory.key) if self.pins else None
        if directory.children is None and below is None:
            return False
        log.warning("dir=%s S3 unreachable; serving the last known listing", directory.key or "/")
        if directory.children is None and below is not None:
            self._apply_listing(directory, below)
        elif below is not None:  # make sure pinned datasets stay reachable
            assert directory.children is not None
            missing = [
                p
                for p in below.prefixes
                if p[len(directory.key) :].rstrip("/") not in directory.children
            ]
            if missing:
                self._apply_listing(directory, Listing([], below.prefixes), merge=True)
        # Retry after a pause, not on every lookup (a TTL of 0 would re-list each time).
        directory.listed_at = self._clock() - self.metadata_ttl + S3_DOWN_RETRY
        return True

    def _fresh(self, directory: Node) -> bool:
        return (
            directory.children is not None
            and directory.listed_at is not None
            and self._clock() - directory.listed_at < self.metadata_ttl
        )

    def _apply_listing(
        self, directory: Node, listing: Listing, *, pinned: bool = False, merge: bool = False
    ) -> None:
        """Replace (or extend) a directory's children with a listing. Must not await."""
        old = directory.children or {}
        new: dict[str, int] = dict(old) if merge else {}
        skipped: list[str] = []
        for prefix in listing.prefixes:
            name = prefix[len(directory.key) :].removesuffix("/")
            if not valid_name(name):
                skipped.append(prefix)
                continue
            new[name] = self._child(directory, old.get(name), name, prefix, None, pinned)
        for info in listing.objects:
            name = info.key[len(directory.key) :]
            if name == "":
                continue  # the "dir/" marker object of this directory itself
            if not valid_name(name):
                skipped.append(info.key)
                continue
            if name in new:
                log.warning("key=%s is hidden by the directory of the same name", info.key)
                continue
            new[name] = self._child(directory, old.get(name), name, info.key, info, pinned)
        if skipped:
            log.warning(
                "dir=%s skipped %d keys that are not valid file names, e.g. %r",
                directory.key or "/",
                len(skipped),
                skipped[0],
            )
        for name, ino in old.items():  # files being written are not in S3 yet
            node = self._nodes.get(ino)
            if name not in new and node is not None and node.staged is not None:
                new[name] = ino
        directory.children = new
        directory.listed_at = self._clock()
        replaced: list[tuple[int, str]] = []
        for name, ino in old.items():  # a file that changed or went: the kernel re-looks it up
            node = self._nodes.get(ino)
            if new.get(name) != ino and node is not None and not node.is_dir:
                replaced.append((directory.ino, name))
                self._drop_if_unused(node)
        if replaced:
            self.on_stale_entries(replaced)

    def _child(
        self,
        parent: Node,
        ino: int | None,
        name: str,
        key: str,
        info: ObjectInfo | None,
        pinned: bool,
    ) -> int:
        """The inode for ``name``: the old one while it is the same directory or version.

        A file's inode is one version: another ETag or size is a new inode, so
        the kernel's pages of the old one cannot mix into reads of the new one.
        A file being written here keeps its inode (and its own size).
        """
        node = self._nodes.get(ino) if ino is not None else None
        if node is None or not self._same(node, info):
            node = Node(next(self._next_ino), parent.ino, name, key, is_dir=info is None)
            if info is not None:
                node.size, node.etag, node.mtime_ns = info.size, info.etag, info.mtime_ns
                node.listed_etag = info.etag
            self._nodes[node.ino] = node
        elif info is not None and node.staged is None:
            node.mtime_ns = info.mtime_ns  # S3's time for a file written here
        node.pinned = pinned
        return node.ino

    @staticmethod
    def _same(node: Node, info: ObjectInfo | None) -> bool:
        if info is None or node.is_dir:
            return info is None and node.is_dir
        if node.staged is not None:
            return True
        return (
            not node.retired
            and info.size == node.size
            and info.etag in (node.etag, node.listed_etag)  # listed_etag: row 7 gateways
        )

    # ---- directories -----------------------------------------------------

    async def opendir(self, ino: int) -> int:
        directory = self.node(ino)
        if not directory.is_dir:
            raise NotADirError(f"{directory.key}: not a directory")
        children = await self.children(directory)
        fh = next(self._next_fh)
        self._dirs[fh] = DirHandle(ino, sorted(children.items()))
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[str, Node, int]]:
        """Entries from position ``start``: (name, node, position of the next entry).

        An inode of the snapshot dropped since (its file changed) is replaced by
        what the name means now, or left out if the name is gone.
        """
        handle = self._dir_handle(fh)
        now = self._nodes[handle.ino].children or {}
        entries = []
        for pos, (name, ino) in enumerate(handle.entries):
            node = self._nodes.get(ino) or self._nodes.get(now.get(name, -1))
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
        node = self.node(ino)
        if node.is_dir:
            raise IsADirError(f"{node.key}: is a directory")
        if node.staged is not None:  # being written here: read the staged bytes
            try:  # through a descriptor of our own: the data file moves when the upload ends
                fd = await trio.to_thread.run_sync(os.open, node.staged.path, os.O_RDONLY)
            except FileNotFoundError:
                pass  # finished meanwhile: the node names the uploaded version now
            else:
                version = ObjectVersion(self.store.bucket, node.key, "", 0)
                return self.add_handle(FileHandle(node, version, staged=node.staged, fd=fd)), False
        version = ObjectVersion(self.store.bucket, node.key, node.etag, node.size)
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
                self._retire(handle.node)
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
        self._drop_if_unused(handle.node)
        return handle

    def file_handle(self, fh: int) -> FileHandle:
        try:
            return self._files[fh]
        except KeyError:
            raise BadHandleError(f"file handle {fh}: unknown") from None

    def pins_changed(self) -> list[tuple[int, str]]:
        """Forget every listing a manifest gave; return the entries the kernel must drop.

        Called when a manifest is saved or deleted (prefetch, evict): entries
        the kernel holds for years must not outlive the manifest that made them.
        Must not await.
        """
        stale: list[tuple[int, str]] = []
        for node in list(self._nodes.values()):
            if node.is_dir and (node.pin_generation >= 0 or node.pinned):
                stale.extend((node.ino, name) for name in node.children or {})
                node.children, node.listed_at, node.pin_generation = None, None, -1
        return stale

    def timeout(self, node: Node) -> float:
        """How long the kernel may trust this entry: pinned data does not change under us."""
        return INDEFINITE_TTL if node.pinned or node.pin_generation >= 0 else self.metadata_ttl

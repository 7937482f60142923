"""The tree: inodes, lookups and directory listings, and what the kernel must forget.

Semantics (README, "Semantics"):
- A directory is a prefix; its entries come from one paginated
  ListObjectsV2 with delimiter, cached for ``metadata_ttl`` seconds, which also
  answers negative lookups in that directory.
- When a key is both an object and a prefix (``a`` and ``a/b``), the
  directory wins and the object is hidden, with a warning.
- Keys with segments that are not valid names (`store.keys`) are skipped.
- An inode is one object version (key, ETag, size): a re-listing that shows
  another version for a name maps the name to a new inode, so the kernel's
  page cache (kept per inode) cannot mix versions. The old inode stays valid
  for its open handles and is dropped once the kernel forgets it
  (`remember`/`forget` keep the kernel's lookup count). Directories keep
  their inodes.
- Inside a pinned dataset, listings come from its manifest and never expire.

Whenever a name the kernel may hold comes to mean another inode (or nothing),
the tree calls ``invalidate`` with those entries itself; the adapter sets it.

Concurrency: dictionaries here change only on the trio thread. ``_apply_listing``
must not await: it swaps a directory's children in one step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import trio

from s3cachefs.base.errors import NotADirError, NotFoundError, TransientError
from s3cachefs.base.values import INDEFINITE_TTL
from s3cachefs.datasets.pins import PinStore
from s3cachefs.fs.nodes import ROOT_INODE, Node
from s3cachefs.store.keys import valid_name
from s3cachefs.store.types import Listing, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

# With S3 unreachable, how long a directory serves its last listing before trying again.
S3_DOWN_RETRY = 10.0
# Directory entries (parent inode, name) the kernel must forget.
Entries = list[tuple[int, str]]


class Tree:
    """The inodes of ``bucket/prefix``: names, versions, listings and their lifetimes."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        prefix: str,
        metadata_ttl: float,
        s3_limiter: trio.CapacityLimiter,
        pins: PinStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metadata_ttl = metadata_ttl
        self.pins = pins
        self._s3_limiter = s3_limiter
        self._clock = clock
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, ROOT_INODE, "", prefix, is_dir=True, mtime_ns=0)
        }
        self._next_ino = itertools.count(ROOT_INODE + 1)
        self._listing: dict[int, trio.Event] = {}
        # Directory entries the kernel must forget (a name now names another inode, or
        # none); the adapter sets it. Called on the trio thread, must not await.
        self.invalidate: Callable[[Entries], None] = lambda entries: None

    def node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NotFoundError(f"inode {ino}: unknown") from None

    def get(self, ino: int) -> Node | None:
        """The node of ``ino``, or None once it was dropped."""
        return self._nodes.get(ino)

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
            self.drop_if_unused(node)

    def drop_if_unused(self, node: Node) -> None:
        """Forget a file inode that no name, kernel reference or handle leads to any more."""
        if node.is_dir or node.lookups > 0 or node.handles > 0 or self._is_current(node):
            return
        self._nodes.pop(node.ino, None)

    def _is_current(self, node: Node) -> bool:
        """Whether ``node`` is what its name in its directory means now."""
        parent = self._nodes.get(node.parent)
        return parent is not None and (parent.children or {}).get(node.name) == node.ino

    def retire(self, node: Node) -> None:
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
            self.invalidate([(node.parent, node.name)])

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

    def key_changed(self, key: str) -> None:
        """An object changed behind the tree's back (a staged upload): re-list its directory.

        The kernel forgets the name's entry (it may hold a negative one). Must not await.
        """
        parent, _, name = key.rpartition("/")
        parent_key = parent + "/" if parent else ""
        stale = []
        for node in self._nodes.values():
            if node.is_dir and node.key == parent_key:
                self.relist(node)
                stale.append((node.ino, name))
        if stale:
            self.invalidate(stale)

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
                self.drop_if_unused(node)
        if replaced:
            self.invalidate(replaced)

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

    def pins_changed(self) -> None:
        """Forget every listing a manifest gave, and make the kernel forget their entries.

        Called when a manifest is saved or deleted (prefetch, evict): entries
        the kernel holds for years must not outlive the manifest that made them.
        Must not await.
        """
        stale: list[tuple[int, str]] = []
        for node in list(self._nodes.values()):
            if node.is_dir and (node.pin_generation >= 0 or node.pinned):
                listing = self.pins.listing(node.key) if self.pins else None
                if listing is not None and node.children is not None and self.pins is not None:
                    # Still pinned: only the names whose inode changes are forgotten. A
                    # kernel-serve overlay holds these entries as its lower layer: one
                    # forgotten needlessly is ESTALE through the overlay.
                    old = dict(node.children)
                    self._apply_listing(node, listing, pinned=True)
                    node.pin_generation = self.pins.generation
                    gone = [n for n, i in old.items() if node.children.get(n) != i]
                    stale.extend(
                        (node.ino, n) for n in gone if self._is_dir(old[n])
                    )  # files: above
                    continue
                stale.extend((node.ino, name) for name in node.children or {})
                node.children, node.listed_at, node.pin_generation = None, None, -1
        if stale:
            self.invalidate(stale)

    def _is_dir(self, ino: int) -> bool:
        node = self._nodes.get(ino)
        return node is not None and node.is_dir

    def timeout(self, node: Node) -> float:
        """How long the kernel may trust this entry: pinned data does not change under us."""
        return INDEFINITE_TTL if node.pinned or node.pin_generation >= 0 else self.metadata_ttl

"""A first prefetch's tree, linked while it downloads: ``trees/<id>.pre``.

After a prefetch's last byte, the tree of its dataset was built from nothing:
a hard link, a chmod and a utime per object, which on a cache disk busy
writing back what the prefetch just wrote stall behind its journal (1.1 s for
the 4,000 files of W1's full set; its whole download is network-bound). So
each object is linked into ``<id>.pre`` in a worker thread soon after it is
verified and pinned: in the thread call of the bulk engine's next index commit
(after its rows, asked then: `cache.bulkriders.Rider`), else in one of its own. The tree is still
made from the manifest's layout, not from this: `kerneltrees.complete` removes
what the layout does not have, and links what is missing, then the tree is
staged as before. A ``.pre`` left by a crash goes at start
(`kerneltrees.sweep`); one no mount used goes after the refresh that followed
its prefetch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.bulkriders import Ride
from s3cachefs.datasets import binds, kerneltrees
from s3cachefs.store.types import ObjectInfo

log = logging.getLogger(__name__)

OnPin = Callable[[ObjectInfo, ObjectVersion], None]
# Seconds pins wait for a bulk commit to link them (`PreStages.ride`) before a thread of
# their own does: a commit comes every few ms while workers deliver.
LINGER = 0.05


class PreStages:
    """The files waiting to be linked into each tree's ``.pre``; one batch at a time."""

    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self.pending: dict[Path, list[binds.TreeEntry]] = {}
        self._wanted = trio.Event()
        self._lock = trio.Lock()  # one batch in a thread at a time

    def on_pin(self, tree: Path, prefix: str) -> OnPin:
        """What a prefetch calls (in the trio thread) for each object it pinned."""

        def pinned(info: ObjectInfo, version: ObjectVersion) -> None:
            if not info.size:  # an empty object has no cache file: made by `complete`
                return
            source = self.cache.object_path(version.oid)
            entry = binds.TreeEntry(info.key[len(prefix) :], source, info.size, info.mtime_ns)
            self.pending.setdefault(tree, []).append(entry)
            self._wanted.set()

        return pinned

    async def run(self) -> None:
        """For the daemon's life: link what was pinned, in batches. Mostly in the thread
        call of the bulk engine's next commit (`ride`); what no commit took within
        `LINGER` (the in-daemon path, the last objects), in a thread of its own."""
        riders = self.cache.bulk.riders
        riders.append(self)
        try:
            while True:
                await self._wanted.wait()
                self._wanted = trio.Event()
                await trio.sleep(LINGER)
                await self.flush()
        finally:
            riders.remove(self)

    def wants(self) -> bool:
        """Whether a bulk commit about to index should ask `ride` once its rows are in."""
        return bool(self.pending) and not self._lock.locked()

    def ride(self) -> Ride | None:
        """Every pending link, to make in a bulk commit's thread call after its rows
        (`cache.bulkriders.Rider`); None while a batch is linked or a tree made (the lock).
        Asked once the rows are committed, so a tree made (`flushed`) never waits on a
        commit's index lock; the lock is then held until the call is over."""
        if not self.pending or self._lock.locked():
            return None
        self._lock.acquire_nowait()
        batches, self.pending = self.pending, {}
        return functools.partial(_link_all, batches), self._lock.release

    async def flush(self) -> None:
        """Link every pending file."""
        async with self._lock:
            for tree in list(self.pending):
                await self._link(tree)

    @asynccontextmanager
    async def flushed(self, tree: Path) -> AsyncIterator[None]:
        """Every file of ``tree`` pinned so far is in its ``.pre``, and nothing is linked
        into it while the caller makes the tree of it."""
        async with self._lock:
            await self._link(tree)
            yield

    async def _link(self, tree: Path) -> None:
        batch = self.pending.pop(tree, [])
        if batch:
            await trio.to_thread.run_sync(_link_all, {tree: batch})

    async def drop(self, tree: Path) -> None:
        """Forget and remove ``tree``'s ``.pre`` (its refresh is over, or it is evicted)."""
        self.pending.pop(tree, None)
        async with self._lock:
            await trio.to_thread.run_sync(kerneltrees.discard, kerneltrees.pre_path(tree))


def _link_all(batches: dict[Path, list[binds.TreeEntry]]) -> None:
    """In a worker thread: link each tree's batch into its ``.pre``; never raises."""
    for tree, batch in batches.items():
        try:
            kerneltrees.prelink(kerneltrees.pre_path(tree), batch)
        except (OSError, ValueError) as exc:  # built at the end then, as without this
            log.info("kernel-serve tree %s: linking ahead failed: %s", tree, exc)

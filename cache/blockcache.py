"""The persistent, verified, single-flight block cache: the one entry point of `cache`.

`BlockCache` serves a block from memory, then from verified disk, then from
one shared GET, and answers for the whole cache to the layers above. Its parts,
each in a module of its own:

- `cache.blocks`: what a block is (`ObjectVersion`, block arithmetic);
- `cache.layout`: where it lives (the dir lock, the format file, object files);
- `cache.index`: the rows that survive a restart; their load and repair;
- `cache.disk`: every blocking disk step, in the order a crash cannot hurt;
- `cache.ledger`: the books (records, the LRU, the pinned set, reservations);
- `cache.memory`: recently used blocks in memory;
- `cache.flights`: keyed single flight, with streamed heads;
- `cache.state`: where a block is, the one answer every path asks;
- `cache.fetcher`: runs, readahead, write backpressure, the fetch nursery;
- `cache.integrity`: CRC-checked reads, whole-object checks, adopt and free.

Wrong bytes are never served: every block is checked against its CRC when it
is first read from disk in this process, and a block that fails is a miss,
dropped and fetched again.

Concurrency invariants: all in-memory state (the ledger, the memory LRU, the
flights, the fetcher's counters) is changed only on the trio thread, by
synchronous methods that do not await, so no other task can interleave. Disk
I/O runs in worker threads under the disk limiter and receives plain values,
never these structures.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from s3cachefs.cache.blocks import ObjectVersion, blocks_for_range
from s3cachefs.cache.bulk import BulkEngine
from s3cachefs.cache.disk import Disk
from s3cachefs.cache.fetcher import Fetcher
from s3cachefs.cache.flights import Flights
from s3cachefs.cache.index import Index
from s3cachefs.cache.integrity import Integrity
from s3cachefs.cache.layout import Layout
from s3cachefs.cache.ledger import Bounds, Ledger
from s3cachefs.cache.memory import MemoryBlocks
from s3cachefs.cache.state import BlockState, block_state
from s3cachefs.cache.stats import CacheStats
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectStore

if TYPE_CHECKING:
    from s3cachefs.base.config import MountConfig

# Opens whose first block is counted as the next read's miss (`open_hint`).
HINTED_MAX = 4096


class BlockCache:
    """Blocks of object versions: memory, then verified disk, then one GET per block."""

    @classmethod
    def from_config(
        cls,
        config: MountConfig,
        store: ObjectStore,
        *,
        s3_limiter: trio.CapacityLimiter,
        disk_limiter: trio.CapacityLimiter,
    ) -> BlockCache:
        """The cache a mount's settings describe: the daemon's, and the test sessions'."""
        return cls(
            config.cache_dir,
            store,
            block_size=config.block_size,
            cache_size=config.cache_size,
            min_free=config.min_free,
            memory_bytes=config.memory_cache_bytes,
            s3_limiter=s3_limiter,
            disk_limiter=disk_limiter,
            readahead_bytes=config.readahead_size,
            fetch_bytes=config.fetch_size,
            bulk_workers=min(config.prefetch_workers, config.prefetch_jobs),  # never more jobs
            bulk_threads=-(-config.prefetch_jobs // max(1, config.prefetch_workers)),
        )

    def __init__(
        self,
        cache_dir: Path,
        store: ObjectStore,
        *,
        block_size: int,
        cache_size: int,
        min_free: int,
        memory_bytes: int,
        s3_limiter: trio.CapacityLimiter,
        disk_limiter: trio.CapacityLimiter,
        readahead_bytes: int = 32 * 1024 * 1024,
        fetch_bytes: int = 8 * 1024 * 1024,
        bulk_workers: int = 0,  # prefetch in worker processes (`cache.bulk`); 0: here
        bulk_threads: int = 16,
    ) -> None:
        self.cache_dir = cache_dir
        self.store = store
        self.cache_size = cache_size
        self.min_free = min_free
        self.stats = CacheStats()
        self.bounds = Bounds(cache_dir, cache_size, min_free)
        # The books, and the one owner of the pinned set (`datasets.pins` tells it).
        self.ledger = Ledger(block_size, self.stats)
        self._s3_limiter = s3_limiter
        self._disk_limiter = self.disk_limiter = disk_limiter  # also `cache.reuse`'s
        self._layout = Layout(cache_dir)
        self.root = self._layout.root
        self._index = Index(self._layout)
        self._disk = Disk(self._layout, self._index)  # blocking steps, in crash-safe order
        self._memory = MemoryBlocks(memory_bytes)
        # First blocks fetched by an open for the read that follows it: that read is
        # their miss, however soon the GET ended. Bounded: opens never read are dropped.
        self._hinted: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._flights = self.flights = Flights()  # also `cache.reuse`'s claims
        self._fetcher = Fetcher(
            store,
            ledger=self.ledger,
            memory=self._memory,
            flights=self._flights,
            disk=self._disk,
            bounds=self.bounds,
            stats=self.stats,
            s3_limiter=s3_limiter,
            disk_limiter=disk_limiter,
            readahead_bytes=readahead_bytes,
            fetch_bytes=fetch_bytes,
        )
        self.bulk = BulkEngine(self._fetcher, workers=bulk_workers, threads=bulk_threads)
        self._integrity = self.integrity = Integrity(  # also `cache.reuse`'s
            ledger=self.ledger,
            memory=self._memory,
            disk=self._disk,
            bounds=self.bounds,
            stats=self.stats,
            disk_limiter=disk_limiter,
        )

    # ---- lifecycle -------------------------------------------------------

    def open(self) -> None:
        """Lock the cache dir, load the index into memory. Blocking; call before serving."""
        self.ledger.block_size = self._layout.claim(self.ledger.block_size)
        self._index.open(self.ledger)

    def close(self) -> None:
        self._index.close()
        self._layout.release()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that downloads run in, so a cancelled reader cancels no fetch;
        and the bulk workers, stopped on the way out."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._fetcher.run)
            await nursery.start(self.bulk.run)
            task_status.started()

    async def drain(self) -> None:
        """Wait until every started fetch has been served and written (clean stop, tests)."""
        await self._flights.drain()

    # ---- sizes and settings ------------------------------------------------

    @property
    def block_size(self) -> int:
        """The cache dir's block size (its format file's, once open)."""
        return self.ledger.block_size

    @property
    def memory_bytes(self) -> int:
        return self._memory.limit

    @property
    def readahead_bytes(self) -> int:
        return self._fetcher.readahead_bytes

    @property
    def fetch_bytes(self) -> int:
        return self._fetcher.fetch_bytes

    @property
    def readahead_limit(self) -> int:
        """Readahead blocks in flight at most: two windows (block size known once open)."""
        return self._fetcher.readahead_limit

    @property
    def run_blocks(self) -> int:
        """Most blocks one GET covers (the block size is known only once the cache is open)."""
        return self._fetcher.run_blocks

    @property
    def used_bytes(self) -> int:
        return self.ledger.used

    @property
    def in_flight(self) -> int:
        """Blocks being fetched or written right now."""
        return len(self._flights)

    @property
    def s3_limiter(self) -> trio.CapacityLimiter:
        """The S3 limiter, for callers' own requests (prefetch's checksum HEADs)."""
        return self._s3_limiter

    # ---- reads -------------------------------------------------------------

    def is_cached(self, version: ObjectVersion, index: int) -> bool:
        return self.ledger.has_block(version.oid, index)

    async def read(self, version: ObjectVersion, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of ``version``, clipped to its size."""
        indices = blocks_for_range(offset, length, self.block_size, version.size)
        if not indices:
            return b""
        # Each block of a read counts once: a miss if it must come from S3 (even when a
        # reader finds it in memory after waiting for it), else a hit where it is found.
        hinted = {idx for idx in indices if (version.oid, idx) in self._hinted}
        for idx in hinted:
            del self._hinted[(version.oid, idx)]
        absent = hinted | {idx for idx in indices if not self._block_state(version, idx).servable}
        self.stats.counts["misses"] += len(absent)
        if len(indices) == 1:
            early = await self._read_early(version, indices[0], offset, length)
            if early is not None:
                return early
        if len(indices) > 1:  # start every missing block now: one GET per contiguous run
            self.start_fetch(version, indices)
        parts = [await self.get_block(version, idx, count=idx not in absent) for idx in indices]
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        skip = offset - indices[0] * self.block_size
        return data[skip : skip + length]

    def open_hint(self, version: ObjectVersion) -> None:
        """A file was opened: start its first block if it is cold. Must not await.

        The GET then overlaps the kernel's first READ instead of following it
        (time to first byte). An open is almost always followed by a read of
        the start.
        """
        if version.size and self._block_state(version, 0) is BlockState.MISSING:
            self.stats.counts["open_fetches"] += 1
            self._hinted[(version.oid, 0)] = None
            if len(self._hinted) > HINTED_MAX:
                self._hinted.popitem(last=False)
            self._fetcher.start_run(version, range(1), readahead=False, eager=True)

    async def _read_early(
        self, version: ObjectVersion, index: int, offset: int, length: int
    ) -> bytes | None:
        """The asked bytes from a block still arriving, once they are in; else None."""
        state = self._block_state(version, index)
        if state.local:
            return None
        if state is BlockState.MISSING:
            self._fetcher.start_run(version, range(index, index + 1), readahead=False, eager=True)
        flight = self._flights.get((version.oid, index))
        assert flight is not None
        start = index * self.block_size
        head = await flight.head_of(min(offset + length, version.size) - start)
        if head is None:  # the whole block, or an error: the usual path
            return None
        self.stats.counts["early_reads"] += 1
        return head[offset - start : offset - start + length]

    def _block_state(self, version: ObjectVersion, index: int) -> BlockState:
        """Where a block is now (`cache.state`). Must not await."""
        return block_state((version.oid, index), self._memory, self.ledger, self._flights)

    async def get_block(self, version: ObjectVersion, index: int, *, count: bool = False) -> bytes:
        """One whole block: from memory, from verified disk, or from one shared GET.

        ``count``: a reader's block (``read``), counted as a hit where it is found or
        as a miss; prefetch and repairs are not reads and count nothing.
        """
        key = (version.oid, index)
        counts = self.stats.counts
        state = self._block_state(version, index)
        if state.in_memory:
            data = self._memory.take(key)
            assert data is not None
            counts["hits_memory"] += count
            return data
        if state is BlockState.DISK:
            crc = self.ledger.block_crc(version.oid, index)
            assert crc is not None
            data = await self._integrity.read_verified(version, index, crc)
            if data is not None:
                counts["hits_disk"] += count
                self.ledger.touch(key)
                self._memory.remember(key, data)
                return data
        flight = self._flights.get(key)
        if flight is None:
            self.start_fetch(version, range(index, index + 1))
            flight = self._flights.get(key)
            if flight is None:  # it landed while we checked the disk: look again
                return await self.get_block(version, index, count=count)
        counts["hits_memory" if flight.data is not None else "misses"] += count
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        if flight.data is None:  # a bulk job's block: on disk now, or given up (`cache.bulk`)
            await flight.landed.wait()
            return await self.get_block(version, index)
        return flight.data

    def start_fetch(self, version: ObjectVersion, indices: range, *, persist: bool = False) -> None:
        """Make sure these blocks are on their way, without waiting for them.

        With ``persist``, blocks held only in memory are written to disk too
        (prefetch needs them there; a read is happy with memory).
        """
        self._fetcher.start_fetch(version, indices, persist=persist)

    def readahead(self, version: ObjectVersion, indices: range) -> int:
        """Best-effort prefetch: dropped, not queued, when too much is in flight.

        Returns the block index up to which ``indices`` is now cached or on its way.
        """
        return self._fetcher.readahead(version, indices)

    def object_path(self, oid: str) -> Path:
        """The data file of an object version (kernel-served trees link it)."""
        return self._layout.path(oid)

    # ---- pinning and room --------------------------------------------------

    @property
    def pinned(self) -> set[str]:
        return self.ledger.pinned

    @property
    def pinned_bytes(self) -> int:
        return self.ledger.pinned_bytes

    def room_for(self, nbytes: int) -> tuple[bool, int]:
        """Whether ``nbytes`` more can be cached without evicting pinned data, and the room."""
        return self.ledger.room_for(nbytes, self.bounds)

    def missing_blocks(self, version: ObjectVersion) -> list[int]:
        return self.ledger.missing_blocks(version)

    def block_crcs(self, version: ObjectVersion) -> dict[int, int]:
        """A copy of the CRC32 of every cached block of ``version`` (kernel-serve checks)."""
        return self.ledger.block_crcs(version)

    # ---- whole objects -------------------------------------------------------

    async def drain_object(self, version: ObjectVersion) -> None:
        """Wait until every fetch of this object's blocks has landed on disk."""
        await self._flights.drain_object(version.oid)

    async def verify_object(self, version: ObjectVersion, check: Check) -> tuple[bool, str]:
        """Re-read a complete object from disk: every block's CRC, then ``check`` end to end.

        Blocks that fail are dropped; see `cache.integrity`.
        """
        return await self._integrity.verify_object(version, check)

    async def refetch(self, version: ObjectVersion) -> bool:
        """Fetch again, onto disk, what a whole-object check found missing or wrong.

        Blocks that are missing are fetched; if none are (every CRC passed but the
        object as a whole did not), all of them are. False if there is nothing to
        fetch (an empty object). Raises StoreError.
        """
        missing = self.missing_blocks(version)
        if not missing:
            await self.forget_object(version)
            missing = self.missing_blocks(version)
        if not missing:
            return False
        self.start_fetch(version, range(missing[0], missing[-1] + 1), persist=True)
        for idx in missing:
            await self.get_block(version, idx)
        await self.drain_object(version)
        return True

    async def forget_object(self, version: ObjectVersion) -> None:
        """Drop every cached block of this version (its content failed a whole-object check)."""
        await self._integrity.forget_object(version)

    async def adopt(self, version: ObjectVersion, path: Path, crcs: dict[int, int]) -> bool:
        """Take a complete local copy of ``version`` (a finished upload) as its cached data.

        ``path`` must be on the cache's filesystem; see `cache.integrity`.
        Returns whether the object is now cached.
        """
        return await self._integrity.adopt(version, path, crcs)

    async def free(self, oids: set[str]) -> int:
        """Delete the cached data of these (unpinned) object versions; returns bytes freed."""
        return await self._integrity.free(oids)

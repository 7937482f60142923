"""Fetching blocks from S3: one GET per run of blocks, readahead on a budget, and
downloads that wait for the disk.

- Runs: contiguous missing blocks are fetched by one ranged GET, at most
  ``fetch_bytes`` long; each block of the run is a flight of its own
  (`cache.flights`), served as soon as its bytes are in.
- Readahead is best effort: dropped, never queued, beyond two windows in flight.
- Backpressure: a downloaded block is written to disk in the background; while
  more than `UNWRITTEN_LIMIT` bytes wait for their write, the download waits.

Every download and write runs in the nursery this fetcher owns (`run`), never
in a reader's task: a cancelled FUSE request cancels no fetch that other
readers wait for (DESIGN "single flight owned by the cache").
"""

from __future__ import annotations

import logging
import sqlite3

import diskcache
import trio

from s3cachefs.base.errors import StoreError, TransientError
from s3cachefs.cache.blocks import BlockKey, ObjectVersion
from s3cachefs.cache.deleting import drop_written
from s3cachefs.cache.disk import Disk
from s3cachefs.cache.flights import Flight, Flights, ReadsWaiting
from s3cachefs.cache.ledger import Bounds, Ledger
from s3cachefs.cache.memory import MemoryBlocks
from s3cachefs.cache.state import BlockState, block_state
from s3cachefs.cache.stats import CacheStats
from s3cachefs.store.crc import crc32
from s3cachefs.store.types import ObjectStore

log = logging.getLogger(__name__)

# A FUSE read of a cold file's start is answered once this much of its first
# block has arrived, not the whole block: the kernel's first read of a file
# is small (its readahead window starts small).
EAGER_FIRST_PIECE = 128 * 1024
# Downloaded bytes waiting for their disk write, at most: a network faster than
# the disk makes the download wait, instead of the daemon's memory grow.
UNWRITTEN_LIMIT = 32 * 1024 * 1024
# Prefetch jobs stay held back this long after a read's GET ended: reads come in
# bursts (a container opening file after file), and the next one should find the
# server and the link quiet too. Measured on 2 cores, local profile, a read every
# ~30 ms during a prefetch: p50 first byte 1.6-1.7x idle with it, 2.8-4.6x with
# none (bench/README.md, issue 12, "reads first").
READS_LINGER = 0.1


class Fetcher:
    """Starts runs of flights and fills them; writes what arrives. Sync methods must not await."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        ledger: Ledger,
        memory: MemoryBlocks,
        flights: Flights,
        disk: Disk,
        bounds: Bounds,
        stats: CacheStats,
        s3_limiter: trio.CapacityLimiter,
        disk_limiter: trio.CapacityLimiter,
        readahead_bytes: int,
        fetch_bytes: int,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.memory = memory
        self.flights = flights
        self.disk = disk
        self.bounds = bounds
        self.stats = stats
        self.s3_limiter = s3_limiter
        self.disk_limiter = disk_limiter
        self.readahead_bytes = readahead_bytes
        self.fetch_bytes = fetch_bytes  # most bytes one GET may cover
        # A reader's runs under way (not readahead, not prefetch): the bulk engine gives way.
        self.reads_waiting = ReadsWaiting(READS_LINGER)
        self._readahead_inflight = 0  # readahead blocks requested and not yet arrived
        self._unwritten = 0  # bytes handed to _store_and_land and not yet on disk
        # Of those, a prefetch's waiting for a delete of their block (`_store_block`):
        # counted apart, they hold back prefetch downloads only.
        self._parked = 0
        self._written = trio.Event()  # set whenever some of them land
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that downloads run in, so a cancelled reader cancels no fetch."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def readahead_limit(self) -> int:
        """Readahead blocks in flight at most: two windows (block size known once open)."""
        return 2 * max(1, self.readahead_bytes // self.ledger.block_size)

    @property
    def run_blocks(self) -> int:
        """Most blocks one GET covers (the block size is known only once the cache is open)."""
        return max(1, self.fetch_bytes // self.ledger.block_size)

    # ---- what to fetch -----------------------------------------------------

    def start_fetch(self, version: ObjectVersion, indices: range, *, persist: bool = False) -> None:
        """Make sure these blocks are on their way, without waiting for them.

        With ``persist``, blocks held only in memory are written to disk too
        (prefetch needs them there; a read is happy with memory).
        """
        if persist:
            for idx in indices:
                key = (version.oid, idx)
                if self._state(key) is BlockState.MEMORY_ONLY:
                    data = self.memory.peek(key)
                    assert data is not None
                    flight = self.flights.start(key, Flight(data=data))
                    flight.done.set()
                    self._spawn_store(version, idx, data, persist=True)
        for run in self.missing_runs(version, indices):  # a prefetch passes gigabytes
            self.start_run(version, run, readahead=False, remember=not persist)

    def readahead(self, version: ObjectVersion, indices: range) -> int:
        """Best-effort prefetch: dropped, not queued, when too much is in flight.

        Returns the block index up to which ``indices`` is now cached or on its way.
        """
        for run in self.missing_runs(version, indices):
            room = self.readahead_limit - self._readahead_inflight
            if room <= 0:
                self.stats.counts["readahead_dropped"] += len(run)
                return run.start
            taken = run[:room]
            self.stats.counts["readahead"] += len(taken)
            self.start_run(version, taken, readahead=True)
            if len(taken) < len(run):
                self.stats.counts["readahead_dropped"] += len(run) - len(taken)
                return taken.stop
        return indices.stop

    def missing_runs(self, version: ObjectVersion, indices: range) -> list[range]:
        """Contiguous runs of blocks that are neither cached nor in flight, each one GET long."""
        runs: list[range] = []
        first: int | None = None
        for idx in indices:
            missing = self._state((version.oid, idx)) is BlockState.MISSING
            if missing and first is not None and idx - first < self.run_blocks:
                continue
            if first is not None:
                runs.append(range(first, idx))
            first = idx if missing else None
        if first is not None:
            runs.append(range(first, indices.stop))
        return runs

    def _state(self, key: BlockKey) -> BlockState:
        return block_state(key, self.memory, self.ledger, self.flights)

    # ---- one run -------------------------------------------------------------

    def start_run(
        self,
        version: ObjectVersion,
        run: range,
        *,
        readahead: bool,
        eager: bool = False,
        remember: bool = True,
    ) -> None:
        """Register one flight per block of ``run`` and start the one GET that fills them.

        ``eager``: a reader waits for the run's first bytes (`Flight.head_of`); its
        first block arrives in two pieces. ``remember``: keep the blocks in memory too.
        """
        assert self._nursery is not None, "BlockCache.run() is not running"
        flights = [self.flights.start((version.oid, idx), Flight(remember=remember)) for idx in run]
        if readahead:
            self._readahead_inflight += len(run)
        foreground = remember and not readahead  # a reader waits for it (or will: an open)
        self._nursery.start_soon(
            self._fetch_run, version, run, flights, readahead, eager, foreground
        )
        if foreground:  # counted once its task exists: that task ends the count
            self.reads_waiting.begin()

    async def _fetch_run(
        self,
        version: ObjectVersion,
        run: range,
        flights: list[Flight],
        readahead: bool,
        eager: bool,
        foreground: bool,
    ) -> None:
        block_size = self.ledger.block_size
        start = run.start * block_size
        end = min(run.stop * block_size, version.size)
        delivered = 0
        persist = not flights[0].remember  # a prefetch's run: its writes must be made
        finished = False  # set once this task gave up: a late piece must not be delivered

        def arrived(piece: bytes) -> None:  # on the trio thread, between two pieces
            nonlocal delivered
            if finished:
                return
            idx = run.start + delivered
            flight = flights[delivered]
            data = flight.feed(piece, self.ledger.block_len(version, idx))
            if data is None:  # a first piece: early readers take it now
                return
            delivered += 1
            self.stats.counts["blocks_from_s3"] += 1
            self.stats.counts["bytes_from_s3"] += len(data)
            if flight.remember:
                self.memory.remember((version.oid, idx), data)
            if readahead:
                self._readahead_inflight -= 1
            flight.finish(data)  # final: early readers see ``done``
            # The flight stays registered, with its data, until the block is on disk: a
            # reader arriving in between gets these bytes instead of starting a GET.
            self._spawn_store(version, idx, data, persist=not flight.remember)

        def stream() -> None:  # in a worker thread
            first = EAGER_FIRST_PIECE if eager else 0
            for piece in self.store.iter_range(
                version.key, version.etag, start, end, block_size, first, size=version.size
            ):
                if finished:
                    return
                # A racy read of the counts is fine: a hint.
                if self._unwritten + (self._parked if persist else 0) >= UNWRITTEN_LIMIT:
                    trio.from_thread.run(self._room_to_write, persist)
                trio.from_thread.run_sync(arrived, piece)

        error: BaseException | None = None
        try:
            await trio.to_thread.run_sync(stream, limiter=self.s3_limiter, abandon_on_cancel=True)
        except StoreError as exc:
            error = exc
        except Exception as exc:  # an unexpected bug must still wake every waiter
            log.exception("fetch of %s blocks %d-%d failed", version.key, run.start, run.stop - 1)
            error = exc
        finally:
            finished = True
            if foreground:
                self.reads_waiting.end()
            for offset in range(delivered, len(flights)):
                # Failures are not cached: the next reader of these blocks tries again.
                flights[offset].finish(
                    None, error or TransientError(f"{version.key}: fetch cancelled")
                )
                self.flights.end((version.oid, run.start + offset))
                if readahead:
                    self._readahead_inflight -= 1

    # ---- to disk, with backpressure ------------------------------------------

    def _spawn_store(
        self, version: ObjectVersion, index: int, data: bytes, *, persist: bool
    ) -> None:
        """Write a block in the background; its bytes count as unwritten until then.
        ``persist``: a prefetch's, which must reach the disk (else a read's: best effort)."""
        assert self._nursery is not None
        self._unwritten += len(data)
        self._nursery.start_soon(self._store_and_land, version, index, data, persist)

    async def _store_and_land(
        self, version: ObjectVersion, index: int, data: bytes, persist: bool
    ) -> None:
        try:
            await self._store_block(version, index, data, persist)
        except Exception:  # a full index DB, a sqlite timeout: the read was served; log it
            self.stats.counts["disk_errors"] += 1
            log.exception("cache write failed for %s block %d", version.key, index)
        finally:
            self._unwritten -= len(data)
            self._wake_writers()
            self.flights.end((version.oid, index))

    async def _room_to_write(self, persist: bool) -> None:
        """Wait while too much downloaded data waits for the disk (backpressure); for a
        prefetch's download, also its writes parked behind deletes."""
        while self._unwritten + (self._parked if persist else 0) >= UNWRITTEN_LIMIT:
            await self._written.wait()

    def _wake_writers(self) -> None:
        self._written.set()
        self._written = trio.Event()

    async def _park_until_settled(self, oid: str, index: int, size: int) -> None:
        """Wait for deletes of block ``index`` of ``oid`` taken off the books before, the
        block's bytes counted as parked, not unwritten, meanwhile. No checkpoint if none."""
        if not self.ledger.deleting.pending(oid, (index,)):
            return
        self._unwritten -= size
        self._parked += size
        self._wake_writers()
        try:
            await self.ledger.deleting.settled([(oid, (index,))])
        finally:
            self._parked -= size
            self._unwritten += size

    async def _store_block(
        self, version: ObjectVersion, index: int, data: bytes, persist: bool
    ) -> None:
        crc = crc32(data)
        oid = version.oid
        # Deletes of this block or object taken off the books before (an eviction, a
        # free) run first: landing after this write, they would take its rows or bytes
        # while the ledger kept them (`cache.deleting`). A read's block is not kept this
        # time rather than wait: its bytes count in `_unwritten`, and a long free (many
        # objects, one by one) would stall every download of the daemon. A prefetch's
        # waits, parked: holding back prefetches only. From here to the thread call, no await.
        if not persist and self.ledger.deleting.pending(oid, (index,)):
            self.stats.counts["store_skipped_deleting"] += 1
            log.debug("%s block %d served uncached: a delete of it is pending", version.key, index)
            return
        await self._park_until_settled(oid, index, len(data))
        victims, fits = self.ledger.reserve(len(data), self.bounds)
        if not fits:
            self.stats.counts["store_skipped_full"] += 1
            log.warning(
                "cache cannot hold more (cache_size=%d min_free=%d); block served uncached",
                self.bounds.cache_size,
                self.bounds.min_free,
            )
        record = self.ledger.record(oid)
        if fits and record is None:
            record = self.ledger.new_record(version)
        # The object row too while the index may not have it (`Record.indexed`).
        object_row = fits and record is not None and not record.indexed
        try:
            await trio.to_thread.run_sync(
                self.disk.write_block,
                version,
                index,
                index * self.ledger.block_size,
                data if fits else None,
                crc,
                victims,
                object_row,
                limiter=self.disk_limiter,
            )
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            # A full disk shows as ENOSPC on the file, or as SQLite's "database or disk
            # is full" on the index: the same condition, one line, the room given back.
            if fits:
                self.ledger.unreserve(len(data))
            if victims:
                self.ledger.recount_free()
            self.stats.counts["disk_errors"] += 1
            reason = exc.strerror if isinstance(exc, OSError) else f"index: {exc}"
            log.warning("cache write failed for %s: %s; reads go to S3", version.key, reason)
            return
        finally:
            self.ledger.evicted(victims)
        if not fits:
            return
        assert record is not None
        current = self.ledger.record(oid)
        if current is not record:
            # Deleted whole while we wrote (and maybe made anew): not indexed into a newer
            # record (its file may have lost our bytes); what we wrote goes (`drop_written`).
            self.ledger.unreserve(len(data))
            held = None if current is None else current.blocks
            await drop_written(
                self.ledger.deleting, self.disk, oid, held, [index], limiter=self.disk_limiter
            )
            return
        if object_row:
            record.indexed = True
        self.ledger.add_block(record, index, crc)

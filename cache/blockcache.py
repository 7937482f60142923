"""The persistent, verified, single-flight block cache.

Layout (versioned, so a future format ignores this one instead of misreading it)::

    CACHE_DIR/lock                       flock'd by the one daemon using the dir
    CACHE_DIR/v1/format.json             {"format": 1, "block_size": ...}
    CACHE_DIR/v1/index/                  diskcache (SQLite): object and block records
    CACHE_DIR/v1/objects/ab/cd/<oid>     one sparse file per object version

One file per object *version* (oid = hash of bucket, key, ETag), filled block
by block with ``pwrite`` at the block's offset, so that a complete file is a
byte-exact copy of the object: a pinned dataset can later be exposed to the
kernel as plain files (hard links) with no daemon on the read path.

The index records, per object, ``("o", oid) -> (bucket, key, etag, size)`` and,
per block present, ``("b", oid, idx) -> crc32``. The data file is written
before the index row; neither is fsync'd, so after a power loss a row may point
at zeros or a torn block. Every block is therefore checked against its CRC
when it is first read from disk in this process, and a block that fails is a
miss: it is dropped and fetched again. Wrong bytes are never served.

The whole index is loaded into memory at start; reads never touch SQLite, and
least-recently-used order is kept in memory only (after a restart, blocks
start in the order they were cached).

Concurrency invariants: all in-memory state (``_objects``, ``_lru``,
``_flights``, ``_used``) is changed only on the trio thread, by synchronous
helpers (names start with ``_sync_`` or are plain methods without ``await``),
so no other task can interleave. Disk I/O runs in worker threads under the
disk limiter and receives plain values, never this object's dicts.
"""

from __future__ import annotations

import logging
import sqlite3
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import trio

from s3cachefs.base.errors import StoreError, TransientError
from s3cachefs.cache.blocks import BlockKey, ObjectVersion, block_span, blocks_for_range
from s3cachefs.cache.disk import Disk
from s3cachefs.cache.index import Index
from s3cachefs.cache.layout import Layout
from s3cachefs.cache.ledger import Bounds, Ledger
from s3cachefs.cache.memory import MemoryBlocks
from s3cachefs.cache.stats import CacheStats
from s3cachefs.store.checksums import Check, Digest
from s3cachefs.store.s3 import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class _Flight:
    """One in-progress download of one block, shared by every reader that wants it."""

    done: trio.Event = field(default_factory=trio.Event)  # data (or error) is available
    landed: trio.Event = field(default_factory=trio.Event)  # and it is on disk (or given up)
    data: bytes | None = None
    error: BaseException | None = None
    # The start of the block while the rest is still on its way (an eager run's first piece).
    head: bytes = b""
    grew: trio.Event = field(default_factory=trio.Event)  # set when ``head`` grows or done
    remember: bool = True  # keep the block in memory too (not for prefetch: disk only)

    def wake(self) -> None:
        self.grew.set()
        self.grew = trio.Event()


# A FUSE read of a cold file's start is answered once this much of its first
# block has arrived, not the whole block: the kernel's first read of a file
# is small (its readahead window starts small).
EAGER_FIRST_PIECE = 128 * 1024
# Downloaded bytes waiting for their disk write, at most: a network faster than
# the disk makes the download wait, instead of the daemon's memory grow.
UNWRITTEN_LIMIT = 32 * 1024 * 1024


class BlockCache:
    """Blocks of object versions: memory, then verified disk, then one GET per block."""

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
    ) -> None:
        self.cache_dir = cache_dir
        self.store = store
        self.cache_size = cache_size
        self.min_free = min_free
        self.stats = CacheStats()
        self.bounds = Bounds(cache_dir, cache_size, min_free)
        self.ledger = Ledger(block_size, self.stats)  # records, LRU, the pinned set
        self._memory = MemoryBlocks(memory_bytes)
        self._s3_limiter = s3_limiter
        self._disk_limiter = disk_limiter
        self.readahead_bytes = readahead_bytes
        self._readahead_inflight = 0  # readahead blocks requested and not yet arrived
        self.fetch_bytes = fetch_bytes  # most bytes one GET may cover
        self._flights: dict[BlockKey, _Flight] = {}
        self._idle = trio.Event()  # set whenever the last flight ends
        self._unwritten = 0  # bytes handed to _store_and_land and not yet on disk
        self._written = trio.Event()  # set whenever some of them land
        self._nursery: trio.Nursery | None = None
        self._layout = Layout(cache_dir)
        self.root = self._layout.root
        self._index = Index(self._layout)
        self._disk = Disk(self._layout, self._index)  # blocking steps, in crash-safe order

    # ---- lifecycle -------------------------------------------------------

    def open(self) -> None:
        """Lock the cache dir, load the index into memory. Blocking; call before serving."""
        self.ledger.block_size = self._layout.claim(self.ledger.block_size)
        self._index.open(self.ledger)

    def close(self) -> None:
        self._index.close()
        self._layout.release()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery that downloads run in, so a cancelled reader cancels no fetch."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def drain(self) -> None:
        """Wait until every started fetch has been served and written (clean stop, tests)."""
        while self._flights:
            if self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    # ---- public API ------------------------------------------------------

    @property
    def readahead_limit(self) -> int:
        """Readahead blocks in flight at most: two windows (block size known once open)."""
        return 2 * max(1, self.readahead_bytes // self.block_size)

    @property
    def run_blocks(self) -> int:
        """Most blocks one GET covers (the block size is known only once the cache is open)."""
        return max(1, self.fetch_bytes // self.block_size)

    @property
    def block_size(self) -> int:
        """The cache dir's block size (its format file's, once open)."""
        return self.ledger.block_size

    @property
    def memory_bytes(self) -> int:
        return self._memory.limit

    @property
    def used_bytes(self) -> int:
        return self.ledger.used

    def is_cached(self, version: ObjectVersion, index: int) -> bool:
        return self.ledger.has_block(version.oid, index)

    async def read(self, version: ObjectVersion, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of ``version``, clipped to its size."""
        indices = blocks_for_range(offset, length, self.block_size, version.size)
        if not indices:
            return b""
        # Each block of a read counts once: a miss if it must come from S3 (even when a
        # reader finds it in memory after waiting for it), else a hit where it is found.
        absent = {idx for idx in indices if not self._present(version, idx)}
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
        key = (version.oid, 0)
        cold = key not in self._memory and key not in self._flights
        if version.size and cold and not self.is_cached(version, 0):
            self.stats.counts["open_fetches"] += 1
            self._start_run(version, range(1), readahead=False, eager=True)

    async def _read_early(
        self, version: ObjectVersion, index: int, offset: int, length: int
    ) -> bytes | None:
        """The asked bytes from a block still arriving, once they are in; else None."""
        key = (version.oid, index)
        if key in self._memory or self.is_cached(version, index):
            return None
        flight = self._flights.get(key)
        if flight is None:
            self._start_run(version, range(index, index + 1), readahead=False, eager=True)
            flight = self._flights[key]
        start = index * self.block_size
        need = min(offset + length, version.size) - start
        while not flight.done.is_set() and len(flight.head) < need:
            await flight.grew.wait()
        if flight.done.is_set():  # the whole block, or an error: the usual path
            return None
        self.stats.counts["early_reads"] += 1
        return flight.head[offset - start : offset - start + length]

    def _present(self, version: ObjectVersion, index: int) -> bool:
        """Whether a block can be served without waiting for S3. Must not await."""
        key = (version.oid, index)
        flight = self._flights.get(key)
        return (
            key in self._memory
            or self.is_cached(version, index)
            or (flight is not None and flight.data is not None)
        )

    async def get_block(self, version: ObjectVersion, index: int, *, count: bool = False) -> bytes:
        """One whole block: from memory, from verified disk, or from one shared GET.

        ``count``: a reader's block (``read``), counted as a hit where it is found or
        as a miss; prefetch and repairs are not reads and count nothing.
        """
        key = (version.oid, index)
        counts = self.stats.counts
        data = self._memory.take(key)
        if data is not None:
            counts["hits_memory"] += count
            return data
        record = self.ledger.record(version.oid)
        if record is not None and index in record.blocks:
            data = await self._read_verified(version, index, record.blocks[index])
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
        assert flight.data is not None
        return flight.data

    def start_fetch(self, version: ObjectVersion, indices: range, *, persist: bool = False) -> None:
        """Make sure these blocks are on their way, without waiting for them.

        With ``persist``, blocks held only in memory are written to disk too
        (prefetch needs them there; a read is happy with memory).
        """
        if persist:
            for idx in indices:
                key = (version.oid, idx)
                data = self._memory.peek(key)
                if (
                    data is not None
                    and key not in self._flights
                    and not self.is_cached(version, idx)
                ):
                    flight = self._flights[key] = _Flight(data=data)
                    flight.done.set()
                    self._spawn_store(version, idx, data)
        for run in self._missing_runs(version, indices):  # a prefetch passes gigabytes
            self._start_run(version, run, readahead=False, remember=not persist)

    def readahead(self, version: ObjectVersion, indices: range) -> int:
        """Best-effort prefetch: dropped, not queued, when too much is in flight.

        Returns the block index up to which ``indices`` is now cached or on its way.
        """
        for run in self._missing_runs(version, indices):
            room = self.readahead_limit - self._readahead_inflight
            if room <= 0:
                self.stats.counts["readahead_dropped"] += len(run)
                return run.start
            taken = run[:room]
            self.stats.counts["readahead"] += len(taken)
            self._start_run(version, taken, readahead=True)
            if len(taken) < len(run):
                self.stats.counts["readahead_dropped"] += len(run) - len(taken)
                return taken.stop
        return indices.stop

    def _missing_runs(self, version: ObjectVersion, indices: range) -> list[range]:
        """Contiguous runs of blocks that are neither cached nor in flight, each one GET long."""
        runs: list[range] = []
        first: int | None = None
        for idx in indices:
            key = (version.oid, idx)
            missing = not (
                key in self._flights or key in self._memory or self.is_cached(version, idx)
            )
            if missing and first is not None and idx - first < self.run_blocks:
                continue
            if first is not None:
                runs.append(range(first, idx))
            first = idx if missing else None
        if first is not None:
            runs.append(range(first, indices.stop))
        return runs

    # ---- pinning and whole-object checks -----------------------------------

    @property
    def in_flight(self) -> int:
        """Blocks being fetched or written right now."""
        return len(self._flights)

    @property
    def pinned(self) -> set[str]:
        return self.ledger.pinned

    @property
    def s3_limiter(self) -> trio.CapacityLimiter:
        """The S3 limiter, for callers' own requests (prefetch's checksum HEADs)."""
        return self._s3_limiter

    async def drain_object(self, version: ObjectVersion) -> None:
        """Wait until every fetch of this object's blocks has landed on disk."""
        for key, flight in list(self._flights.items()):
            if key[0] == version.oid:
                await flight.landed.wait()

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
        for idx, crc in self.ledger.block_crcs(version).items():
            await self._drop_block(version, idx, crc)

    async def adopt(self, version: ObjectVersion, path: Path, crcs: dict[int, int]) -> bool:
        """Take a complete local copy of ``version`` (a finished upload) as its cached data.

        ``path`` must be on the cache's filesystem; it is moved into place, or
        deleted when the cache cannot hold it. ``crcs`` are the CRC32s of the
        bytes that were uploaded, so every block stays verifiable. Returns
        whether the object is now cached.
        """
        oid = version.oid
        if oid in self.ledger or version.size == 0:  # nothing to add (same bytes, or empty)
            await trio.to_thread.run_sync(path.unlink, limiter=self._disk_limiter)
            return version.size == 0 or not self.missing_blocks(version)
        if version.size > self.cache_size - self.pinned_bytes:  # would only flush the cache
            await trio.to_thread.run_sync(path.unlink, limiter=self._disk_limiter)
            return False
        victims, fits = self.ledger.reserve(version.size, self.bounds, on_disk=True)
        if fits:
            self.ledger.new_record(version)
        try:
            await trio.to_thread.run_sync(
                self._disk.adopt, version, path, crcs, victims, fits, limiter=self._disk_limiter
            )
        except (OSError, sqlite3.Error) as exc:  # a full disk fails the index write
            if fits:
                self.ledger.discard(oid)
                self.ledger.unreserve(version.size)
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("cache could not keep %s: %s", version.key, reason)
            return False
        record = self.ledger.record(oid)
        if not fits or record is None:  # no room, or evicted whole while we wrote
            return False
        self.ledger.add_blocks(record, crcs)
        self.stats.counts["adopted_bytes"] += version.size
        return True

    @property
    def pinned_bytes(self) -> int:
        return self.ledger.pinned_bytes

    def room_for(self, nbytes: int) -> tuple[bool, int]:
        """Whether ``nbytes`` more can be cached without evicting pinned data, and the room."""
        return self.ledger.room_for(nbytes, self.bounds)

    def pin(self, oid: str) -> None:
        """Add one version to the pinned set (prefetch, per verified object). Must not await."""
        self.ledger.pin(oid)

    def set_pinned(self, oids: set[str]) -> None:
        """Make exactly ``oids`` pinned: their blocks leave the LRU; unpinned ones rejoin it.

        Must not await.
        """
        self.ledger.set_pinned(oids)

    def missing_blocks(self, version: ObjectVersion) -> list[int]:
        return self.ledger.missing_blocks(version)

    def block_crcs(self, version: ObjectVersion) -> dict[int, int]:
        """A copy of the CRC32 of every cached block of ``version`` (kernel-serve checks)."""
        return self.ledger.block_crcs(version)

    async def verify_object(self, version: ObjectVersion, check: Check) -> tuple[bool, str]:
        """Re-read a complete object from disk: every block's CRC, then ``check`` end to end.

        Blocks that fail are dropped (the next read or prefetch fetches them
        again). Returns (intact, what the bytes on disk digest to in the
        check's terms: `daemon.checksums.Digest.result`).
        """
        digest = Digest(check)
        if version.size == 0:  # nothing to store, nothing to read
            return digest.matches(), digest.result()
        if version.oid not in self.ledger or self.missing_blocks(version):
            return False, ""
        crcs = self.ledger.block_crcs(version)
        bad = await trio.to_thread.run_sync(
            self._disk.verify,
            version,
            self.block_size,
            crcs,
            digest,
            limiter=self._disk_limiter,
        )
        for idx in bad:
            self.stats.counts["corrupt_blocks"] += 1
            log.warning("cache block failed verification key=%s block=%d", version.key, idx)
            await self._drop_block(version, idx, crcs[idx])
        return not bad and digest.matches(), digest.result()

    async def free(self, oids: set[str]) -> int:
        """Delete the cached data of these (unpinned) object versions; returns bytes freed."""
        freed = 0
        for oid in oids - self.ledger.pinned:
            removed = self.ledger.remove(oid)
            if removed is None:
                continue
            record, nbytes = removed
            self._memory.drop_object(oid)
            freed += nbytes
            await trio.to_thread.run_sync(
                self._disk.free, oid, list(record.blocks), limiter=self._disk_limiter
            )
        return freed

    # ---- fetch path ------------------------------------------------------

    def _start_run(
        self,
        version: ObjectVersion,
        run: range,
        *,
        readahead: bool,
        eager: bool = False,
        remember: bool = True,
    ) -> None:
        """Register one flight per block of ``run`` and start the one GET that fills them.

        ``eager``: a reader waits for the run's first bytes (`_read_early`); its first
        block arrives in two pieces. ``remember``: keep the blocks in memory too.
        """
        assert self._nursery is not None, "BlockCache.run() is not running"
        flights = []
        for idx in run:
            flight = _Flight(remember=remember)
            self._flights[(version.oid, idx)] = flight
            flights.append(flight)
        if readahead:
            self._readahead_inflight += len(run)
        self._nursery.start_soon(self._fetch_run, version, run, flights, readahead, eager)

    async def _fetch_run(
        self,
        version: ObjectVersion,
        run: range,
        flights: list[_Flight],
        readahead: bool,
        eager: bool,
    ) -> None:
        start = run.start * self.block_size
        end = min(run.stop * self.block_size, version.size)
        delivered = 0
        finished = False  # set once this task gave up: a late piece must not be delivered

        def arrived(data: bytes) -> None:  # on the trio thread, between two pieces
            nonlocal delivered
            if finished:
                return
            idx = run.start + delivered
            flight = flights[delivered]
            if len(flight.head) + len(data) < self.ledger.block_len(version, idx):
                flight.head += data  # a first piece: early readers take it now
                flight.wake()
                return
            if flight.head:
                data, flight.head = flight.head + data, b""
            delivered += 1
            self.stats.counts["blocks_from_s3"] += 1
            self.stats.counts["bytes_from_s3"] += len(data)
            flight.data = data
            if flight.remember:
                self._memory.remember((version.oid, idx), data)
            if readahead:
                self._readahead_inflight -= 1
            flight.done.set()
            flight.grew.set()  # final: early readers see ``done``
            # The flight stays registered, with its data, until the block is on disk: a
            # reader arriving in between gets these bytes instead of starting a GET.
            self._spawn_store(version, idx, data)

        def stream() -> None:  # in a worker thread
            first = EAGER_FIRST_PIECE if eager else 0
            for piece in self.store.iter_range(
                version.key, version.etag, start, end, self.block_size, first, size=version.size
            ):
                if finished:
                    return
                if self._unwritten >= UNWRITTEN_LIMIT:  # a racy read is fine: a hint
                    trio.from_thread.run(self._room_to_write)
                trio.from_thread.run_sync(arrived, piece)

        error: BaseException | None = None
        try:
            await trio.to_thread.run_sync(stream, limiter=self._s3_limiter, abandon_on_cancel=True)
        except StoreError as exc:
            error = exc
        except Exception as exc:  # an unexpected bug must still wake every waiter
            log.exception("fetch of %s blocks %d-%d failed", version.key, run.start, run.stop - 1)
            error = exc
        finally:
            finished = True
            for offset in range(delivered, len(flights)):
                # Failures are not cached: the next reader of these blocks tries again.
                flights[offset].error = error or TransientError(f"{version.key}: fetch cancelled")
                flights[offset].done.set()
                flights[offset].grew.set()
                self._end_flight((version.oid, run.start + offset))
                if readahead:
                    self._readahead_inflight -= 1

    def _spawn_store(self, version: ObjectVersion, index: int, data: bytes) -> None:
        """Write a block in the background; its bytes count as unwritten until then."""
        assert self._nursery is not None
        self._unwritten += len(data)
        self._nursery.start_soon(self._store_and_land, version, index, data)

    async def _store_and_land(self, version: ObjectVersion, index: int, data: bytes) -> None:
        try:
            await self._store_block(version, index, data)
        except Exception:  # a full index DB, a sqlite timeout: the read was served; log it
            self.stats.counts["disk_errors"] += 1
            log.exception("cache write failed for %s block %d", version.key, index)
        finally:
            self._unwritten -= len(data)
            self._written.set()
            self._written = trio.Event()
            self._end_flight((version.oid, index))

    async def _room_to_write(self) -> None:
        """Wait while too much downloaded data waits for the disk (backpressure)."""
        while self._unwritten >= UNWRITTEN_LIMIT:
            await self._written.wait()

    def _end_flight(self, key: BlockKey) -> None:
        self._flights.pop(key).landed.set()
        if not self._flights:
            self._idle.set()

    async def _store_block(self, version: ObjectVersion, index: int, data: bytes) -> None:
        crc = zlib.crc32(data)
        victims, fits = self.ledger.reserve(len(data), self.bounds)
        if not fits:
            self.stats.counts["store_skipped_full"] += 1
            log.warning(
                "cache cannot hold more (cache_size=%d min_free=%d); block served uncached",
                self.cache_size,
                self.min_free,
            )
        oid = version.oid
        new_object = fits and oid not in self.ledger
        if new_object:
            self.ledger.new_record(version)
        try:
            await trio.to_thread.run_sync(
                self._disk.write_block,
                version,
                index,
                index * self.block_size,
                data if fits else None,
                crc,
                victims,
                new_object,
                limiter=self._disk_limiter,
            )
        except OSError as exc:
            if fits:
                self.ledger.unreserve(len(data))
            self.stats.counts["disk_errors"] += 1
            log.warning("cache write failed for %s: %s; reads go to S3", version.key, exc.strerror)
            return
        record = self.ledger.record(oid)
        if not fits or record is None:  # evicted whole while we wrote: do not index it
            if fits:
                self.ledger.unreserve(len(data))
            return
        self.ledger.add_block(record, index, crc)

    async def _read_verified(self, version: ObjectVersion, index: int, crc: int) -> bytes | None:
        start, end = block_span(index, self.block_size, version.size)
        try:
            data = await trio.to_thread.run_sync(
                self._disk.read, version.oid, start, end - start, limiter=self._disk_limiter
            )
        except OSError as exc:
            log.warning("cache read failed for %s: %s; refetching", version.key, exc.strerror)
            data = b""
        if len(data) == end - start and zlib.crc32(data) == crc:
            return data
        self.stats.counts["corrupt_blocks"] += 1
        log.warning(
            "cache block failed verification key=%s block=%d; discarded and refetched",
            version.key,
            index,
        )
        await self._drop_block(version, index, crc)
        return None

    async def _drop_block(self, version: ObjectVersion, index: int, crc: int) -> None:
        """Forget a block that failed its check (unless it was replaced meanwhile)."""
        if self.ledger.drop_block(version, index, crc):
            self._memory.drop((version.oid, index))
            await trio.to_thread.run_sync(
                self._disk.forget_block, version.oid, index, limiter=self._disk_limiter
            )

    # ---- helpers ---------------------------------------------------------

    def object_path(self, oid: str) -> Path:
        """The data file of an object version (kernel-served trees link it)."""
        return self._layout.path(oid)

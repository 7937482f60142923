"""What is on disk, checked, and changed whole: the cache's side of "never wrong bytes".

- Every block read from disk is checked against its CRC32 the first time this
  process reads it (`read_verified`); a block that fails is dropped, a miss.
- A whole object is checked end to end against what S3 says it is
  (`verify_object`: every block's CRC, then MD5 or an S3 checksum); blocks
  that fail are dropped, and `BlockCache.refetch` fetches them again.
- A finished upload is taken in whole as the new version's file (`adopt`),
  and unpinned versions are deleted whole (`free`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from s3cachefs.cache.blocks import ObjectVersion, block_span
from s3cachefs.cache.copies import Copies
from s3cachefs.cache.deleting import WHOLE, drop_written
from s3cachefs.cache.disk import Disk
from s3cachefs.cache.ledger import Bounds, Ledger, Victim
from s3cachefs.cache.memory import MemoryBlocks
from s3cachefs.cache.stats import CacheStats
from s3cachefs.store.checksums import Check, Digest
from s3cachefs.store.crc import crc32

log = logging.getLogger(__name__)


class Integrity:
    """Checks and whole-object changes over the ledger, memory and disk."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        memory: MemoryBlocks,
        disk: Disk,
        bounds: Bounds,
        stats: CacheStats,
        disk_limiter: trio.CapacityLimiter,
    ) -> None:
        self.ledger = ledger
        self.memory = memory
        self.disk = disk
        self.bounds = bounds
        self.stats = stats
        self.disk_limiter = disk_limiter
        self.copies = Copies()  # `cache.reuse`'s copies, under a limiter of their own

    async def read_verified(self, version: ObjectVersion, index: int, crc: int) -> bytes | None:
        """A block from disk if it passes its CRC; else None (it is dropped: a miss)."""
        start, end = block_span(index, self.ledger.block_size, version.size)
        try:
            data = await trio.to_thread.run_sync(
                self.disk.read, version.oid, start, end - start, limiter=self.disk_limiter
            )
        except OSError as exc:
            log.warning("cache read failed for %s: %s; refetching", version.key, exc.strerror)
            data = b""
        if len(data) == end - start and crc32(data) == crc:
            return data
        self.stats.counts["corrupt_blocks"] += 1
        log.warning(
            "cache block failed verification key=%s block=%d; discarded and refetched",
            version.key,
            index,
        )
        await self.drop_block(version, index, crc)
        return None

    async def drop_block(self, version: ObjectVersion, index: int, crc: int) -> None:
        """Forget a block that failed its check (unless it was replaced meanwhile)."""
        if self.ledger.drop_block(version, index, crc):
            self.memory.drop((version.oid, index))
            key = [(version.oid, index)]  # its refetch's row goes after this
            self.ledger.deleting.begin(key)
            try:
                await trio.to_thread.run_sync(
                    self.disk.forget_block, version.oid, index, limiter=self.disk_limiter
                )
            finally:
                self.ledger.deleting.end(key)

    async def forget_object(self, version: ObjectVersion) -> None:
        """Drop every cached block of this version (its content failed a whole-object check)."""
        for idx, crc in self.ledger.block_crcs(version).items():
            await self.drop_block(version, idx, crc)

    async def verify_object(self, version: ObjectVersion, check: Check) -> tuple[bool, str]:
        """Re-read a complete object from disk: every block's CRC, then ``check`` end to end.

        Blocks that fail are dropped (the next read or prefetch fetches them
        again). Returns (intact, what the bytes on disk digest to in the
        check's terms: `store.checksums.Digest.result`).
        """
        digest = Digest(check)
        if version.size == 0:  # nothing to store, nothing to read
            return digest.matches(), digest.result()
        if version.oid not in self.ledger or self.ledger.missing_blocks(version):
            return False, ""
        crcs = self.ledger.block_crcs(version)
        bad = await trio.to_thread.run_sync(
            self.disk.verify,
            version,
            self.ledger.block_size,
            crcs,
            digest,
            limiter=self.disk_limiter,
        )
        for idx in bad:
            self.stats.counts["corrupt_blocks"] += 1
            log.warning("cache block failed verification key=%s block=%d", version.key, idx)
            await self.drop_block(version, idx, crcs[idx])
        return not bad and digest.matches(), digest.result()

    async def reserve_whole(self, version: ObjectVersion) -> bool:
        """Room for all of ``version``, about to be written beside its place and adopted
        (``adopt(reserved=True)``): reserved, LRU victims evicted first. False: no room
        (nothing reserved)."""
        if version.size > self.bounds.cache_size - self.ledger.pinned_bytes:
            return False  # it would only flush the cache
        victims, fits = self.ledger.reserve(version.size, self.bounds)
        try:
            if victims:
                await trio.to_thread.run_sync(self.disk.evict, victims, limiter=self.disk_limiter)
        except BaseException:
            if fits:
                self.ledger.unreserve(version.size)
            raise
        finally:
            self.ledger.evicted(victims)
        return fits

    async def adopt(
        self, version: ObjectVersion, path: Path, crcs: dict[int, int], *, reserved: bool = False
    ) -> bool:
        """Take a complete local copy of ``version`` (a finished upload) as its cached data.

        ``path`` must be on the cache's filesystem; it is moved into place, or
        deleted when the cache cannot hold it. ``crcs`` are the CRC32s of the
        bytes that were uploaded, so every block stays verifiable. ``reserved``:
        its room is reserved already (`reserve_whole`), and given back unless it
        is kept. Returns whether the object is now cached (by this copy or not).
        """
        oid = version.oid
        await self.ledger.deleting.settled([(oid, None)])  # deletes of it before go first
        if oid in self.ledger or version.size == 0:  # nothing to add (same bytes, or empty)
            if reserved:
                self.ledger.unreserve(version.size)
            await trio.to_thread.run_sync(path.unlink, limiter=self.disk_limiter)
            return version.size == 0 or not self.ledger.missing_blocks(version)
        victims: list[Victim] = []
        if reserved:
            fits = True
        elif version.size > self.bounds.cache_size - self.ledger.pinned_bytes:
            # it would only flush the cache
            await trio.to_thread.run_sync(path.unlink, limiter=self.disk_limiter)
            return False
        else:
            victims, fits = self.ledger.reserve(version.size, self.bounds, on_disk=True)
        made = self.ledger.new_record(version) if fits else None
        try:
            await trio.to_thread.run_sync(
                self.disk.adopt, version, path, crcs, victims, fits, limiter=self.disk_limiter
            )
        except BaseException as exc:  # a full disk, a locked index (diskcache.Timeout)
            self.ledger.evicted(victims)
            if fits:
                if self.ledger.record(oid) is made and made is not None and not made.blocks:
                    self.ledger.discard(oid)  # else a read's blocks are in it
                self.ledger.unreserve(version.size)
            if not isinstance(exc, Exception):
                raise
            reason = exc.strerror if isinstance(exc, OSError) else str(exc) or repr(exc)
            log.warning("cache could not keep %s: %s", version.key, reason)
            return False
        self.ledger.evicted(victims)
        if made is None:  # no room
            return False
        record = self.ledger.record(oid)
        if record is not made:
            # Freed whole while it was placed (and maybe made anew): not indexed into a
            # newer record; what it put on the disk goes (`drop_written`).
            self.ledger.unreserve(version.size)
            held = None if record is None else record.blocks
            try:
                await drop_written(
                    self.ledger.deleting,
                    self.disk,
                    oid,
                    held,
                    list(crcs),
                    limiter=self.disk_limiter,
                )
            except Exception as exc:  # noqa: BLE001  a locked index: rows left, not raised
                log.warning("cache could not drop the rows of %s: %s", version.key, exc)
            return False
        record.indexed = True  # its object row came in the same transaction
        self.ledger.add_blocks(record, crcs)
        self.stats.counts["adopted_bytes"] += version.size
        return True

    async def free(self, oids: set[str]) -> int:
        """Delete the cached data of these (unpinned) object versions; returns bytes freed.
        A held one (a passthrough reader's) is freed at its last release instead: until
        then the kernel keeps its blocks allocated, so they are not counted free now."""
        freed, gone = 0, []
        # Out of the ledger all at once, before any await: eviction (which punches holes)
        # never picks one of them meanwhile (a kernel-served link may still be open).
        for oid in oids - self.ledger.pinned:
            if self.ledger.free_when_released(oid):
                continue
            removed = self.ledger.remove(oid)
            if removed is not None:
                gone.append((oid, *removed))
        # Their deletes are pending until each ran: a read of one meanwhile fetches it
        # again, and its write waits (`cache.deleting`).
        self.ledger.deleting.begin((oid, WHOLE) for oid, _, _ in gone)
        ran = 0
        try:
            for oid, record, nbytes in gone:
                self.memory.drop_object(oid)
                freed += nbytes
                try:
                    await trio.to_thread.run_sync(
                        self.disk.free, oid, list(record.blocks), limiter=self.disk_limiter
                    )
                finally:
                    ran += 1
                    self.ledger.deleting.end([(oid, WHOLE)])
        finally:
            self.ledger.deleting.end((oid, WHOLE) for oid, _, _ in gone[ran:])
        return freed


def held_bytes(ledger: Ledger, oids: set[str]) -> int:
    """Bytes of those of ``oids`` held and not pinned: what a free of them now leaves for
    the last release (a passthrough reader's: `Integrity.free`), for `evict` to say."""
    held = (ledger.record(o) for o in oids - ledger.pinned if ledger.is_kept(o))
    return sum(ledger.block_len(r.version, i) for r in held if r is not None for i in r.blocks)

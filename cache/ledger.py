"""The cache's books: what it holds, what goes first, what never goes, how much room is left.

Per object version a `Record` (the version and the CRC32 of every block on disk);
the least-recently-used order of blocks neither pinned nor held (eviction takes
from its front); the pinned set and counted holds, oids never evicted, with their
bytes (`cache.keeping`); the bytes used, and reservations against ``--cache-size``
and ``--min-free`` (`Bounds`).

The ledger lives in memory only: the index on disk follows it (`cache.disk`)
and refills it at start (`cache.index`), so after a restart blocks start in
the order they were cached. Every method is synchronous and runs on the trio
thread: it must not await, so no other task sees the books half changed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from s3cachefs.cache.blocks import BlockKey, ObjectVersion, block_count, block_len, block_span
from s3cachefs.cache.deleting import WHOLE, Deleting, Key
from s3cachefs.cache.keeping import Keeping
from s3cachefs.cache.stats import CacheStats


@dataclass
class Record:
    version: ObjectVersion
    blocks: dict[int, int] = field(default_factory=dict)  # block index -> crc32
    # Its object row is committed in the index (loaded, or written by a commit that
    # succeeded). Until then every block write writes it too: a block row with no object
    # row is dropped at start (a bulk commit that failed, a first write that failed).
    # A delete of an earlier record's rows cannot land after it: `cache.deleting`.
    indexed: bool = False
    # Blocks taken off the books (evicted, dropped): a check of the file made before
    # this changed is stale (`fs.passthrough` keeps registrations of checked files).
    taken: int = 0


# A block taken off the books to make room: (oid, block index, start, length), the
# length -1 when it was the object's last block (its whole file goes).
Victim = tuple[str, int, int, int]


def victim_key(victim: Victim) -> Key:
    """What a victim's delete takes (`cache.deleting`): its block, or its whole object."""
    oid, idx, _, length = victim
    return oid, WHOLE if length < 0 else idx


@dataclass(frozen=True)
class Bounds:
    """How much the cache may hold: ``--cache-size``, and ``--min-free`` on its disk."""

    cache_dir: Path
    cache_size: int
    min_free: int

    def disk_free(self) -> int:
        return psutil.disk_usage(str(self.cache_dir)).free


# The disk's free bytes are asked (statvfs) at most every FREE_SAMPLE_SECONDS, or once
# the reservations since the last answer moved FREE_SAMPLE_BYTES: one statvfs per
# reservation was a tenth of the daemon's CPU in a prefetch of small objects (issue 12).
# Between two answers the ledger counts what it reserved on the disk itself, so within
# one answer's window a burst of reservations cannot promise the same free bytes twice.
# Each answer starts that count again: bytes reserved before it and not yet written (bulk
# jobs out) are in neither, so across windows they can be promised twice, by at most what
# is reserved and unwritten (as with a statvfs per reservation, which never saw them
# either; `--min-free` is the margin). Another process's writes show at the next answer.
FREE_SAMPLE_SECONDS = 0.05
FREE_SAMPLE_BYTES = 64 * 1024 * 1024


class FreeSpace:
    """The disk's free bytes as of the last statvfs, less what was reserved on it since
    (not what was reserved before it and is not written yet: see above)."""

    def __init__(self) -> None:
        self._at = -math.inf  # time.monotonic() of the last statvfs
        self._sample = 0
        self._since = 0  # bytes reserved on the disk since (net of evictions)

    def free(self, bounds: Bounds) -> int:
        now = time.monotonic()
        if now - self._at >= FREE_SAMPLE_SECONDS or abs(self._since) >= FREE_SAMPLE_BYTES:
            self._sample, self._at, self._since = bounds.disk_free(), now, 0
        return self._sample - self._since

    def forget(self) -> None:
        """Ask the disk at the next `free`."""
        self._at = -math.inf

    def took(self, nbytes: int) -> None:
        """``nbytes`` more reserved on the disk (negative: freed)."""
        self._since += nbytes


class Ledger:
    """Records, the eviction order, the pinned set and the bytes used. Must not await."""

    def __init__(self, block_size: int, stats: CacheStats | None = None) -> None:
        self.block_size = block_size  # the cache dir's own (its format file) once open
        self.stats = stats or CacheStats()
        self._objects: dict[str, Record] = {}
        self._lru: OrderedDict[BlockKey, None] = OrderedDict()  # not pinned, not held
        self._keeping = Keeping(self._oid_bytes, self._set_kept)  # pinned or held oids
        self._used = 0
        self._free = FreeSpace()
        # Oids whose rows or file are being deleted: their writes wait (`cache.deleting`).
        self.deleting = Deleting()

    # ---- what is held ----------------------------------------------------

    @property
    def used(self) -> int:
        return self._used

    @property
    def object_count(self) -> int:
        return len(self._objects)

    @property
    def evictable_blocks(self) -> int:
        """Blocks in the LRU: every block while nothing is pinned (at start)."""
        return len(self._lru)

    def record(self, oid: str) -> Record | None:
        return self._objects.get(oid)

    def has_block(self, oid: str, index: int) -> bool:
        record = self._objects.get(oid)
        return record is not None and index in record.blocks

    def block_crc(self, oid: str, index: int) -> int | None:
        record = self._objects.get(oid)
        return None if record is None else record.blocks.get(index)

    def missing_blocks(self, version: ObjectVersion) -> list[int]:
        record = self._objects.get(version.oid)
        nblocks = block_count(self.block_size, version.size)
        have = record.blocks if record else {}
        return [idx for idx in range(nblocks) if idx not in have]

    def block_crcs(self, version: ObjectVersion) -> dict[int, int]:
        """A copy of the CRC32 of every block of ``version`` on disk."""
        record = self._objects.get(version.oid)
        return dict(record.blocks) if record else {}

    def block_len(self, version: ObjectVersion, index: int) -> int:
        return block_len(index, self.block_size, version.size)

    # ---- the pinned set --------------------------------------------------

    @property
    def pinned(self) -> set[str]:
        return set(self._keeping.pinned)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the pinned versions' blocks (what prefetch pinned)."""
        return self._keeping.pinned_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of the held versions' blocks not pinned (`fs.passthrough` bounds them)."""
        return self._keeping.held_bytes

    def is_kept(self, oid: str) -> bool:
        """Whether ``oid`` is pinned or held (a hold adds no held bytes)."""
        return oid in self._keeping

    def _kept_part(self, oid: str, indices: Iterable[int] | None = None) -> int:
        """Bytes of ``oid``'s blocks (of ``indices`` only, if given) if it is pinned or
        held, else 0: what a change to them changes in the kept bytes."""
        record = self._objects.get(oid)
        if record is None or oid not in self._keeping:
            return 0
        blocks = record.blocks if indices is None else indices
        return sum(self.block_len(record.version, idx) for idx in blocks)

    def _oid_bytes(self, oid: str) -> int:
        """Bytes of ``oid``'s blocks, in O(1): each hold and release (per open) asks."""
        record = self._objects.get(oid)
        if record is None:
            return 0
        size, bs = record.version.size, self.block_size  # every block full but the last
        last = block_count(bs, size) - 1
        short = bs - block_len(last, bs, size) if last in record.blocks else 0
        return len(record.blocks) * bs - short

    def pin(self, oid: str) -> None:
        """Add one version to the pinned set (prefetch, per verified object)."""
        self._keeping.pin(oid)

    def hold(self, oid: str) -> None:
        """One more hold on ``oid``: none of its blocks is taken to make room until every
        hold is released (`release`). A delete taken before may still be pending."""
        self._keeping.hold(oid)

    def release(self, oid: str, can_free: bool = True) -> bool:
        """One hold less; with the last, ``oid``'s blocks rejoin the LRU (unless pinned).
        True if a free waited for it: the caller frees it now (`Keeping.release`)."""
        return self._keeping.release(oid, can_free)

    def free_when_released(self, oid: str) -> bool:
        """Whether ``oid`` is held (the kernel reads its file: its blocks stay allocated
        while it does); if so, it is to be freed at its last release, not now."""
        return self._keeping.free_when_released(oid)

    def set_pinned(self, oids: set[str]) -> None:
        """Make exactly ``oids`` pinned: their blocks leave the LRU; unpinned ones rejoin it."""
        self._keeping.set_pinned(oids)

    def _set_kept(self, oid: str, kept: bool) -> None:
        """``oid``'s blocks leave the LRU (``kept``: pinned or held) or rejoin it."""
        record = self._objects.get(oid)
        if record is None:
            return
        for idx in record.blocks:
            if kept:
                self._lru.pop((oid, idx), None)
            else:
                self._lru[(oid, idx)] = None

    # ---- changes ---------------------------------------------------------

    def new_record(self, version: ObjectVersion) -> Record:
        self._keeping.add(version.oid, -self._kept_part(version.oid))  # a record it replaces
        record = self._objects[version.oid] = Record(version)
        return record

    def add_block(self, record: Record, index: int, crc: int) -> None:
        """A block is on disk and indexed; its bytes were reserved (given back if it was
        on the books already: two writers of one block must not count it twice)."""
        oid = record.version.oid
        if index in record.blocks:
            self._used -= self.block_len(record.version, index)
        else:
            self._keeping.add(oid, self._kept_part(oid, (index,)))
        record.blocks[index] = crc
        if oid not in self._keeping:
            self._lru[(oid, index)] = None

    def add_blocks(self, record: Record, crcs: dict[int, int]) -> None:
        """Blocks on disk and indexed (an adopted file's: in block order); their bytes were
        reserved, and are given back for a block that was on the books already."""
        oid = record.version.oid
        new = [i for i in crcs if i not in record.blocks]
        self._used -= sum(self.block_len(record.version, i) for i in crcs if i in record.blocks)
        self._keeping.add(oid, self._kept_part(oid, new))
        record.blocks.update(crcs)
        if oid not in self._keeping:
            self._lru.update((k, None) for k in ((oid, idx) for idx in sorted(crcs)))

    def touch(self, key: BlockKey) -> None:
        """A block was read from disk: it goes last in the eviction order."""
        if key in self._lru:
            self._lru.move_to_end(key)

    def drop_block(self, version: ObjectVersion, index: int, crc: int) -> bool:
        """Forget a block that failed its check, unless it was replaced meanwhile."""
        record = self._objects.get(version.oid)
        if record is None or record.blocks.get(index) != crc:
            return False
        self._keeping.add(version.oid, -self._kept_part(version.oid, (index,)))
        record.blocks.pop(index)
        record.taken += 1
        self._lru.pop((version.oid, index), None)
        self._used -= self.block_len(version, index)
        return True

    def remove(self, oid: str) -> tuple[Record, int] | None:
        """Take a whole object version off the books: its record and the bytes it held."""
        self._keeping.add(oid, -self._kept_part(oid))
        record = self._objects.pop(oid, None)
        if record is None:
            return None
        nbytes = 0
        for idx in record.blocks:
            self._lru.pop((oid, idx), None)
            nbytes += self.block_len(record.version, idx)
        self._used -= nbytes
        return record, nbytes

    def discard(self, oid: str) -> None:
        """Drop a record that never got its blocks (a failed adoption)."""
        self._keeping.add(oid, -self._kept_part(oid))
        self._objects.pop(oid, None)

    def clear(self) -> None:
        self._objects.clear()
        self._lru.clear()
        self._used = 0
        self._keeping.clear()

    # ---- loading (cache.index) -------------------------------------------

    def load_object(self, oid: str, version: ObjectVersion) -> None:
        """An object row from the index (its blocks follow)."""
        self._keeping.add(oid, -self._kept_part(oid))
        self._objects[oid] = Record(version, indexed=True)

    def load_block(self, oid: str, index: int, crc: int) -> bool:
        """A block row from the index, in the order rows were written; False if orphaned."""
        record = self._objects.get(oid)
        if record is None:
            return False
        if index not in record.blocks:
            self._keeping.add(oid, self._kept_part(oid, (index,)))
        record.blocks[index] = crc
        self._lru[(oid, index)] = None
        self._used += self.block_len(record.version, index)
        return True

    def oids(self) -> list[str]:
        return list(self._objects)

    def __contains__(self, oid: object) -> bool:
        return oid in self._objects

    # ---- room ------------------------------------------------------------

    def room_for(self, nbytes: int, bounds: Bounds) -> tuple[bool, int]:
        """Whether ``nbytes`` more can be cached without evicting pinned data, and the room."""
        evictable = self._used - self.pinned_bytes - self.held_bytes
        free = bounds.disk_free()
        room = min(bounds.cache_size - self._used, free - bounds.min_free) + evictable
        return nbytes <= room, max(0, room)

    def disk_room(self, bounds: Bounds) -> int:
        """What the cache can hold: --cache-size, or less where --min-free binds (sampled)."""
        disk = self._used + self._free.free(bounds) - bounds.min_free
        return max(0, min(bounds.cache_size, disk))

    def reserve(
        self, nbytes: int, bounds: Bounds, *, on_disk: bool = False
    ) -> tuple[list[Victim], bool]:
        """Take LRU victims off the books until ``nbytes`` fit.

        Returns the victims (to be removed from disk) and whether the block fits;
        ``--min-free`` can make the cache shrink below what it holds now. The
        victims' deletes are pending (`deleting`) until the caller's `evicted`: the
        caller MUST call it (in a ``finally``), or writes of those oids wait for ever.
        ``on_disk``: the bytes are on the disk already (an adopted file): they
        count against ``--cache-size`` but take no more disk space.
        """
        free = self._free.free(bounds)
        victims: list[Victim] = []
        freed = 0
        new_disk = 0 if on_disk else nbytes

        def over() -> bool:
            return (
                self._used - freed + nbytes > bounds.cache_size
                or free + freed - new_disk < bounds.min_free
            )

        while over() and self._lru:
            (oid, idx), _ = self._lru.popitem(last=False)
            record = self._objects[oid]
            self._keeping.add(oid, -self._kept_part(oid, (idx,)))  # 0: the LRU holds no pins
            del record.blocks[idx]
            record.taken += 1
            start, end = block_span(idx, self.block_size, record.version.size)
            last = not record.blocks
            if last:
                del self._objects[oid]
            victims.append((oid, idx, start, -1 if last else end - start))
            freed += end - start
        self.stats.counts["evictions"] += len(victims)
        self.deleting.begin(map(victim_key, victims))
        fits = not over()
        self._used += (nbytes if fits else 0) - freed
        # Not given back by `unreserve` (nor for an adopted file's bytes, on the disk
        # already): free space under-counted until the next statvfs, never over-counted.
        self._free.took((new_disk if fits else 0) - freed)
        return victims, fits

    def evicted(self, victims: list[Victim]) -> None:
        """The thread call that evicts ``victims`` returned, raised, or never started:
        writes of their oids may go (`cache.deleting`)."""
        if victims:
            self.deleting.end(map(victim_key, victims))

    def recount_free(self) -> None:
        """An eviction (or a write) failed: the bytes `reserve` counted as freed may still
        be on the disk; the next reservation asks the disk rather than trust the count."""
        self._free.forget()

    def unreserve(self, nbytes: int) -> None:
        """Bytes reserved for a write that did not land."""
        self._used -= nbytes

"""Deletes of an object's rows or file that are taken off the books but not yet on the disk.

An eviction (`Ledger.reserve`), a free (`Integrity.free`, a bulk commit's orphans) or a
failed block (`Integrity.drop_block`) changes the ledger at once, on the trio thread, and
deletes rows and bytes later, in a worker thread (`cache.disk`). Meanwhile the object
looks missing, and a read or a prefetch may fetch it again: a write of that oid (its
object row, a block's row and bytes, its file) that ran before the late delete would be
deleted by it, while the ledger kept the blocks (`Record.indexed` says the object row is
in). So: **a write of an oid (the step that reserves, makes its record and starts its
thread) waits until every delete of that oid taken off the books before has run**
(`settled`), or is not made: a read's block is served uncached rather than wait
(`Fetcher._store_block`: its bytes hold the daemon's download backpressure). A delete
taken after the write started cannot touch it: the write's blocks are on the books only
once it returned, and only into the very record it wrote for; if that record was deleted
whole meanwhile, the write is not indexed and its block rows are deleted (the fetcher,
`Integrity.adopt`, `BulkEngine._settle`).

Deletes are kept by what they take: a whole object (its object row, every block row,
its file) or one block (its row, a hole punched). A write of some blocks waits only for
the first kind and for its own blocks' of the second: a read streaming an object larger
than the cache evicts the same object's first blocks, and its writes must not queue
behind each other for that.

Every ``begin`` is matched by one ``end`` once the delete's thread call returned or
raised, or was cancelled before its thread started (a delete that never ran leaves
rows and bytes of the same immutable version: still right, CRC-checked when read).
All methods run on the trio thread; only `settled` awaits, and only while one is pending.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from typing import Protocol, TypeVar

import trio

WHOLE = -1  # the block index of a whole object's delete

# A delete on its way: (oid, block index), or (oid, WHOLE).
Key = tuple[str, int]
# A write that must not be taken: (oid, its block indices), None for all (a whole file).
Write = tuple[str, Collection[int] | None]

T = TypeVar("T")


class Deleting:
    """Deletes on their way to the disk, counted per delete."""

    def __init__(self) -> None:
        self._keys: Counter[Key] = Counter()
        self._oids: Counter[str] = Counter()  # the same, per oid
        self._ended = trio.Event()  # set (and replaced) whenever one ends
        # Told the oid of each delete as it begins (`fs.passthrough` lets go of a kept
        # kernel registration, which would keep the file on the disk and unpunched).
        self.on_begin: Callable[[str], None] | None = None

    def __contains__(self, oid: object) -> bool:
        """Whether any delete of ``oid`` is pending."""
        return oid in self._oids

    def begin(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._keys[key] += 1
            self._oids[key[0]] += 1
            if self.on_begin is not None:
                self.on_begin(key[0])

    def end(self, keys: Iterable[Key]) -> None:
        for key in keys:
            # An extra end would let a write go while the delete it must wait for runs.
            assert self._keys[key] > 0, f"a delete ended that never began: {key}"
            _less(self._keys, key)
            _less(self._oids, key[0])
        self._ended.set()
        self._ended = trio.Event()

    def pending(self, oid: str, blocks: Iterable[int] | None = None) -> bool:
        """Whether a delete that would take a write of ``blocks`` of ``oid`` (None: of
        any of its blocks, or its file) is pending."""
        if oid not in self._oids:
            return False
        if blocks is None or (oid, WHOLE) in self._keys:
            return True
        return any((oid, idx) in self._keys for idx in blocks)

    async def settled(self, writes: Iterable[Write]) -> None:
        """Return once no delete that would take one of ``writes`` is pending; with no
        checkpoint if none is (the caller's next steps up to its thread call then run
        before any other task)."""
        if not self._oids:  # the usual case: nothing on its way
            return
        wanted = list(writes)
        while any(self.pending(oid, blocks) for oid, blocks in wanted):
            await self._ended.wait()

    async def one_ends_or(self, other: trio.Event) -> None:
        """Return once a delete ends or ``other`` is set, whichever comes first."""
        ended = self._ended
        async with trio.open_nursery() as nursery:
            for event in (ended, other):
                nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)

    def hold_back(self, writes: list[T], of: Callable[[T], Write]) -> tuple[list[T], list[T]]:
        """``writes`` split into those to make now and those a pending delete would take."""
        later = [self.pending(*of(w)) for w in writes]
        pairs = list(zip(writes, later, strict=True))
        return [w for w, wait in pairs if not wait], [w for w, wait in pairs if wait]


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def delete_in_thread(
    deleting: Deleting,
    keys: list[Key],
    delete: Callable[..., None],
    *args: object,
    limiter: trio.CapacityLimiter,
) -> None:
    """Run ``delete(*args)`` in a worker thread, pending under ``keys`` until it ran (a
    write of what it deletes waits for it). Begun before the first await."""
    deleting.begin(keys)
    try:
        await trio.to_thread.run_sync(delete, *args, limiter=limiter)
    finally:
        deleting.end(keys)


class RowDeleter(Protocol):
    """The blocking deletes `drop_written` runs (`cache.disk.Disk`)."""

    def free(self, oid: str, blocks: list[int]) -> None: ...

    def forget_blocks(self, oid: str, blocks: list[int]) -> None: ...


async def drop_written(
    deleting: Deleting,
    disk: RowDeleter,
    oid: str,
    held: Collection[int] | None,
    blocks: list[int],
    *,
    limiter: trio.CapacityLimiter,
) -> None:
    """Undo what a write put on the disk for a record deleted whole while it wrote (never
    indexed). ``held``: the blocks of the record made anew since: only our rows it does
    not hold go. None, none was made: nothing newer writes the object (its writes wait
    for this), and the delete may have run before our write made the file and rows
    again: the file and every row go, or they would stay on disk on no books."""
    if held is None:
        keys, delete, what = [(oid, WHOLE)], disk.free, blocks
    else:
        what = [idx for idx in blocks if idx not in held]
        keys, delete = [(oid, idx) for idx in what], disk.forget_blocks
    if what:
        await delete_in_thread(deleting, keys, delete, oid, what, limiter=limiter)


def _less(counter: Counter[T], key: T) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]

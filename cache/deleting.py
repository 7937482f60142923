"""Deletes of an object's rows or file that are taken off the books but not yet on the disk.

An eviction (`Ledger.reserve`), a free (`Integrity.free`, a bulk commit's orphans) or a
failed block (`Integrity.drop_block`) changes the ledger at once, on the trio thread, and
deletes rows and bytes later, in a worker thread (`cache.disk`). Meanwhile the object
looks missing, and a read or a prefetch may fetch it again: a write of that oid (its
object row, a block's row and bytes, its file) that ran before the late delete would be
deleted by it, while the ledger kept the blocks (`Record.indexed` says the object row is
in). So: **a write of an oid (the step that reserves, makes its record and starts its
thread) waits until every delete of that oid taken off the books before has run**
(`settled`). A delete taken after the write started cannot touch it: the write's blocks
are on the books only once it returned, and a whole-object delete of the record it wrote
for leaves that write unindexed (`Fetcher._store_block`, `BulkEngine._settle`).

Every ``begin`` is matched by one ``end`` once the delete's thread call returned or
raised, or was cancelled before its thread started (a delete that never ran leaves
rows and bytes of the same immutable version: still right, CRC-checked when read).
All methods run on the trio thread; only `settled` awaits, and only while one is pending.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import trio


class Deleting:
    """Oids with deletes on their way to the disk, counted per delete."""

    def __init__(self) -> None:
        self._pending: Counter[str] = Counter()
        self._ended = trio.Event()  # set (and replaced) whenever one ends

    def __contains__(self, oid: object) -> bool:
        return oid in self._pending

    def begin(self, oids: Iterable[str]) -> None:
        self._pending.update(oids)

    def end(self, oids: Iterable[str]) -> None:
        for oid in oids:
            self._pending[oid] -= 1
            if self._pending[oid] <= 0:
                del self._pending[oid]
        self._ended.set()
        self._ended = trio.Event()

    async def settled(self, oids: Iterable[str]) -> None:
        """Return once none of ``oids`` has a delete pending; no checkpoint if none has
        (the caller's next steps up to its thread call run before any other task)."""
        wanted = set(oids)
        while any(oid in self._pending for oid in wanted):
            await self._ended.wait()

"""Object versions out of the eviction order, and their bytes: pinned or held.

Pinned: a prefetched dataset's versions, never evicted; this is the pinned set's
one owner (the pin store tells the ledger every change, `datasets.pins`). Held:
counted holds, versions not evicted while held (a file the kernel reads itself,
`fs.passthrough`, whose reader would see a punched block as zeros). A version both
pinned and held counts as pinned. A free of a held version waits for its last
release (`free_when_released`): the kernel's reference keeps its blocks allocated
until then, so they are not counted free before. The bytes of each kind are kept as they change:
every room check asks, and summing them each time is O(cached blocks)
(`cache.reuse`).

The ledger owns the records and the LRU; it gives this a way to count an oid's
bytes on the books and to move its blocks out of (or back into) the LRU. Every
method runs on the trio thread and must not await (`cache.ledger`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class Keeping:
    """The pinned set, the counted holds and the bytes of each. Must not await."""

    def __init__(self, nbytes: Callable[[str], int], move: Callable[[str, bool], None]) -> None:
        self._nbytes = nbytes  # oid -> bytes of its blocks on the books (0: no record)
        self._move = move  # (oid, kept): its blocks leave the LRU (kept) or rejoin it
        self.pinned: set[str] = set()
        self.held: Counter[str] = Counter()
        self.pinned_bytes = 0
        self.held_bytes = 0
        self._free_at_release: set[str] = set()  # held oids a free waits for

    def __contains__(self, oid: object) -> bool:
        """Whether ``oid`` is out of the eviction order: pinned or held."""
        return oid in self.pinned or oid in self.held

    def add(self, oid: str, nbytes: int) -> None:
        """``nbytes`` more (negative: fewer) of ``oid``'s blocks are on the books."""
        if oid in self.pinned:
            self.pinned_bytes += nbytes
        elif oid in self.held:
            self.held_bytes += nbytes

    def pin(self, oid: str) -> None:
        if oid in self.pinned:
            return
        nbytes = self._nbytes(oid)
        if oid in self.held:
            self.held_bytes -= nbytes
        else:
            self._move(oid, True)
        self.pinned.add(oid)
        self.pinned_bytes += nbytes

    def hold(self, oid: str) -> None:
        self.held[oid] += 1
        if self.held[oid] == 1 and oid not in self.pinned:
            self._move(oid, True)
            self.held_bytes += self._nbytes(oid)

    def release(self, oid: str, can_free: bool = True) -> bool:
        """One hold less; True at the last one of an oid a free waits for. Its blocks
        then stay out of the LRU: the free runs a scheduling step later (a task), and an
        eviction in between would punch a file a hard-link reader is promised is freed
        whole (review of 43f360f, #1); the free takes them off the books. Unless the
        caller cannot start a free (``can_free`` False): then they rejoin it now."""
        self.held[oid] -= 1
        if self.held[oid] > 0:
            return False
        del self.held[oid]
        free = oid in self._free_at_release and can_free
        self._free_at_release.discard(oid)
        if oid not in self.pinned:
            if not free:
                self._move(oid, False)
            self.held_bytes -= self._nbytes(oid)
        return free

    def free_when_released(self, oid: str) -> bool:
        """Whether ``oid`` is held; if so, its last release says it is to be freed."""
        if oid not in self.held:
            return False
        self._free_at_release.add(oid)
        return True

    def set_pinned(self, oids: set[str]) -> None:
        for oid in self.pinned - oids:
            nbytes = self._nbytes(oid)
            self.pinned_bytes -= nbytes
            if oid in self.held:
                self.held_bytes += nbytes
            else:
                self._move(oid, False)
        for oid in oids - self.pinned:
            nbytes = self._nbytes(oid)
            self.pinned_bytes += nbytes
            if oid in self.held:
                self.held_bytes -= nbytes
            else:
                self._move(oid, True)
        self.pinned = set(oids)

    def clear(self) -> None:
        """Every record is gone (the sets stay: pins and holds outlive a clear)."""
        self.pinned_bytes = self.held_bytes = 0

"""The backing ids of `fs.passthrough`: counted, and kept past their handles.

An id is counted: one for its kept registration and one per inode using it, closed
at zero (the kernel answers every later open of an inode with its id: a closed one
is EIO to open(2)). A registration outlives its handles (kept, up to ``keep_max``,
least recently used first out; and at most KEEP_IDLE unused), unheld: the next open
re-uses it only if its record is the one checked, none of its blocks was taken off
the books since (`Record.taken`: eviction and drops count), and the cache file at
its path is the inode checked, same size and times. Else it is checked anew.

A kept registration is a kernel reference to its cache file (and its shared flock),
freed with the connection's backing-id table only: while any file of the mount
stays open, even past this daemon. So they go at a stop (`Kept.close_unused`) and
when idle: a kill -9 leaves the kernel at most those used in the last KEEP_IDLE.
The check's result outlives such a close (`Kept.seen`, up to ``keep_max``): the next
open registers a new descriptor of the same file, flocked, without reading it again
(the same trust as a re-use); a file over --passthrough-check-max swept between two
epochs lost passthrough for good, each open starting a background whole-file read
(review of 43f360f, #3). A delete lets the result go as it does a registration.

Runs on the trio thread; must not await.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from s3cachefs.cache.ledger import Record
from s3cachefs.fs.passthroughcheck import Identity, identity_of

log = logging.getLogger(__name__)

# Registrations kept for the next open: a kernel file reference each (no descriptor).
KEEP_MAX = 4096
# Seconds a kept registration no open used stays kept; a sweep every KEEP_IDLE / 4 closes
# older ones (the next open checks anew: a read of the file, cheap for small ones).
KEEP_IDLE = 60.0


@dataclass
class Registration:
    """A checked, registered cache file; valid while the ledger took none of its blocks."""

    backing_id: int
    record: Record
    taken: int
    identity: Identity
    path: str  # the cache file's (a str: no pathlib per open)
    used: float  # trio time of its check, its last re-use or its last inode's release


class Kept:
    """Counted backing ids and the kept registrations (oid -> registration, LRU order)."""

    def __init__(self, unregister: Callable[[int], None], keep_max: int = KEEP_MAX) -> None:
        self.unregister = unregister  # backing id -> None (pyfuse3.passthrough_close)
        self.keep_max = keep_max
        self.refs: Counter[int] = Counter()  # backing id -> kept (1) + inodes using it
        self.by_oid: OrderedDict[str, Registration] = OrderedDict()
        # Checks whose registration a sweep or a stop closed (their backing ids are stale).
        self.checked: OrderedDict[str, Registration] = OrderedDict()

    def __len__(self) -> int:
        return len(self.by_oid)

    def get(self, oid: str) -> Registration | None:
        return self.by_oid.get(oid)

    def valid(self, oid: str, record: Record) -> bool:
        """Whether ``oid``'s kept registration's file is still as it was checked."""
        return as_checked(self.by_oid.get(oid), record)

    def seen(self, oid: str, record: Record) -> Registration | None:
        """``oid``'s check whose registration was closed (idle, a stop), if its file is
        still as checked: a descriptor of it with that identity needs no read."""
        checked = self.checked.get(oid)
        if checked is None:
            return None
        if not as_checked(checked, record):
            del self.checked[oid]
            return None
        self.checked.move_to_end(oid)
        return checked

    def reuse(self, oid: str, record: Record) -> int:
        """The kept registration of ``oid`` if its file is still as checked, else 0."""
        kept = self.by_oid.get(oid)
        if kept is None:
            return 0
        if self.valid(oid, record):
            self.by_oid.move_to_end(oid)
            kept.used = trio.current_time()
            return kept.backing_id
        self.forget(oid)
        return 0

    def add(self, oid: str, registration: Registration, in_use: Iterable[str]) -> None:
        """Keep a new registration (its count: one); the least recently used unused ones
        go over ``keep_max``."""
        self.forget(oid)
        self.by_oid[oid] = registration
        self.refs[registration.backing_id] += 1
        busy = {*in_use, oid}
        extra = len(self.by_oid) - self.keep_max
        for old in [o for o in self.by_oid if o not in busy][: max(0, extra)]:
            self.forget(old)

    def idle_from_now(self, oid: str) -> None:
        """The last inode using ``oid``'s registration closed."""
        if (kept := self.by_oid.get(oid)) is not None:
            kept.used = trio.current_time()

    def close_idle(self, before: float, in_use: Iterable[str]) -> None:
        """Let go of kept registrations unused since ``before`` (trio time)."""
        busy = set(in_use)
        for oid in [o for o, k in self.by_oid.items() if k.used < before and o not in busy]:
            self._close(oid)

    def close_unused(self) -> None:
        """Let go of every kept registration (an inode using its id keeps the id)."""
        for oid in list(self.by_oid):
            self._close(oid)

    def _close(self, oid: str) -> None:
        """Let a kept registration go, its check's result remembered (`seen`)."""
        kept = self.by_oid.pop(oid)
        self.unref(kept.backing_id)
        self.checked[oid] = kept
        self.checked.move_to_end(oid)
        if len(self.checked) > self.keep_max:
            self.checked.popitem(last=False)

    def forget(self, oid: str) -> None:
        """Let a kept registration go (its id stays while an inode uses it), and any
        check's result remembered."""
        self.checked.pop(oid, None)
        kept = self.by_oid.pop(oid, None)
        if kept is not None:
            self.unref(kept.backing_id)

    def unref(self, backing_id: int) -> None:
        """One use of ``backing_id`` less; the last closes it."""
        self.refs[backing_id] -= 1
        if self.refs[backing_id] > 0:
            return
        del self.refs[backing_id]
        try:
            self.unregister(backing_id)
        except OSError as exc:
            log.warning("passthrough: closing backing id failed: %s", exc.strerror)


def as_checked(checked: Registration | None, record: Record) -> bool:
    """Whether the file ``checked`` is still as it was checked, for ``record``."""
    if checked is None or checked.record is not record or checked.taken != record.taken:
        return False
    try:  # a stat of a cached dentry: no disk I/O
        return identity_of(os.stat(checked.path)) == checked.identity
    except OSError:
        return False

"""Work riding on the bulk path's index commits (`cache.bulk`): one thread call for a
commit's rows and, after them, the blocking work of whoever rides (`datasets.kernelprestage`:
the links of a first prefetch's tree), where there were two or three hand-offs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

log = logging.getLogger("s3cachefs.cache.bulk")

# Blocking work to do in a commit's thread call, after its rows (`datasets.kernelprestage`:
# links of objects pinned since the last one): ``work`` runs in the thread (one that raises
# is logged), ``then`` on the trio thread once the call is over, whatever happened.
Ride = tuple[Callable[[], None], Callable[[], None]]


class Rider(Protocol):
    """What may give work to ride on commits (`BulkEngine.riders`), asked on the trio thread
    once a commit's rows are in (their waiters woken first): what it holds until ``then``
    is never held while the commit waits on the index (up to its lock timeout)."""

    def wants(self) -> bool:
        """Before the thread call (cheap): ask me after the rows (one hop back into trio)."""

    def ride(self) -> Ride | None:
        """The rows are in (a commit that failed asks none): work for its thread, or None."""


def wants(rider: Rider) -> bool:
    """Whether ``rider`` rides on this commit; a rider's bug is its loss (False), not the rows'."""
    try:
        return rider.wants()
    except Exception:
        log.exception("a rider of a bulk commit failed before its ride")
        return False


def index_then(
    index: Callable[[list[Any]], list[bool]],
    rows: list[Any],
    indexed: Callable[[list[bool]], list[Ride]] | None,
) -> list[bool]:
    """In a worker thread: the rows, then, if ``indexed`` (a rider wants to ride), one hop
    back to the trio thread for it (it wakes what waits on the rows and asks the riders)
    and the work of the rides it gives. A ride whose work raises is logged: it must not
    turn rows that were committed into a commit that failed (the caller would give back
    what the index holds)."""
    kept = index(rows)
    if indexed is None:
        return kept
    for work, _ in trio.from_thread.run_sync(indexed, kept):
        try:
            work()
        except Exception:  # a rider's bug: its own loss, not the rows'
            log.exception("work riding on a bulk commit failed")
    return kept

"""Keyed single flight: one download per block, however many readers wait for it.

A tiny, separate thing that knows nothing of cache policy (JuiceFS's
``singleflight.go``): a `Flight` is registered under its block's key when the
fetch starts, every reader of that block waits on it, and it ends (leaves the
registry) once its block is on disk or was given up. Its bytes stay readable
until then, so a reader arriving between the download and the disk write gets
them instead of starting a GET.

A block may arrive in pieces: its head (the first piece) wakes readers that
need only the start of the block (a cold file's first small read) before the
rest is in.

All of it runs on the trio thread; nothing here awaits except the waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from s3cachefs.cache.blocks import BlockKey


@dataclass
class Flight:
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

    def feed(self, piece: bytes, length: int) -> bytes | None:
        """Take the next piece of a block of ``length`` bytes: the whole block once it is
        complete, else None (the piece is the head, and readers of the head are woken)."""
        if len(self.head) + len(piece) < length:
            self.head += piece
            self.wake()
            return None
        if self.head:
            piece, self.head = self.head + piece, b""
        return piece

    def finish(self, data: bytes | None, error: BaseException | None = None) -> None:
        """The block (or the error) is here: wake every reader, early ones too."""
        self.data, self.error = data, error
        self.done.set()
        self.grew.set()

    async def head_of(self, need: int) -> bytes | None:
        """Wait for the first ``need`` bytes: the head holding them, or None once the whole
        block (or an error) is there."""
        while not self.done.is_set() and len(self.head) < need:
            await self.grew.wait()
        return None if self.done.is_set() else self.head


class Flights:
    """The flights under way, by block key."""

    def __init__(self) -> None:
        self._flights: dict[BlockKey, Flight] = {}
        self._idle = trio.Event()  # set whenever the last flight ends

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._flights

    def get(self, key: BlockKey) -> Flight | None:
        return self._flights.get(key)

    def start(self, key: BlockKey, flight: Flight) -> Flight:
        self._flights[key] = flight
        return flight

    def end(self, key: BlockKey) -> None:
        """The block is on disk, or was given up: later readers look elsewhere."""
        self._flights.pop(key).landed.set()
        if not self._flights:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until no flight is left."""
        while self._flights:
            if self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    async def drain_object(self, oid: str) -> None:
        """Wait until every flight of this object's blocks has landed."""
        for key, flight in list(self._flights.items()):
            if key[0] == oid:
                await flight.landed.wait()


class ReadsWaiting:
    """How many reads wait on S3 right now: background work gives way while any do.

    The fetcher counts a reader's runs (not readahead, not prefetch) from start to
    end; the bulk engine sends no new job past a floor while the count is not zero,
    or was within ``linger`` seconds (reads come in bursts: a quiet server for the
    next one too), and nudges this when one of its jobs ends (DESIGN "reads go first").
    """

    def __init__(self, linger: float = 0.0) -> None:
        self.count = 0
        self.linger = linger
        self._last = -float("inf")  # trio time the last read's run ended
        self._lot = trio.lowlevel.ParkingLot()  # background tasks giving way

    def begin(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        if not self.count:
            self._last = trio.current_time()
            self._lot.unpark_all()

    def nudge(self) -> None:
        """A background job ended: one task waiting in `give_way` looks again (not all:
        each wake-up is a step on the trio thread the reads need)."""
        self._lot.unpark()

    def active(self) -> bool:
        return bool(self.count) or trio.current_time() < self._last + self.linger

    async def give_way(self, busy: Callable[[], bool]) -> None:
        """Return once no read waits (nor did within ``linger``), or ``busy()`` (checked
        at each change) is false."""
        while self.active() and busy():
            with trio.move_on_at(self._last + self.linger if not self.count else float("inf")):
                await self._lot.park()

"""Where is this block? One answer, asked by every path that needs to know.

A block can be in several places at once (in memory and on disk; in memory
and in its flight while it is written); `block_state` answers with the one
state that decides what a reader does next, in the order a reader looks:
memory, then disk, then a flight, else nowhere.
"""

from __future__ import annotations

import enum

from s3cachefs.cache.blocks import BlockKey
from s3cachefs.cache.flights import Flights
from s3cachefs.cache.ledger import Ledger
from s3cachefs.cache.memory import MemoryBlocks


class BlockState(enum.Enum):
    MEMORY = "memory"  # in memory, and on disk or on its way there
    MEMORY_ONLY = "memory only"  # in memory and nowhere else (a full disk, a failed write)
    DISK = "disk"  # on disk, indexed: served once its CRC passes
    ARRIVED = "arrived"  # its bytes are in its flight, being written (kept out of memory)
    IN_FLIGHT = "in flight"  # its GET is under way
    MISSING = "missing"  # nowhere: a GET must start

    @property
    def in_memory(self) -> bool:
        return self in (BlockState.MEMORY, BlockState.MEMORY_ONLY)

    @property
    def local(self) -> bool:
        """In memory or on disk: nothing to wait for but a disk read."""
        return self.in_memory or self is BlockState.DISK

    @property
    def servable(self) -> bool:
        """Served without waiting for S3."""
        return self.local or self is BlockState.ARRIVED


def block_state(
    key: BlockKey, memory: MemoryBlocks, ledger: Ledger, flights: Flights
) -> BlockState:
    """Where block ``key`` is now. Must not await: the answer holds until the next checkpoint."""
    on_disk = ledger.has_block(*key)
    if key in memory:
        return BlockState.MEMORY if on_disk or key in flights else BlockState.MEMORY_ONLY
    if on_disk:
        return BlockState.DISK
    flight = flights.get(key)
    if flight is None:
        return BlockState.MISSING
    return BlockState.ARRIVED if flight.data is not None else BlockState.IN_FLIGHT

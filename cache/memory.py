"""Recently used blocks kept in memory, least recent first, up to a byte limit.

A block here is served with no disk read and no CRC check (it is the bytes that
came from S3, or that passed the check when read from disk). Prefetched blocks
do not come here: they go to disk only.
"""

from __future__ import annotations

from collections import OrderedDict

from s3cachefs.cache.blocks import BlockKey


class MemoryBlocks:
    """An LRU of whole blocks, by bytes. Must not await (trio thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._blocks: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._used = 0

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._blocks

    def peek(self, key: BlockKey) -> bytes | None:
        """The block, if held, without counting it as used."""
        return self._blocks.get(key)

    def take(self, key: BlockKey) -> bytes | None:
        """The block, if held; it becomes the most recently used."""
        data = self._blocks.get(key)
        if data is not None:
            self._blocks.move_to_end(key)
        return data

    def remember(self, key: BlockKey, data: bytes) -> None:
        if key in self._blocks:
            return
        self._blocks[key] = data
        self._used += len(data)
        while self._used > self.limit and self._blocks:
            _, old = self._blocks.popitem(last=False)
            self._used -= len(old)

    def drop(self, key: BlockKey) -> None:
        stale = self._blocks.pop(key, None)
        self._used -= len(stale or b"")

    def drop_object(self, oid: str) -> None:
        for key in [k for k in self._blocks if k[0] == oid]:
            self._used -= len(self._blocks.pop(key))

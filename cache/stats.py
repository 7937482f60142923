"""The cache's counters: hits, misses, bytes from S3, evictions, repairs."""

from __future__ import annotations

from collections import Counter


class CacheStats:
    """Counters the status command, metrics and tests read."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

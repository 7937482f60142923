"""What a prefetch reports while it runs: counts of files and bytes, rate, ETA.

The job sends a "progress" event every ``PROGRESS_INTERVAL`` seconds through
its ``Report`` callback (the control socket passes them on to the client's
progress line) and a "done" event at the end.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from s3cachefs.base.values import human_bytes

Report = Callable[[dict[str, Any]], Awaitable[None]]
PROGRESS_INTERVAL = 0.5


@dataclass
class Progress:
    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    bytes_fetched: int = 0
    files_skipped: int = 0
    files_reused: int = 0  # copied from the same content cached under another key
    bytes_reused: int = 0
    dry_run: bool = False  # reused: "can be" reused
    listing_done: bool = False
    failed: dict[str, str] = field(default_factory=dict)
    size_only: set[str] = field(default_factory=set)  # accepted, not verified end to end
    started: float = field(default_factory=time.monotonic)

    def event(self, kind: str) -> dict[str, Any]:
        elapsed = max(1e-6, time.monotonic() - self.started)
        rate = self.bytes_fetched / elapsed
        left = self.bytes_total - self.bytes_done
        return {
            "event": kind,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "bytes_fetched": self.bytes_fetched,
            "listing_done": self.listing_done,
            "failed": len(self.failed),
            "size_only": len(self.size_only),
            "files_reused": self.files_reused,
            "bytes_reused": self.bytes_reused,
            "reused": self.reused(),
            "elapsed": round(elapsed, 3),
            "rate": round(rate),
            "eta": round(left / rate) if rate > 0 and self.listing_done else None,
        }

    def reused(self) -> str:
        """The objects copied inside the cache, for people ("" if none)."""
        return reused_line(self.files_reused, self.bytes_reused, dry_run=self.dry_run)


def reused_line(files: int, nbytes: int, *, dry_run: bool = False) -> str:
    """The objects copied inside the cache, for people: prefetch's summary, and
    ``status``'s over the daemon's life ("" for none)."""
    if not files:
        return ""
    verb = "can be reused" if dry_run else "reused"
    return (
        f"{files} object{'s' if files != 1 else ''} ({human_bytes(nbytes)}) {verb} "
        "from the cache, 0 GETs"
    )

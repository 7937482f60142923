"""What the Python API returns: `Dataset`, `Progress`, `DatasetState`, `VerifyReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Dataset:
    """A dataset (or one shard of it) on this node, complete and verified."""

    name: str  # as given to `ensure`
    path: Path  # bind this into containers, read-only
    keys: tuple[str, ...]  # sorted, relative to ``path`` (the shard's, with a shard)
    objects: int
    bytes: int
    kernel_served: bool  # daemon mode: the kernel serves the files (no FUSE round trip)
    shard: tuple[int, int] | None = None

    def files(self) -> list[Path]:
        """The dataset's (or shard's) files, in key order."""
        return [self.path / key for key in self.keys]


@dataclass(frozen=True)
class Progress:
    """One progress report of `DatasetProvider.ensure` (prefetch's and sync's events)."""

    dataset: str
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    rate: float  # bytes per second
    eta: float | None  # seconds, when known
    failed: int

    @classmethod
    def from_event(cls, dataset: str, event: dict[str, Any]) -> Progress:
        eta = event.get("eta")
        return cls(
            dataset,
            int(event.get("files_done", 0)),
            int(event.get("files_total", 0)),
            int(event.get("bytes_done", 0)),
            int(event.get("bytes_total", 0)),
            float(event.get("rate") or 0.0),
            None if eta is None else float(eta),
            int(event.get("failed") or 0),
        )


@dataclass(frozen=True)
class DatasetState:
    """One dataset in `DatasetProvider.status`."""

    name: str
    path: Path
    objects: int
    bytes: int
    complete: bool
    shard: str | None  # "I/N"
    kernel_served: bool
    verified_at: float | None  # epoch seconds (directory mode: the last sync)


@dataclass(frozen=True)
class VerifyReport:
    """What `DatasetProvider.verify` found: ``ok`` only if complete and every file intact."""

    name: str
    ok: bool
    complete: bool
    files_checked: int
    failed: dict[str, str] = field(default_factory=dict)  # key -> what is wrong
    size_only: int = 0  # files S3 gave nothing to check end to end against
    repaired: tuple[str, ...] = ()  # daemon mode: re-fetched and now intact

"""The ledger's view of the cache disk's free space (`cache.ledger.FreeSpace`): a statvfs
at most every 50 ms (or 64 MiB reserved), the reservations in between counted, so a full
disk is still refused and a burst of reservations within one sample's window never
promises the same bytes twice."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from s3cachefs.cache import ledger
from s3cachefs.cache.ledger import Bounds, Ledger
from tests.conftest import tmpfs

MIB = 1024 * 1024


@dataclass(frozen=True)
class CountingBounds(Bounds):
    """`Bounds` that counts its statvfs calls."""

    calls: list[int] = field(default_factory=list)

    def disk_free(self) -> int:
        self.calls.append(1)
        return super().disk_free()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of its own: no other process's writes change its free space."""
    with tmpfs(tmp_path / "disk", "32m") as disk:
        yield disk


def fill(path: Path, nbytes: int) -> None:
    with path.open("wb") as f:
        f.write(b"\1" * nbytes)
        f.flush()
        os.fsync(f.fileno())


def test_a_burst_of_reservations_never_promises_the_same_free_bytes_twice(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is written between them (bulk jobs reserve, then their workers write): the
    disk's free space is the same at each statvfs, yet the second does not fit."""
    monkeypatch.setattr(ledger, "FREE_SAMPLE_SECONDS", 3600.0)  # one statvfs for the test
    free = CountingBounds(small_disk, 1 << 40, 0).disk_free()
    bounds = CountingBounds(small_disk, 1 << 40, free - 10 * MIB)
    books = Ledger(MIB)
    assert books.reserve(6 * MIB, bounds) == ([], True)
    assert books.reserve(6 * MIB, bounds) == ([], False)
    assert books.reserve(4 * MIB, bounds) == ([], True)
    assert len(bounds.calls) == 1


def test_the_disk_is_asked_once_per_interval_or_per_64_mib_reserved(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "FREE_SAMPLE_SECONDS", 3600.0)
    bounds = CountingBounds(small_disk, 1 << 40, 0)
    books = Ledger(MIB)
    for _ in range(100):
        assert books.reserve(4096, bounds)[1]
    assert len(bounds.calls) == 1
    monkeypatch.setattr(ledger, "FREE_SAMPLE_BYTES", 8 * MIB)
    for _ in range(3):
        assert books.reserve(3 * MIB, bounds)[1]
    assert len(bounds.calls) == 1  # 9 MiB and some since: the next reservation asks
    books.reserve(4096, bounds)
    assert len(bounds.calls) == 2
    monkeypatch.setattr(ledger, "FREE_SAMPLE_SECONDS", 0.0)
    books.reserve(4096, bounds)
    books.reserve(4096, bounds)
    assert len(bounds.calls) == 4


def test_a_disk_filled_by_another_process_is_refused_at_the_next_statvfs(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache's room check stays the disk's: once it is asked again, what others wrote
    counts (and a full disk takes nothing more)."""
    monkeypatch.setattr(ledger, "FREE_SAMPLE_SECONDS", 3600.0)
    bounds = CountingBounds(small_disk, 1 << 40, 0)
    books = Ledger(MIB)
    assert books.reserve(MIB, bounds)[1]
    fill(small_disk / "other", 30 * MIB)  # now less than 2 MiB free
    monkeypatch.setattr(ledger, "FREE_SAMPLE_SECONDS", 0.0)
    assert books.reserve(4 * MIB, bounds) == ([], False)
    assert len(bounds.calls) == 2

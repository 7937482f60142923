"""Fetching whole objects into files, digested while the bytes pass (`sync`'s download part).

The interface is small on purpose, so that the bulk engine of issue 12 can
replace `ThreadFetcher` without touching `datasets.dirsync`: an `ObjectFetcher`
takes `FetchItem`s (an object version, the file to write, and the check to
digest it against, or None to have the fetcher ask `store.checkplan`) and
yields a `FetchResult` per object as it completes: the check used, what the
bytes digest to in its terms (`store.checksums.Digest`), how many were
written, or the error. The file is complete and fsynced when its result is
yielded. Deciding whether the object passed, trying another check of the same
bytes and fetching again is the caller's (`datasets.dirsync`).

`ThreadFetcher` is the simple engine: a bounded thread pool over one
`ObjectStore`, one whole-object GET per object (conditional on the ETag, its
response checked by the store: status, length, the body's MD5 for a
single-part ETag), hashlib/zlib/awscrt releasing the GIL on large pieces.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from s3cachefs.store.checksums import Check, Digest
from s3cachefs.store.types import ObjectInfo, ObjectStore

PIECE = 1 << 20  # bytes per piece read from a GET body (and per digest update)


@dataclass(frozen=True)
class FetchItem:
    info: ObjectInfo
    path: Path  # created (or truncated), written whole, fsynced
    check: Check | None = None  # None: the fetcher plans it (`store.checkplan.plan`)


@dataclass(frozen=True)
class FetchResult:
    item: FetchItem
    check: Check | None  # what the bytes were digested against (None: failed before)
    digest: str = ""  # `Digest.result()` of the bytes written
    matches: bool = False  # `Digest.matches()`: every byte, in the layout, S3's digest
    written: int = 0
    error: Exception | None = None  # a StoreError or OSError; the file is then removed


class ObjectFetcher(Protocol):
    def fetch(
        self, items: Sequence[FetchItem], *, stop: threading.Event, tick: float
    ) -> Iterator[FetchResult | None]:
        """Fetch every item, yielding each result as it completes; None every ``tick``
        seconds without one (the caller reports progress on its own thread). Items not
        started once ``stop`` is set are dropped without a result; so are all left
        when the iterator is closed early."""
        ...

    @property
    def bytes_received(self) -> int:
        """Bytes written so far (all items, all calls): for progress."""
        ...


class _Stopped(Exception):
    """The fetch was stopped before or while this object was fetched."""


class ThreadFetcher:
    """`ObjectFetcher` over one store: ``jobs`` whole-object GETs at once, in threads."""

    def __init__(
        self, store: ObjectStore, jobs: int, planner: Callable[[ObjectInfo], Check]
    ) -> None:
        self.store = store
        self.jobs = max(1, jobs)
        self.planner = planner  # blocking (HEADs for multipart objects)
        self._lock = threading.Lock()
        self._received = 0

    @property
    def bytes_received(self) -> int:
        with self._lock:
            return self._received

    def fetch(
        self, items: Sequence[FetchItem], *, stop: threading.Event, tick: float
    ) -> Iterator[FetchResult | None]:
        halt = threading.Event()  # set when the caller closes the iterator early
        with concurrent.futures.ThreadPoolExecutor(self.jobs, "s3cachefs-fetch") as pool:
            futures = {pool.submit(self._one, item, stop, halt): item for item in items}
            pending = set(futures)
            try:
                while pending:
                    done, pending = concurrent.futures.wait(
                        pending, timeout=tick, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    if not done:
                        yield None
                    for future in done:
                        try:
                            yield future.result()
                        except _Stopped:
                            continue
                        except Exception as exc:  # noqa: BLE001  a result, not a crash
                            yield FetchResult(futures[future], None, error=exc)
            finally:
                halt.set()
                for future in pending:
                    future.cancel()

    def _one(self, item: FetchItem, stop: threading.Event, halt: threading.Event) -> FetchResult:
        if stop.is_set() or halt.is_set():
            raise _Stopped
        info = item.info
        try:
            check = item.check or self.planner(info)
        except Exception as exc:  # noqa: BLE001  reported as the object's result
            return FetchResult(item, None, error=exc)
        digest = Digest(check)
        try:
            with item.path.open("wb") as out:
                pieces = self.store.iter_range(
                    info.key, info.etag, 0, info.size, PIECE, size=info.size
                )
                for piece in pieces:
                    if stop.is_set() or halt.is_set():
                        raise _Stopped
                    digest.update(piece)
                    out.write(piece)
                    with self._lock:
                        self._received += len(piece)
                out.flush()
                os.fsync(out.fileno())
        except _Stopped:
            _remove(item.path)
            raise
        except Exception as exc:  # noqa: BLE001  StoreError, OSError: the object's result
            _remove(item.path)
            return FetchResult(item, check, error=exc)
        matches = digest.matches() if check.kind != "size" else True
        return FetchResult(item, check, digest.result(), matches, digest.fed)


def digest_file(path: Path, check: Check) -> tuple[str, bool, int]:
    """(result, matches, bytes) of a file already written, digested against ``check``."""
    digest = Digest(check)
    with path.open("rb") as f:
        while chunk := f.read(PIECE):
            digest.update(chunk)
    return digest.result(), digest.matches(), digest.fed


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

"""A `sync`'s options (`SyncOptions`) and what it did (`SyncResult`, its ``done`` event).

`require_complete` turns an incomplete result into the project's
`IncompleteError` (the Python API raises it; the CLI lists the failures).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3cachefs.base.errors import ConfigError, IncompleteError
from s3cachefs.datasets.pins import Shard

SIZE_ONLY_SHOWN = 5  # keys named in reports of size-checked-only objects


@dataclass(frozen=True)
class SyncOptions:
    bucket: str
    prefix: str  # the dataset's full key prefix, ending in "/" ("" = the whole bucket)
    dest: Path
    endpoint_url: str | None = None
    shard: Shard | None = None
    delete: bool = False
    dry_run: bool = False
    require_checksums: bool = False
    etag_md5s: bool = True  # False (--etag-md5 off): 32-hex ETags are not taken for MD5s
    wait: bool = False  # another sync writing into DEST: wait for it (else ConfigError)

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass
class SyncResult:
    source: str
    dest: str
    dry_run: bool
    files_total: int = 0
    bytes_total: int = 0
    files_present: int = 0  # verified by an earlier run, unchanged
    fetched: int = 0
    bytes_fetched: int = 0
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # gone from S3 (or the shard), kept in DEST
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    size_only: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # full S3 keys of the dataset (or shard)
    bytes_needed: int = 0
    room: int = 0
    complete: bool = False
    stopped: bool = False
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        if self.dry_run:
            return self.bytes_needed <= self.room
        return self.complete

    def progress(self, received: int, elapsed: float) -> dict[str, Any]:
        """A ``progress`` event (prefetch's terms): ``received`` bytes in ``elapsed`` s."""
        rate = received / elapsed
        left = max(self.bytes_needed - received, 0)
        return {
            "event": "progress",
            "dataset": self.source,
            "files_total": self.files_total,
            "files_done": self.files_present + self.fetched,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_total - self.bytes_needed + min(received, self.bytes_needed),
            "rate": rate,
            "eta": left / rate if rate else None,
            "listing_done": True,
            "failed": len(self.failed),
        }

    def event(self) -> dict[str, Any]:
        """The ``done`` event (``--json``), in the terms of prefetch's."""
        return {
            "event": "done",
            "dataset": self.source,
            "dest": self.dest,
            "ok": self.ok,
            "complete": self.complete,
            "dry_run": self.dry_run,
            "files_total": self.files_total,
            "files_done": self.files_present + self.fetched,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_total - self.bytes_needed + self.bytes_fetched,
            "files_fetched": self.fetched,
            "bytes_fetched": self.bytes_fetched,
            "bytes_needed": self.bytes_needed,
            "room": self.room,
            "fits": self.bytes_needed <= self.room,
            "deleted": self.deleted,
            "kept": len(self.kept),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "failed_objects": dict(sorted(self.failed.items())),
            "size_only": len(self.size_only),
            "size_only_keys": sorted(self.size_only)[:SIZE_ONLY_SHOWN],
            "rate": self.bytes_fetched / self.elapsed if self.elapsed else 0.0,
            "eta": 0,
            "listing_done": True,
            "elapsed": self.elapsed,
        }


def require_complete(result: SyncResult) -> SyncResult:
    """The result, or IncompleteError naming what is missing (for the Python API)."""
    if result.complete:
        return result
    missing = result.files_total - result.files_present - result.fetched
    why = "stopped (timeout)" if result.stopped else f"{len(result.failed)} objects failed"
    raise IncompleteError(
        f"{result.source} is not complete in {result.dest}: {missing} objects missing, {why}",
        result.failed,
    )


def free_space(dest: Path) -> int:
    """Bytes free for this user on DEST's filesystem (DEST may not exist yet)."""
    path = dest
    try:
        while not path.exists():
            path = path.parent
        return shutil.disk_usage(path).free
    except OSError as exc:
        raise ConfigError(f"{dest}: not writable ({exc.strerror or exc})") from None

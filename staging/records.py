"""Staged files and their records: what one file being written is, and how it is kept on disk.

Layout, beside the block cache's objects and on the same filesystem, so that a
finished upload becomes cached data with one rename::

    CACHE_DIR/v1/staging/<id>.json   {"bucket", "key", "created", "state", "error", "upload_id"}
    CACHE_DIR/v1/staging/<id>.data   the bytes written so far

The record is written (atomically) before the first byte and removed last,
after the upload succeeded and the data moved into the cache. So after a crash
every file whose upload did not complete still has its record and its data
(`staging.crashscan` finds them at start).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from s3cachefs.base.errors import NoSpaceError, UploadFailedError
from s3cachefs.cache.blocks import ObjectVersion

WRITING = "writing"  # open by an application in this daemon
UPLOADED = "uploaded"  # on disk = what S3 acknowledged last (a crash now loses nothing)
FAILED = "failed"  # the last upload failed; kept until uploaded or discarded
LEFT_OVER = "left-over"  # found at start: a crash or stop came before the upload completed
SUPERSEDED = "superseded"  # failed or left over, and this key was uploaded again since
UNREADABLE = "unreadable"  # its record is damaged: the key is unknown; discard only


class StagingReadError(Exception):
    """The staged bytes could not be read back for an upload."""


@dataclass
class Staged:
    """One file being written (or left behind), and what its last upload sent."""

    id: str
    bucket: str
    key: str
    path: Path  # the .data file
    created: float
    state: str = WRITING
    error: str = ""
    upload_id: str | None = None  # a multipart upload in progress: aborted on discard
    size: int = 0
    create_only: bool = True  # upload with If-None-Match: * (never replace someone's object)
    dirty: bool = True  # bytes written since the last successful upload (new: empty file)
    etag: str | None = None  # of the last successful upload
    crcs: dict[int, int] = field(default_factory=dict)  # per block, of the bytes uploaded
    fd: int | None = None
    handles: int = 0  # open file handles writing it
    closing: bool = False  # the last handle closed: its upload and caching are under way
    final: ObjectVersion | None = None  # once uploaded and closed: the version readers read
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def record_path(self) -> Path:
        return self.path.with_suffix(".json")

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bucket": self.bucket,
            "key": self.key,
            "state": self.state,
            "size": self.size,
            "created": self.created,
            "error": self.error,
        }

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes written so far (blocking: call in a thread)."""
        if self.fd is not None:
            return os.pread(self.fd, length, offset)
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def read_for_upload(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` staged bytes, or StagingReadError (never a network error)."""
        try:
            data = self.pread(offset, length)
        except OSError as exc:
            raise StagingReadError(f"cannot read the staged data: {exc.strerror}") from None
        if len(data) != length:
            raise StagingReadError("the staged data is shorter than what was written")
        return data


@dataclass(frozen=True)
class Record:
    """What a record on disk says (``state`` as written: the scan at start reinterprets it)."""

    bucket: str
    key: str
    created: float
    state: str
    error: str
    upload_id: str | None  # a multipart upload that may need aborting


def read_record(path: Path) -> Record:
    """A staging record; OSError, ValueError, KeyError or TypeError if it is damaged."""
    meta = json.loads(path.read_text())
    return Record(
        bucket=str(meta["bucket"]),
        key=str(meta["key"]),
        created=float(meta["created"]),
        state=str(meta.get("state")),
        error=str(meta.get("error") or ""),
        upload_id=meta.get("upload_id"),
    )


def save_record(staged: Staged) -> None:
    """Write ``staged``'s record atomically (blocking: call in a thread)."""
    record = {
        "bucket": staged.bucket,
        "key": staged.key,
        "created": staged.created,
        "state": staged.state,
        "error": staged.error,
        "upload_id": staged.upload_id,
        "etag": staged.etag,
    }
    tmp = staged.record_path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, staged.record_path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not also collect empty files
        raise


def disk_error(exc: OSError, key: str) -> Exception:
    """A failed write into the staging dir, as the error the application sees."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{key}: no space left for staging in the cache dir")
    return UploadFailedError(f"{key}: staging write failed: {exc.strerror}")

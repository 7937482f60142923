"""What an earlier daemon left in the staging dir, found at start.

Every file whose upload did not complete still has its record and its data: it
is reported here (one WARNING each) and in ``status``, and only an explicit
``s3cachefs staged --upload`` or ``--discard`` acts on it (`staging.leftfiles`).
Nothing is uploaded behind the user's back: a file a crash left half-written is
not what the application meant to publish. Whatever a finished upload left
behind (a temporary record, data whose record is gone, a record whose data moved
into the cache, a record that says "uploaded") is removed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from s3cachefs.staging.records import (
    FAILED,
    LEFT_OVER,
    SUPERSEDED,
    UNREADABLE,
    UPLOADED,
    Staged,
    read_record,
)

log = logging.getLogger(__name__)


def scan(directory: Path) -> list[Staged]:
    """The staged files left in ``directory`` (made if missing). Blocking; after the cache opens."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for tmp in directory.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    for data in directory.glob("*.data"):
        if not data.with_suffix(".json").exists():  # uploaded; its record already gone
            data.unlink(missing_ok=True)
    found: list[Staged] = []
    for record_path in sorted(directory.glob("*.json")):
        data = record_path.with_suffix(".data")
        try:
            size = data.stat().st_size
        except FileNotFoundError:  # the data moved into the cache; only the record was left
            record_path.unlink(missing_ok=True)
            continue
        try:
            record = read_record(record_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "staging record %s is damaged (%s): `s3cachefs staged` lists it", record_path, exc
            )
            staged = Staged(
                record_path.stem, "?", "?", data, record_path.stat().st_mtime, UNREADABLE
            )
            staged.size, staged.error = size, f"damaged staging record: {exc}"
            found.append(staged)
            continue
        if record.state == UPLOADED:  # S3 acknowledged exactly these bytes: nothing to keep
            log.info("staged copy of s3://%s/%s was uploaded; removed", record.bucket, record.key)
            data.unlink(missing_ok=True)
            record_path.unlink(missing_ok=True)
            continue
        staged = Staged(
            id=record_path.stem,
            bucket=record.bucket,
            key=record.key,
            path=data,
            created=record.created,
            state=record.state if record.state in (FAILED, SUPERSEDED) else LEFT_OVER,
            error=record.error or "the daemon stopped before the upload completed",
            upload_id=record.upload_id,
            size=size,
        )
        found.append(staged)
        log.warning(
            "staged file s3://%s/%s (%d bytes) was never uploaded: %s; "
            "`s3cachefs staged` lists it, --upload or --discard resolves it",
            staged.bucket,
            staged.key,
            size,
            staged.error,
        )
    return found

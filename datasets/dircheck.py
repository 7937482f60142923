"""Whether a fetched file is S3's object, end to end (`verdict`), for `sync`.

The rules of `datasets.objectcheck` (prefetch), on a file instead of cached
blocks: the bytes were digested while they passed against the check
`store.checkplan` planned; if they do not match, the same bytes are checked
the other way S3 offers, if any (a guessed part layout asked part by part; a
32-hex ETag that may not be an MD5, asked for S3's additional checksum), by
re-reading the file, with no GET. Otherwise the caller fetches the object
once more with the check the verdict names, then fails it. Size-checked only
when S3 gives nothing to check against; refused with ``require_checksums``.
Some errors fail every object alike (access refused, a full disk): `fatal`
ends the run with them.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from s3cachefs.base.errors import (
    AccessDeniedError,
    ConfigError,
    NoSuchBucketError,
    NotEnoughSpaceError,
)
from s3cachefs.base.values import human_bytes
from s3cachefs.datasets.dirfetch import FetchResult, digest_file
from s3cachefs.datasets.dirresult import free_space
from s3cachefs.store import checkplan, checksums
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo, ObjectStore

# Errors no other object would escape: the run stops with one line (`fatal`).
_FATAL = (AccessDeniedError, NoSuchBucketError)
_FATAL_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class Verdict:
    check: Check  # the check passed, or the one to fetch the object again with
    reason: str | None = None  # None: the file is S3's object
    final: bool = False  # a failure another fetch cannot change


def verdict(
    store: ObjectStore, res: FetchResult, *, etag_md5s: bool, require_checksums: bool
) -> Verdict:
    """The verdict on a fetched file (blocking: may HEAD; StoreError). ``res`` has no error."""
    info, check = res.item.info, res.check
    assert check is not None and res.error is None
    if res.written != info.size:
        return Verdict(check, f"got {res.written} bytes, not {info.size}")
    if check.kind != "size" and not res.matches:
        other = _other_check(store, info, check, etag_md5s=etag_md5s)
        matches = False
        if other is not None:  # the same bytes, checked the other way S3 offers
            digest, matches, _ = digest_file(res.item.path, other)
            check = checksums.resolved(other, digest) if matches else other
        if not matches and check.kind != "size":
            return Verdict(check, f"content does not match {check.describe()} in S3")
    else:
        check = checksums.resolved(check, res.digest)
    if check.kind == "size" and require_checksums:
        reason = "S3 gives nothing to verify it end to end against (--require-checksums)"
        return Verdict(check, reason, final=True)
    return Verdict(check)


def _other_check(
    store: ObjectStore, info: ObjectInfo, check: Check, *, etag_md5s: bool
) -> Check | None:
    """Another check S3 offers for the same bytes (`datasets.objectcheck`'s order)."""
    if check.guessed:  # equal parts assumed: ask S3 for every part's size
        return checkplan.confirmed(store, info, check)
    if check.kind == "md5":  # a 32-hex ETag need not be an MD5 (SSE-KMS)
        other = checkplan.plan(store, info, ask_s3=True, etag_md5s=etag_md5s)
        return None if other == check else other
    return None


def fatal(exc: BaseException | None, dest: Path, info: ObjectInfo) -> None:
    """Raise what no other object would escape either: access refused, a full disk."""
    if isinstance(exc, _FATAL):
        raise exc
    if isinstance(exc, OSError) and exc.errno in _FATAL_ERRNO:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = free_space(dest)
            raise NotEnoughSpaceError(
                f"{dest}: disk full while writing {info.key} ({human_bytes(free)} free)",
                needed=info.size,
                available=free,
            ) from None
        raise ConfigError(f"{dest}: cannot write ({exc.strerror})") from None

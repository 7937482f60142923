"""One bulk job: a checked ranged GET of one object version ``pwrite``n into its cache file.

A `Job` is bytes ``[start, end)`` of one object version, written with ``pwrite``
at the same offsets into the file the cache will own. While the bytes pass,
each block's CRC32 is computed from the very buffer that is written and, for a
job that covers a whole object, the end-to-end digest its `Check` asks for
(hashlib and the CRC release the GIL on large buffers). A `Done` carries the
CRCs, the digest and the inode written back.

The response is checked before a byte is used (`store.responses`), GETs carry
``If-Match``, and a failed attempt starts the job again from its first byte
(the digest must see every byte once, in order), under the store's one retry
policy (`store.retry`). A whole single-part object whose body is not its MD5
ETag is such a failed attempt; a job that fails answers an error, never CRCs;
one whose credentials expired meanwhile is the daemon's to run (`EXPIRED`).

No trio, no index, no pin: `cache.bulkworker` runs these in its threads.
"""

from __future__ import annotations

import http.client
import os
import re
import time
from dataclasses import dataclass, field

from s3cachefs.base.errors import BadResponseError, StaleError, StoreError, TransientError
from s3cachefs.cache.bulkconn import GetConnection, Response
from s3cachefs.cache.bulkhttp import SINGLE_HEADERS
from s3cachefs.store.bodies import Md5Mismatch
from s3cachefs.store.checksums import Check, Digest
from s3cachefs.store.crc import crc32
from s3cachefs.store.errorcodes import error_for_code
from s3cachefs.store.responses import body_md5, check_get_response

_CODE = re.compile(rb"<Code>([^<]+)</Code>")
# Credentials expired since the daemon sent them: its refreshing chain runs the job.
EXPIRED_CODES = frozenset({"ExpiredToken", "InvalidToken", "TokenRefreshRequired"})
EXPIRED = "ExpiredCredentials"  # the error_kind of such a job


@dataclass(frozen=True)
class Job:
    oid: str
    key: str
    etag: str
    size: int  # of the object version
    start: int  # block-aligned
    end: int
    path: str  # the file to pwrite into (created, sized to ``size``, if missing)
    check: Check | None = None  # the digest to compute: only for a job of the whole object


@dataclass
class Done:
    oid: str
    start: int
    end: int
    crcs: list[int] = field(default_factory=list)  # one per block, from the bytes written
    digest: str = ""  # `Digest.result()` in the check's terms ("" if none asked)
    matches: bool = False  # the digest is the check's value
    error: str = ""  # "" on success; else the message
    error_kind: str = ""  # the StoreError class of ``error`` ("" on success)
    inode: int = 0  # the file the bytes went into (the daemon checks it is still the object's)
    seconds: float = 0.0  # wall time of the job in its thread
    attempts: int = 1
    lost: bool = False  # set by the daemon: the worker died before answering


class _DiskError(Exception):
    """The cache file could not be written (not S3's fault: not retried here)."""


class _Expired(StoreError):
    """S3: the credentials this job was signed with expired (not retried here)."""


def open_target(path: str, size: int) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)  # sparse, full length: a complete file is the object
    return fd


def _attempt(conn: GetConnection, job: Job, block_size: int, buf: memoryview, done: Done) -> None:
    what = f"s3://{job.key} bytes {job.start}-{job.end}"
    response = conn.get(job.key, job.etag, job.start, job.end)
    try:
        if response.status not in (200, 206):
            match = _CODE.search(response.read())
            code = match.group(1).decode() if match else str(response.status)
            if code in EXPIRED_CODES:
                raise _Expired(f"{what}: {code}")
            error = error_for_code(code, what)
            if conn.retry.retryable_status(response.status):
                error = TransientError(f"{what}: status {response.status}")
            raise error
        headers = _fields(response, what)
        check_get_response(
            response.status, headers, job.start, job.end, job.size, job.etag, what=what
        )
        digest = Digest(job.check) if job.check is not None else None
        try:
            fd = open_target(job.path, job.size)
        except OSError as exc:
            raise _DiskError(exc) from None
        try:
            done.inode = os.fstat(fd).st_ino
            _write_body(response, fd, job, block_size, buf, done, digest, what)
        finally:
            os.close(fd)
        if digest is not None:
            done.digest, done.matches = digest.result(), digest.matches()
            # A whole single-part object whose ETag is its MD5 (not SSE-KMS/SSE-C): a body
            # that is not it is a failed attempt, as on the in-daemon path (`read_verified`).
            md5 = job.check is not None and job.check.kind == "md5"
            if md5 and not done.matches and body_md5(headers, job.etag) is not None:
                raise Md5Mismatch(what, done.digest)
    except BaseException:
        conn.close()  # mid-body: the connection cannot be reused
        raise


def _fields(response: Response, what: str) -> dict[str, str]:
    """The headers by lowercase name, as checked: one value each of those the framing and
    the checks read (http.client would frame by the first, a dict keeps the last)."""
    fields: dict[str, str] = {}
    for name, value in response.getheaders():
        key = name.lower()
        if key in fields and key in SINGLE_HEADERS:
            raise BadResponseError(what, "duplicate_header", f"S3 server sent {name} twice")
        fields[key] = value
    return fields


def _write_body(
    response: Response,
    fd: int,
    job: Job,
    block_size: int,
    buf: memoryview,
    done: Done,
    digest: Digest | None,
    what: str,
) -> None:
    """The body into ``fd`` block by block; each block's CRC (and the digest) from the buffer
    written."""
    pos = job.start
    while pos < job.end:
        want = min(block_size, job.end - pos)
        view = buf[:want]
        got = 0
        while got < want:
            n = response.readinto(view[got:])
            if not n:
                raise TransientError(f"{what}: body ended early at byte {pos + got}")
            got += n
        try:
            written = os.pwrite(fd, view, pos)
        except OSError as exc:
            raise _DiskError(exc) from None
        if written != want:  # e.g. ENOSPC part-way: not all of the block is on disk
            raise _DiskError(f"short write: {written} of {want} bytes at {pos}")
        done.crcs.append(crc32(view))
        if digest is not None:
            digest.update(view)  # type: ignore[arg-type]  # a memoryview is fine
        pos += want


def fetch(conn: GetConnection, job: Job, block_size: int, buf: memoryview) -> Done:
    """One job, retried from its first byte on transient errors. Blocking; never raises.

    A job whose MD5 did not match is a failed attempt; the same wrong digest twice
    (the server's ETag is not the MD5 of its bytes) or no attempt left: an error,
    never a result whose bytes the daemon would index.
    """
    start = time.perf_counter()
    done = Done(job.oid, job.start, job.end)
    mismatched: str | None = None  # the digest of the last body that failed its MD5
    for attempt in range(1, conn.retry.max_attempts + 1):
        done.crcs.clear()
        done.digest, done.matches = "", False
        done.attempts = attempt
        try:
            _attempt(conn, job, block_size, buf, done)
            done.error = done.error_kind = ""
            break
        except _DiskError as exc:  # the cache's disk, not S3: the daemon decides
            done.error, done.error_kind = f"cache write failed: {exc.args[0]}", "DiskError"
            break
        except (OSError, http.client.HTTPException) as exc:
            done.error, done.error_kind = f"{job.key}: network error: {exc}", "TransientError"
        except Md5Mismatch as exc:
            if exc.digest == mismatched:
                done.error, done.error_kind = _not_md5(job), "StoreError"
                break
            mismatched = exc.digest
            done.error, done.error_kind = str(exc), BadResponseError.__name__
        except StoreError as exc:  # _Expired: the daemon runs it with fresh credentials
            kind = EXPIRED if isinstance(exc, _Expired) else type(exc).__name__
            done.error, done.error_kind = str(exc), kind
            if not conn.retry.retryable(exc):  # stale, denied, missing: another try is the same
                break
        except Exception as exc:  # noqa: BLE001  # a bug must fail the job, not the thread
            conn.close()
            done.error, done.error_kind = f"{job.key}: bulk worker error: {exc!r}", "StoreError"
            break
        if conn.retry.again(attempt):
            conn.retry.wait(attempt)
    if done.error:
        done.crcs.clear()
        done.digest, done.matches = "", False
    done.seconds = time.perf_counter() - start
    return done


def _not_md5(job: Job) -> str:
    return (
        f"S3 server's ETag for s3://{job.key} is not the MD5 of its bytes (the same bytes "
        "twice): if this server's ETags are not MD5s, mount with --etag-md5 off; until "
        "then such objects fail with EIO"
    )


def error_of(done: Done) -> StoreError:
    """The StoreError a failed `Done` stands for (the class, by name, where it matters)."""
    if done.error_kind == "StaleError":
        return StaleError(done.error)
    cls = TransientError if done.lost or "Transient" in done.error_kind else StoreError
    if done.error_kind in ("BadResponseError", "TransientError"):
        cls = TransientError
    return cls(done.error)

"""Which check S3 offers for one object version: `plan` (and `confirmed`).

The kinds of check are `store.checksums.Check`'s (see that module). Asking S3
costs requests: an MD5 ETag is taken as it is, an additional checksum needs a
HEAD with ``ChecksumMode=ENABLED``, and a composite checksum or a multipart
ETag needs the part layout (``HEAD ?partNumber=N``).

A single-part object with an MD5 ETag is checked by MD5 even when it also has
an additional checksum: both are S3's digest of the stored bytes, and MD5 costs
no HEAD per object (datasets of many small files). Should the MD5 check fail,
the object is asked for an additional checksum (SSE-KMS ETags look like MD5s
but are not). Without one, it is size-checked only when S3 says the ETag is no
MD5 (SSE-KMS, SSE-C) or the mount has ``--etag-md5 off``; otherwise it fails
(a server or proxy that corrupts the same way every time looks just the same).

What moto 5.2 (the test server) supports, found by experiment (with awscrt):
PutObject/UploadPart with ChecksumAlgorithm CRC32, CRC32C, SHA1, SHA256,
CRC64NVME: stored as the client sent them (not re-checked). CreateMultipartUpload
ChecksumType FULL_OBJECT and COMPOSITE: both, computed by moto at completion;
but moto computes CRC32C with the optional ``crc32c`` package and otherwise
stores a plain CRC32 labelled CRC32C (wrong), and CRC64NVME only with awscrt.
HEAD/GET with ChecksumMode=ENABLED: x-amz-checksum-<algo> on both;
x-amz-checksum-type on GET, and on HEAD only for uploads that declared a type;
a composite value has its ``-N`` suffix on GET but not on HEAD. HEAD with
PartNumber: the part's Content-Length and x-amz-mp-parts-count (its ETag is the
part's, unlike AWS, so If-Match cannot be combined with it).
GetObjectAttributes: Checksum yes, ObjectParts no. A multipart upload that
declared no algorithm has no checksum at all.
"""

from __future__ import annotations

import re
from dataclasses import replace

from s3cachefs.base.errors import (
    AccessDeniedError,
    CredentialsError,
    NotFoundError,
    StaleError,
    StoreError,
    TransientError,
)
from s3cachefs.store.checksums import Check
from s3cachefs.store.responses import etag_md5
from s3cachefs.store.types import ChecksumHead, ObjectInfo, ObjectStore

_MULTIPART_ETAG = re.compile(r'^"?([0-9a-f]{32})-([0-9]+)"?$')


def multipart_parts(etag: str) -> int | None:
    """The part count of a multipart ETag (``"<md5 of part md5s>-N"``), else None."""
    match = _MULTIPART_ETAG.match(etag)
    return int(match.group(2)) if match else None


def plan(
    store: ObjectStore, info: ObjectInfo, *, ask_s3: bool = False, etag_md5s: bool = True
) -> Check:
    """The best check S3 offers for this object version (blocking: HEADs; StoreError).

    Without ``ask_s3`` an MD5 ETag is taken as it is (no request). With it (an MD5
    check that failed, or ``--etag-md5 off``), S3's additional checksum comes first;
    then a 32-hex ETag is still an MD5 unless S3 says it is not (SSE-KMS, SSE-C) or
    ``etag_md5s`` is False (``--etag-md5 off``); else the object is size-checked only.
    """
    md5 = etag_md5(info.etag)
    if md5 is not None and not ask_s3:
        return Check("md5", md5)
    head = _checksum_head(store, info)
    count = multipart_parts(info.etag)
    if head is not None and head.algorithm and head.value:
        check = _by_checksum(store, info, head.algorithm, head.value, head.checksum_type)
        if check is not None:
            return check
    if count is not None:
        layout = part_layout(store, info, count)
        if layout is not None:
            return Check("mpu-etag", info.etag.strip('"'), *layout)
    if md5 is not None and etag_md5s and not (head is not None and head.etag_not_md5):
        return Check("md5", md5)  # S3 does not say otherwise: the MD5 it is
    return Check("size")


def _by_checksum(
    store: ObjectStore, info: ObjectInfo, algorithm: str, value: str, checksum_type: str | None
) -> Check | None:
    """The check by S3's additional checksum; None if a composite one has no part layout."""
    value, _, suffix = value.partition("-")
    count = multipart_parts(info.etag)
    composite = checksum_type == "COMPOSITE" or (checksum_type is None and bool(suffix))
    # A multipart object's checksum of unknown type (S3 has no composite CRC64NVME).
    either = checksum_type is None and not suffix and count is not None
    either = either and algorithm != "crc64nvme"
    if not composite and not either:
        return Check(f"{algorithm}-full", value)
    layout = part_layout(store, info, int(suffix) if suffix.isdigit() else count)
    if layout is not None:
        return Check(f"{algorithm}-{'either' if either else 'composite'}", value, *layout)
    return Check(f"{algorithm}-full", value) if either else None  # no layout: full it can be


def _checksum_head(store: ObjectStore, info: ObjectInfo) -> ChecksumHead | None:
    """S3's additional checksum (`StaleError` if the object changed); None if refused.

    A server without checksums may refuse the ChecksumMode header itself
    (Backblaze B2: 400 InvalidArgument): the object has none, the ETag may still do.
    """
    try:
        return store.head_checksum(info.key, info.etag)
    except (TransientError, NotFoundError, AccessDeniedError, StaleError):
        raise
    except StoreError:
        return None


def part_layout(
    store: ObjectStore, info: ObjectInfo, count: int | None
) -> tuple[tuple[int, ...], bool] | None:
    """(part sizes, guessed) from ``HEAD ?partNumber=1``; None if the server does not say.

    Guessed: every part the size of the first but the last, which holds the rest.
    When that cannot add up, every part is asked (`exact_layout`).
    """
    first = _part(store, info.key, 1)
    if first is None:
        return None
    size, total = first
    if count is not None and total != count:
        return None  # the server's part count is not the ETag's: not this layout
    last = info.size - size * (total - 1)
    if total == 1:
        return ((info.size,), False) if size == info.size else None
    if 0 < last <= size:
        return (size,) * (total - 1) + (last,), True
    exact = exact_layout(store, info, total)
    return None if exact is None else (exact, False)


def exact_layout(store: ObjectStore, info: ObjectInfo, count: int) -> tuple[int, ...] | None:
    """Every part's size, one ``HEAD ?partNumber=N`` each; None if they do not add up."""
    sizes = []
    for number in range(1, count + 1):
        part = _part(store, info.key, number)
        if part is None:
            return None
        sizes.append(part[0])
    return tuple(sizes) if sum(sizes) == info.size else None


def confirmed(store: ObjectStore, info: ObjectInfo, check: Check) -> Check:
    """A guessed layout asked part by part: the check with the layout S3 gives.

    The guess stands (no longer marked guessed) when S3 does not say otherwise.
    """
    exact = exact_layout(store, info, len(check.parts)) if check.guessed else None
    return replace(check, parts=exact or check.parts, guessed=False)


def _part(store: ObjectStore, key: str, number: int) -> tuple[int, int] | None:
    """(size, part count) of one part; None when the server does not do part HEADs."""
    try:
        part = store.head_part(key, number)
    except (TransientError, NotFoundError, CredentialsError):
        raise
    except StoreError:  # e.g. 400/501 from a server without partNumber, 416 past the last
        return None
    if part.parts_count is None:  # the server ignored partNumber: the whole object's HEAD
        return None
    return part.size, part.parts_count

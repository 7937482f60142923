"""What a GET response must be before one byte of it is used.

S3-compatible servers and the proxies in front of them lie: some answer a
ranged GET with 200 and the whole object, some send fewer bytes than asked
(with headers that agree), some ignore If-Match (``rclone serve s3`` 1.75), so
the object may have changed under the request. Both GET paths of the store
(the lean `store.rangeget` and botocore's ``get_object``) pass every
response through `check_get_response` before reading its body; a body that
covers a whole single-part object is also checked against its MD5 ETag
(`body_md5`) before any of it is handed on.

A response that is not what was asked for is a `BadResponseError` (retried
within the attempt budget, never cached); one from another version of the
object is a `StaleError` (ESTALE), carrying the ETag the server sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from s3cachefs.base.errors import BadResponseError, StaleError

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$", re.ASCII)
_DIGITS = re.compile(r"[0-9]+")  # not str.isdigit(): "\u00b9" is one, and int() refuses it
_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')
# With these, S3's ETag of a single-part object is not the MD5 of its content.
NOT_MD5_ENCRYPTION = {"aws:kms", "aws:kms:dsse"}
_SSE_C = "x-amz-server-side-encryption-customer-algorithm"


def etag_md5(etag: str) -> str | None:
    """The object's MD5 when the ETag is one (a single-part upload: 32 hex, no "-N")."""
    match = _MD5_ETAG.match(etag)
    return match.group(1) if match else None


def same_etag(a: str, b: str) -> bool:
    """ETags compare by value: quoting (and a weak ``W/`` prefix) varies between servers."""
    return _bare(a) == _bare(b)


def _bare(etag: str) -> str:
    return etag.strip().removeprefix("W/").strip('"')


def check_get_response(
    status: int,
    headers: Mapping[str, str],
    start: int,
    end: int,
    size: int,
    etag: str,
    *,
    what: str,
) -> None:
    """Raise unless this is the answer to ``GET bytes [start, end)`` of version ``etag``.

    ``size`` is the version's size. A 206 must carry ``Content-Range: bytes
    start-(end-1)/size``; a 200 is accepted only for a request that covers the
    whole object. ``Content-Length`` must be the range's length, and the ETag
    header the version asked for (`StaleError` if it is another one).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    if status not in (200, 206):
        raise BadResponseError(what, "status", f"S3 server answered a GET with status {status}")
    sent_etag = lower.get("etag")
    if not sent_etag:
        raise BadResponseError(what, "no_etag", "S3 server sent no ETag header with a GET")
    if not same_etag(sent_etag, etag):
        raise StaleError(
            f"{what}: changed in S3 since it was opened (GET answered ETag {sent_etag}, "
            f"opened {etag})",
            current_etag=sent_etag,
        )
    if status == 200:
        if start != 0 or end != size:
            raise BadResponseError(
                what,
                "ignored_range",
                "S3 server ignored Range (answered 200 with the whole object)",
            )
    else:
        _check_content_range(lower.get("content-range", ""), start, end, size, what)
    length = lower.get("content-length")
    if length is None or not _DIGITS.fullmatch(length) or int(length) != end - start:
        raise BadResponseError(
            what,
            "bad_length",
            f"S3 server sent Content-Length {length} for a range of {end - start} bytes",
        )


def _check_content_range(value: str, start: int, end: int, size: int, what: str) -> None:
    asked = f"bytes {start}-{end - 1}/{size}"
    match = _CONTENT_RANGE.match(value.strip())
    if match is None:
        raise BadResponseError(
            what, "bad_content_range", f"S3 server sent Content-Range {value!r} for {asked}"
        )
    first, last, total = (int(g) for g in match.groups())
    if total != size:
        raise BadResponseError(
            what,
            "size_mismatch",
            f"S3 server says the object has {total} bytes, the version opened has {size}",
        )
    if first == start and last < end - 1:
        raise BadResponseError(
            what,
            "short_range",
            f"S3 server answered a shorter range than asked ({value.strip()} for {asked})",
        )
    if first != start or last != end - 1:
        raise BadResponseError(
            what,
            "wrong_range",
            f"S3 server answered another range than asked ({value.strip()} for {asked})",
        )


def body_md5(headers: Mapping[str, str], etag: str) -> str | None:
    """The MD5 a whole-object body must have, or None when its ETag is not one.

    Multipart ETags ("-N") are not; nor are the ETags S3 gives objects encrypted
    with SSE-KMS or SSE-C, which a GET response says in its headers.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    if lower.get("x-amz-server-side-encryption") in NOT_MD5_ENCRYPTION or _SSE_C in lower:
        return None
    return etag_md5(etag)

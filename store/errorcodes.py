"""The S3 error codes by the error they become (`error_for_code`): one table for every GET path.

No botocore and no urllib3 here: the bulk worker process (`cache.bulkworker`)
maps the codes of its own GETs with it and must start without either
(`store.errortable` translates botocore's and urllib3's exceptions).
"""

from __future__ import annotations

from s3cachefs.base.errors import (
    AccessDeniedError,
    NoSuchBucketError,
    NotFoundError,
    StaleError,
    StoreError,
    TransientError,
)

# S3 error codes, by the error they become. Anything else is a StoreError.
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}
_STALE = {"PreconditionFailed", "412"}
_TRANSIENT = {
    "SlowDown",
    "503",
    "500",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "502",
    "504",
}


def error_for_code(code: str, what: str) -> StoreError:
    """The error an S3 error code (or bare HTTP status) becomes."""
    if code in _NO_BUCKET:
        return NoSuchBucketError(f"{what}: no such bucket")
    if code in _NOT_FOUND:
        return NotFoundError(f"{what}: not found")
    if code in _DENIED:
        return AccessDeniedError(f"{what}: access denied ({code})")
    if code in _STALE:
        return StaleError(f"{what}: changed in S3 since it was opened")
    if code in _TRANSIENT:
        return TransientError(f"{what}: S3 unavailable ({code}) after retries")
    return StoreError(f"{what}: S3 error {code}")

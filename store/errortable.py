"""The one place botocore's and urllib3's errors become ours (`s3cachefs.base.errors`).

The context managers that translate what a request raised: `translated` for
every request, `refusals` and `created` for writes. The S3 error codes by the
error they become are `store.errorcodes` (`error_for_code`, re-exported here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import botocore.exceptions
import urllib3

from s3cachefs.base.errors import (
    AlreadyExistsError,
    ChecksumsRefusedError,
    CredentialsError,
    StaleError,
    StoreError,
    TransientError,
)
from s3cachefs.store.errorcodes import error_for_code
from s3cachefs.store.uploadchecksums import REFUSAL_CODES

__all__ = ["created", "error_for_code", "refusals", "translated"]

_NETWORK_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    urllib3.exceptions.HTTPError,  # the lean GET path (`store.rangeget`)
)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn botocore's errors into ours; ``what`` names the object for the message."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        error = error_for_code(code, what)
        if isinstance(error, StaleError):  # the current ETag, if the server said it
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            error.current_etag = headers.get("etag")
        raise error from None
    except botocore.exceptions.NoCredentialsError:
        raise CredentialsError(
            "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "--profile, or an instance role)"
        ) from None
    except botocore.exceptions.ProfileNotFound as exc:
        raise CredentialsError(str(exc)) from None
    except _NETWORK_ERRORS as exc:
        raise TransientError(f"{what}: network error: {type(exc).__name__}") from None
    except botocore.exceptions.BotoCoreError as exc:  # e.g. a checksum that did not match
        raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def refusals(what: str, with_checksums: bool) -> Iterator[None]:
    """A request with checksums refused as invalid: perhaps for them (`store.uploadchecksums`).

    Innermost, so that it sees botocore's error before `translated` does.
    """
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if not with_checksums or code not in REFUSAL_CODES:
            raise
        message = str(error.get("Message") or "")[:200]  # the server's words: which header
        said = f": {message}" if message else ""
        raise ChecksumsRefusedError(f"{what}: {code}{said}") from None


@contextlib.contextmanager
def created(what: str) -> Iterator[None]:
    """A 412 on a create-only write means the key exists, not that a read went stale."""
    try:
        yield
    except StaleError:
        raise AlreadyExistsError(f"{what}: already exists in S3") from None

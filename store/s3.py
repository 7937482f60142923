"""`S3Store`: the `ObjectStore` over one boto3 client and the lean GET path.

Here: the client and its configuration, request counting, the choice of GET
path (`store.rangeget` unless a proxy applies), listings, HEADs and ranged GETs
with their response checks and resumption. Writes are `store.s3writes`; bodies
are read by `store.bodies`; every retry follows `store.retry`.

All methods are blocking; the daemon calls them from worker threads under the
S3 capacity limiter. botocore errors never leave the store: every request runs
inside `errortable.translated`, which makes them the errors of `s3cachefs.base.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
from botocore.httpsession import DEFAULT_CA_BUNDLE

from s3cachefs.base.errors import (
    BadResponseError,
    CredentialsError,
    NoSuchBucketError,
    NotFoundError,
    StoreError,
)
from s3cachefs.store import checksums
from s3cachefs.store.bodies import Md5Mismatch, read_pieces, release
from s3cachefs.store.errortable import translated
from s3cachefs.store.listing import S3Listings
from s3cachefs.store.rangeget import RangeGetter, proxy_applies
from s3cachefs.store.responses import NOT_MD5_ENCRYPTION, body_md5, check_get_response
from s3cachefs.store.retry import RetryPolicy
from s3cachefs.store.s3writes import S3Writes
from s3cachefs.store.types import ChecksumHead, ObjectInfo, PartHead
from s3cachefs.store.uploadchecksums import ChecksumSupport

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from s3cachefs.base.config import MountConfig

log = logging.getLogger(__name__)

# The start-up check of the bucket, whatever the policy (3 requests in all): a typo'd
# endpoint fails fast, not after seconds.
PROBE_ATTEMPTS = 3


class S3Store(S3Writes, S3Listings):
    """`ObjectStore` over one shared boto3 client (thread-safe by botocore's design)."""

    def __init__(self, config: MountConfig) -> None:
        self._bucket = config.bucket
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        # Called after every request with (operation, outcome, seconds): metrics.
        self.observer: Callable[[str, str, float], None] | None = None
        self._retry = RetryPolicy.from_config(config)  # the body loop, the lean GET, botocore
        self._config = config
        self._getter: RangeGetter | None = None  # set by check_bucket, once the region is known
        self._warned: set[str] = set()  # server behaviours already logged loudly (once each)
        self._etag_md5s = config.etag_md5s  # --etag-md5 auto: whole-object GETs check the MD5
        # A whole listing (every page of one directory) may take this long at most.
        self.listing_budget = config.s3_timeout * self._retry.max_attempts
        try:
            self._core_session = botocore.session.Session(profile=config.profile)
            session = boto3.session.Session(botocore_session=self._core_session)
        except botocore.exceptions.ProfileNotFound as exc:
            raise CredentialsError(str(exc)) from None
        client_config = botocore.config.Config(
            region_name=config.region or session.region_name or "us-east-1",
            max_pool_connections=config.s3_concurrency,
            connect_timeout=min(10.0, config.s3_timeout),
            read_timeout=config.s3_timeout,
            # Path style works with every S3-compatible server (MinIO, Ceph, moto).
            s3={"addressing_style": "path"} if config.endpoint_url else None,
            # Uploads carry the checksums chosen here and no others: by default botocore
            # adds a CRC32 to a PUT sent without one (an aws-chunked trailer over HTTPS),
            # which a server that refuses checksums refuses again (`store.uploadchecksums`).
            request_checksum_calculation="when_required",
            # Nor does get_object ask for them (x-amz-checksum-mode: ENABLED by default),
            # which some servers refuse (Backblaze B2); HEADs that want them say so.
            response_checksum_validation="when_required",
        ).merge(self._retry.botocore_config())  # throttling, 5xx, network: `store.retry`
        self._client: S3Client = session.client(
            "s3", endpoint_url=config.endpoint_url, config=client_config
        )
        self._session = session
        self._checksums = ChecksumSupport(config.bucket)  # what the server does with them
        self._probe: S3Client = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            config=client_config.merge(RetryPolicy(PROBE_ATTEMPTS).botocore_config()),
        )

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def requests(self) -> Counter[str]:
        return self._requests

    def request_counts(self) -> Counter[str]:
        # The first request of a new kind adds a key: a copy racing it, unlocked, could
        # fail with "dictionary changed size during iteration".
        with self._lock:
            return self._requests.copy()

    def _count(self, op: str) -> None:
        with self._lock:
            self._requests[op] += 1

    @contextlib.contextmanager
    def _request(self, op: str, what: str) -> Iterator[None]:
        """Count, translate errors, and report (op, outcome, seconds) to ``observer``."""
        self._count(op)
        start = time.monotonic()
        outcome = "ok"
        try:
            with translated(what):
                yield
        except StoreError as exc:
            outcome = type(exc).__name__.removesuffix("Error").lower()
            raise
        finally:
            if self.observer is not None:
                self.observer(op, outcome, time.monotonic() - start)

    def check_bucket(self) -> None:
        try:
            with self._request("head_bucket", f"s3://{self._bucket}"):
                resp = self._probe.head_bucket(Bucket=self._bucket)
        except NotFoundError:  # HEAD has no body: S3 says only "404"
            raise NoSuchBucketError(f"s3://{self._bucket}: no such bucket") from None
        headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        self._getter = self._range_getter(headers.get("x-amz-bucket-region"))

    @property
    def range_getter(self) -> RangeGetter | None:
        """The lean GET path, once the bucket was checked (None: botocore GETs)."""
        return self._getter

    def _range_getter(self, bucket_region: str | None) -> RangeGetter | None:
        """The lean GET path, addressed and signed exactly as botocore would."""
        client = self._client
        region = bucket_region or client.meta.region_name
        if (
            bucket_region
            and bucket_region != client.meta.region_name
            and not self._config.endpoint_url
        ):
            client = self._session.client("s3", region_name=bucket_region)
        # A presigned URL is botocore's endpoint resolution (region, virtual host or path
        # style, FIPS, custom endpoints) for this bucket, without sending anything.
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": "k"}, ExpiresIn=60
        )
        base = urllib.parse.urlsplit(url)._replace(query="").geturl().removesuffix("k")
        if proxy_applies(base):
            return None
        config = self._config
        return RangeGetter(
            base_url=base,
            region=region,
            credentials=self._session.get_credentials(),
            ca_bundle=self._core_session.get_config_variable("ca_bundle") or DEFAULT_CA_BUNDLE,
            max_connections=config.s3_concurrency,
            connect_timeout=min(10.0, config.s3_timeout),
            read_timeout=config.s3_timeout,
            retry=self._retry,
        )

    def _first(self, behaviour: str) -> bool:
        """Whether this is the first time this store sees ``behaviour`` (then it logs loudly)."""
        with self._lock:
            first = behaviour not in self._warned
            self._warned.add(behaviour)
        return first

    def head(self, key: str) -> ObjectInfo:
        with self._request("head", f"s3://{self._bucket}/{key}"):
            resp = self._client.head_object(Bucket=self._bucket, Key=key)
        return ObjectInfo(
            key=key,
            size=resp["ContentLength"],
            etag=resp["ETag"],
            mtime_ns=int(resp["LastModified"].timestamp() * 1e9),
        )

    def head_checksum(self, key: str, etag: str) -> ChecksumHead:
        with self._request("head", f"s3://{self._bucket}/{key}"):
            resp = self._client.head_object(
                Bucket=self._bucket, Key=key, IfMatch=etag, ChecksumMode="ENABLED"
            )
        return checksum_head(resp)

    def head_part(self, key: str, number: int) -> PartHead:
        # No If-Match: moto answers a part HEAD with the part's ETag (AWS: the object's).
        with self._request("head", f"s3://{self._bucket}/{key} part {number}"):
            resp = self._client.head_object(Bucket=self._bucket, Key=key, PartNumber=number)
        count = resp.get("PartsCount")
        return PartHead(resp["ContentLength"], None if count is None else int(count))

    def iter_range(
        self,
        key: str,
        etag: str,
        start: int,
        end: int,
        chunk: int,
        first: int = 0,
        *,
        size: int,
    ) -> Iterator[bytes]:
        what = f"s3://{self._bucket}/{key}"
        pos = start
        attempt = 0
        mismatched: str | None = None  # the digest of a whole body that failed its MD5
        # A failed request is retried inside the request (botocore's retries, or the lean
        # path's); a response that is not what was asked for, or a body cut half-way, is
        # ours: retried from the first piece not yet delivered. One policy: `store.retry`.
        while pos < end:
            body: Any = None
            whole = False
            try:
                with self._request("get", what):  # the latency observed: time to headers
                    status, headers, body = self._open(key, etag, pos, end, what)
                    check_get_response(status, headers, pos, end, size, etag, what=what)
                # --etag-md5 off: a whole object is checked as a range is (status, length, ETag)
                whole_object = self._etag_md5s and pos == 0 and end == size
                md5 = body_md5(headers, etag) if whole_object else None
                with translated(what):
                    for piece in read_pieces(body, start, pos, end, chunk, first, md5, what):
                        pos += len(piece)
                        yield piece
                whole = True
            except StoreError as exc:
                # Not the request itself, which failed after its own retries.
                if body is None or not self._retry.retryable(exc):
                    raise
                attempt += 1
                mismatched = self._same_bytes_again(exc, mismatched, what)
                if isinstance(exc, BadResponseError):
                    self._bad_response(exc, retrying=self._retry.again(attempt))
                if not self._retry.again(attempt):
                    raise
                self._retry.wait(attempt)
            finally:
                if body is not None:
                    release(body, whole)

    def _open(self, key: str, etag: str, start: int, end: int, what: str) -> tuple[int, Any, Any]:
        """(status, headers, streaming body) of ``GET key`` for bytes [start, end)."""
        if self._getter is not None:
            response = self._getter.open(key, etag, start, end, what)
            return response.status, response.headers, response
        resp = self._client.get_object(
            Bucket=self._bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
        )
        meta = resp["ResponseMetadata"]
        return meta["HTTPStatusCode"], meta["HTTPHeaders"], resp["Body"]

    def _bad_response(self, exc: BadResponseError, *, retrying: bool) -> None:
        """One WARNING per behaviour per store: a broken server must not flood the log."""
        log.log(
            logging.WARNING if self._first(exc.behaviour) else logging.DEBUG,
            "%s for %s; %s",
            exc.detail,
            exc.what,
            "retrying" if retrying else "giving up",
        )

    def _same_bytes_again(self, exc: StoreError, before: str | None, what: str) -> str | None:
        """The digest of the last whole body that failed its MD5; raises if two had the same.

        The same bytes twice: the server is consistent, its ETag is just another digest
        (or not the MD5 of the bytes at all). EIO at once, and one WARNING naming the fix.
        """
        if not isinstance(exc, Md5Mismatch):
            return before
        if exc.digest != before:
            return exc.digest
        message = (
            f"S3 server's ETag for {what} is not the MD5 of its bytes (the same bytes twice): "
            "if this server's ETags are not MD5s, mount with --etag-md5 off; until then such "
            "objects fail with EIO"
        )
        log.log(logging.WARNING if self._first("etag_not_md5") else logging.DEBUG, "%s", message)
        raise StoreError(message) from None


def checksum_head(resp: Any) -> ChecksumHead:
    """The additional checksum in a HEAD/GET response (the first algorithm S3 names)."""
    not_md5 = resp.get("ServerSideEncryption") in NOT_MD5_ENCRYPTION or bool(
        resp.get("SSECustomerAlgorithm")
    )
    for algorithm in checksums.ALGORITHMS:
        value = resp.get(f"Checksum{algorithm.upper()}")
        if value:
            return ChecksumHead(algorithm, str(value), resp.get("ChecksumType"), not_md5)
    return ChecksumHead(None, None, resp.get("ChecksumType"), not_md5)

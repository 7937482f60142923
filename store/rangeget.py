"""Ranged GETs on the read path without botocore's per-request machinery.

Measured on this project's 2-core machine (``python -m bench.getcost``): a
botocore ``get_object`` costs 1.6-1.8 ms of CPU per request (endpoint rules,
event hooks, response parsing), a third of prefetch's CPU per small file;
signing with botocore's own SigV4 signer and sending with urllib3 costs
0.5-0.6 ms. Everything else (listings, HEAD, writes) stays on the boto3 client.
The store checks every response before reading it (`store.responses`, ~0.05
ms) and a whole single-part object's body against its MD5 (~0.13 ms per
100 KB, 1.4 ms per MB on that machine): the price of never serving a wrong byte.

What is kept from botocore: the credential chain (refreshable credentials are
re-read before each request), SigV4 signing, the CA bundle. What is ours:
retries of throttling, 5xx and network errors (the store's one policy,
`store.retry`) and the mapping of S3 error codes, shared with the client path
(`store.errortable.error_for_code`).

Not used (the client path serves GETs instead) when an HTTP proxy applies:
urllib3 does not read the proxy environment.
"""

from __future__ import annotations

import re
import time
import urllib.parse
import urllib.request
from typing import Any, Literal

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import urllib3

from s3cachefs.base.errors import CredentialsError, StaleError, StoreError, TransientError
from s3cachefs.store.errortable import error_for_code
from s3cachefs.store.retry import RetryPolicy

_CODE = re.compile(rb"<Code>([^<]+)</Code>")
# Seconds `RangeGetter.known_secrets` answers from what `secrets` froze: a minute of
# worker batches share one thread hop (was one per batch: 255 in W1's small set).
SECRETS_KEPT = 60.0


def proxy_applies(url: str) -> bool:
    """Whether the environment routes ``url`` through a proxy (then botocore does the GET)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    proxies = urllib.request.getproxies()
    scheme = urllib.parse.urlsplit(url).scheme
    return scheme in proxies and not urllib.request.proxy_bypass(host)


class RangeGetter:
    """Signed ranged GETs over one urllib3 connection pool (thread-safe)."""

    def __init__(
        self,
        *,
        base_url: str,
        region: str,
        credentials: botocore.credentials.Credentials | None,
        ca_bundle: str | None,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        retry: RetryPolicy,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.region = region
        self._credentials = credentials
        # The credentials `secrets` last froze, and what it gave (`known_secrets`).
        self._frozen: tuple[Any, tuple[str, str, str | None], float] | None = None
        self._retry = retry
        # What a bulk worker process needs to GET the same way (`cache.bulk`).
        self.ca_bundle, self.read_timeout = ca_bundle, read_timeout
        self._pool = urllib3.PoolManager(
            maxsize=max_connections,
            block=False,
            retries=False,  # ours, below: urllib3's would retry behind our counters
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            ca_certs=ca_bundle,
        )

    @property
    def attempts(self) -> int:
        return self._retry.max_attempts

    def secrets(self) -> tuple[str, str, str | None] | None:
        """The current credentials, frozen (refreshed first if they expire), for a worker.
        Blocking: a refresh may be an STS/IMDS round trip."""
        credentials = self._credentials
        if credentials is None:
            return None
        frozen = credentials.get_frozen_credentials()
        secrets = str(frozen.access_key), str(frozen.secret_key), frozen.token
        self._frozen = credentials, secrets, time.monotonic()
        return secrets

    def known_secrets(self) -> tuple[str, str, str | None] | Literal[False] | None:
        """What `secrets` would return, if that is known without asking it; else False.

        Known: what `secrets` gave less than `SECRETS_KEPT` seconds ago, unless the
        credentials are refreshable and within botocore's own advisory refresh window
        of their expiry (`refresh_needed`: `secrets` then refreshes them ahead of it).
        Static keys never change; the age bound covers a refresh made meanwhile by
        another thread. No lock, no I/O: the trio thread asks this for each batch of
        worker jobs instead of a thread hop (`cache.bulkpool`)."""
        credentials = self._credentials
        if credentials is None:
            return None
        frozen = self._frozen
        if (
            frozen is None
            or frozen[0] is not credentials
            or time.monotonic() - frozen[2] > SECRETS_KEPT
            or (
                isinstance(credentials, botocore.credentials.RefreshableCredentials)
                and credentials.refresh_needed()
            )
        ):
            return False
        return frozen[1]

    def url(self, key: str) -> str:
        return self.base_url + urllib.parse.quote(key, safe="/~")

    def open(self, key: str, etag: str, start: int, end: int, what: str) -> Any:
        """The response to ``GET key`` for bytes [start, end) of version ``etag``.

        A 200 or 206, not yet checked: the caller checks it
        (`store.responses.check_get_response`) before reading the body (urllib3
        errors while reading are network errors), and releases it. Raises StoreError.
        """
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": etag}
        response: Any = self._retrying(self.url(key), headers, what, whole=False)
        return response

    def read(self, url: str, what: str) -> bytes:
        """The whole body of a 200 to ``GET url`` (a listing), read under the same retries."""
        body: bytes = self._retrying(url, {}, what, whole=True)
        return body

    def _retrying(self, url: str, headers: dict[str, str], what: str, *, whole: bool) -> Any:
        """The response (``whole``: its body, read and released), under the store's retries."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._send(url, headers)
                if whole and response.status == 200:
                    try:
                        return response.read()
                    finally:
                        response.release_conn()
            except urllib3.exceptions.HTTPError as exc:
                error: StoreError = TransientError(f"{what}: network error: {type(exc).__name__}")
            else:
                if response.status in (200, 206) and not whole:
                    return response
                body = response.read()
                response.release_conn()
                match = _CODE.search(body)
                code = match.group(1).decode() if match else str(response.status)
                error = error_for_code(code, what)
                if isinstance(error, StaleError):  # the current ETag, if the server said it
                    error.current_etag = response.headers.get("ETag")
                if not self._retry.retryable_status(response.status):
                    raise error
            if not self._retry.again(attempt):
                raise error
            self._retry.wait(attempt)

    def _send(self, url: str, headers: dict[str, str]) -> Any:
        if self._credentials is None:
            raise CredentialsError(
                "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "--profile, or an instance role)"
            )
        request = botocore.awsrequest.AWSRequest(method="GET", url=url, headers=headers)
        frozen = self._credentials.get_frozen_credentials()  # refreshes role credentials
        botocore.auth.S3SigV4Auth(frozen, "s3", self.region).add_auth(request)
        # decode_content=False: the bytes as stored. An object stored with a Content-Encoding
        # (gzip, ...) gets it back in every GET, and every header describes the stored bytes;
        # urllib3 would otherwise decompress the body (botocore's GETs never decode either).
        return self._pool.request(
            "GET",
            url,
            headers=dict(request.headers.items()),
            preload_content=False,
            decode_content=False,
        )

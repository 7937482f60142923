"""The bulk worker's HTTP side: where to GET (`Endpoint`) and one signed keep-alive
connection per thread (`GetConnection`), signing with the credentials it is given:
its own lean HTTP/1.1 (`cache.bulkhttp`) for http endpoints, http.client for https.

No trio, no cache and no botocore (the daemon owns the credential chain and sends
`Secrets`): used by `cache.bulkworker` (and the bench), in worker threads.
"""

from __future__ import annotations

import datetime
import http.client
import ssl
import urllib.parse
from dataclasses import dataclass

from s3cachefs.base.errors import CredentialsError
from s3cachefs.cache.bulkhttp import RawConnection, RawResponse
from s3cachefs.cache.bulksign import GetSigner, Secrets, signed_host
from s3cachefs.store.retry import RetryPolicy

NO_CREDENTIALS = "no AWS credentials found"
# What a keep-alive connection the server closed while idle says on its next request.
_STALE_CONNECTION = (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)
# What `cache.bulkjob` reads of a response (http.client's for https).
Response = http.client.HTTPResponse | RawResponse


@dataclass(frozen=True)
class Endpoint:
    """Where and how to GET: picklable, so a worker process builds its own connections."""

    base_url: str  # ".../BUCKET/" (path style) or "https://BUCKET.host/"
    region: str
    timeout: float = 30.0
    attempts: int = 3
    ca_bundle: str | None = None


class GetConnection:
    """One keep-alive HTTP(S) connection and a SigV4 signer (one per thread)."""

    def __init__(self, endpoint: Endpoint, credentials: list[Secrets]) -> None:
        self.endpoint = endpoint
        url = urllib.parse.urlsplit(endpoint.base_url)
        # The host as signed (lowercase): http.client sends the Host it connects to, and
        # one that differs from the signed one is SignatureDoesNotMatch (MinIO).
        self.host = signed_host(endpoint.base_url)
        self.prefix, self.https = url.path, url.scheme == "https"
        self.credentials = credentials  # [the latest], shared by the threads of a worker
        self.retry = RetryPolicy(endpoint.attempts)
        self.address = (url.hostname or "", url.port or (443 if self.https else 80))
        self.http: http.client.HTTPConnection | RawConnection | None = None
        self.signer = GetSigner(self.host, endpoint.region)

    def get(self, key: str, etag: str, start: int, end: int) -> Response:
        path = self.prefix + urllib.parse.quote(key, safe="/~")
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": etag}
        if not self.credentials:  # the daemon sends them with the first jobs: not reached
            raise CredentialsError(NO_CREDENTIALS)
        now = datetime.datetime.now(datetime.UTC)
        signed = self.signer.sign(path, headers, self.credentials[0], now)
        # A socket kept alive from an earlier GET may have been closed by the server
        # while idle (S3: ~20 s): that is not an attempt; once more on a new one.
        reused = self.http is not None and self.http.sock is not None
        try:
            return self._send(path, signed)
        except _STALE_CONNECTION:
            if not reused:
                raise
        return self._send(path, signed)

    def _send(self, path: str, headers: dict[str, str]) -> Response:
        if self.http is None:
            if self.https:
                context = ssl.create_default_context(cafile=self.endpoint.ca_bundle)
                self.http = http.client.HTTPSConnection(
                    self.host, timeout=self.endpoint.timeout, context=context
                )
            else:
                self.http = RawConnection(*self.address, self.host, self.endpoint.timeout)
        try:
            if isinstance(self.http, RawConnection):
                self.http.request(path, headers)
            else:
                self.http.request("GET", path, headers=headers)
            return self.http.getresponse()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None

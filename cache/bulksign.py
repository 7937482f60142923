"""SigV4 for the bulk worker's one request shape: a GET, no query string, no body.

The headers botocore's ``S3SigV4Auth`` adds to such a request (``X-Amz-Date``,
``X-Amz-Content-SHA256`` of the empty body, ``X-Amz-Security-Token``,
``Authorization``), computed without its per-request header objects: botocore
took ~0.6 of the ~2 ms of worker CPU per page-sized GET (cProfile of
`cache.bulkworker.fetch`, 1,000 pages, local profile), this takes a few
microseconds. tests/test_bulkstart.py checks it against botocore, header by header.

No botocore import (the worker process starts without it): credentials are
`Secrets`, frozen by the daemon (`store.rangeget.RangeGetter.secrets`).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import urllib.parse
from dataclasses import dataclass, field

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Secrets:
    """Frozen AWS credentials, as the daemon sends them (botocore's ``ReadOnlyCredentials``)."""

    access_key: str
    # Never in a log or a traceback's repr.
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


def signed_host(base_url: str) -> str:
    """The Host value botocore signs: lowercase, no default port, IPv6 in brackets."""
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class GetSigner:
    """Signs GETs to one host in one region; the day's signing key is kept."""

    def __init__(self, host: str, region: str) -> None:
        self.host = host
        self.region = region
        self._key: tuple[str, str, bytes] = ("", "", b"")  # (secret, day, key)

    def sign(
        self,
        path: str,
        headers: dict[str, str],
        credentials: Secrets,
        now: datetime.datetime,
    ) -> dict[str, str]:
        """``headers`` and the SigV4 ones; ``path``: already quoted, as sent; ``now``:
        any time zone (a naive one is taken as UTC)."""
        if now.tzinfo is not None:
            now = now.astimezone(datetime.UTC)  # X-Amz-Date and the scope's day are UTC
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        out = dict(headers)
        out["X-Amz-Date"] = stamp
        if credentials.token:
            out["X-Amz-Security-Token"] = credentials.token
        out["X-Amz-Content-SHA256"] = EMPTY_SHA256
        canonical = {name.lower(): " ".join(value.split()) for name, value in out.items()}
        canonical.setdefault("host", self.host)
        names = sorted(canonical)
        signed = ";".join(names)
        request = "\n".join(
            ["GET", path, "", *(f"{n}:{canonical[n]}" for n in names), "", signed, EMPTY_SHA256]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        digest = hashlib.sha256(request.encode()).hexdigest()
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}"
        key = self._signing_key(credentials.secret_key, day)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        out["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return out

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key[:2] != (secret, day):
            key = f"AWS4{secret}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._key = (secret, day, key)
        return self._key[2]

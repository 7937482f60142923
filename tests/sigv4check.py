"""SigV4 checked as an S3 server checks it: from the request as it arrived (its Host
header, its path as sent), not from what the client meant to send.

Written from the AWS specification, not with botocore: the test server (moto) does not
check signatures, and the workers' lean signer (`cache.bulksign`) is compared with
botocore elsewhere; this is the third opinion, a server's (`tests.faultproxy`,
``verify_secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<day>\d{8})/(?P<region>[^/]+)/s3/"
    r"aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?Signature=(?P<sig>[0-9a-f]{64})$"
)


def _canonical_query(query: str) -> str:
    pairs = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def valid(
    method: str, target: str, headers: Iterable[tuple[str, str]], secrets: dict[str, str]
) -> bool:
    """Whether the request's ``Authorization`` is right for what arrived, with the
    secret key ``secrets`` has for its access key."""
    received: dict[str, list[str]] = {}
    for name, value in headers:
        received.setdefault(name.lower(), []).append(" ".join(value.split()))
    match = _AUTH.match(",".join(received.get("authorization", [""])))
    if match is None or match["key"] not in secrets:
        return False
    names = match["signed"].split(";")
    if "host" not in names or any(n not in received for n in names):
        return False
    stamp = ",".join(received.get("x-amz-date", [""]))
    if stamp[:8] != match["day"]:
        return False
    url = urlsplit(target)
    request = "\n".join(
        [
            method,
            url.path,  # as sent: S3 does not normalise or re-encode it
            _canonical_query(url.query),
            *(f"{n}:{','.join(received[n])}" for n in names),
            "",
            match["signed"],
            ",".join(received.get("x-amz-content-sha256", ["UNSIGNED-PAYLOAD"])),
        ]
    )
    scope = f"{match['day']}/{match['region']}/s3/aws4_request"
    digest = hashlib.sha256(request.encode()).hexdigest()
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}"
    key = f"AWS4{secrets[match['key']]}".encode()
    for part in (match["day"], match["region"], "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, match["sig"])

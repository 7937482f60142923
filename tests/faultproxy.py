"""A fault-injecting HTTP proxy between the daemon and the test S3 server.

What only the wire shows: 503 SlowDown, 500 InternalError, connections reset
before an answer, bodies cut half-way (the headers promise more bytes than
arrive), and bodies that stall half-way (the connection stays open, silent).
Each request draws one outcome from the configured rates with a seeded RNG,
so a run is reproducible; ``down`` refuses every request, as an unreachable
S3 would (connection reset without a response).

And the lies S3-compatible servers and proxies tell (issue 11), drawn only for
the requests they can apply to, so a rate is "of those requests":

  ignore_range     GET with Range answered 200 with the whole object (Content-Range dropped)
  flip_byte        one byte of a GET body flipped, same length, headers unchanged
  short_range      a ranged GET answered 206 for fewer bytes than asked (consistent headers)
  strip_if_match   the If-Match header removed before forwarding (server ignores If-Match)
  listing_etag     ETags in ListObjectsV2 responses rewritten to a different quoted hex
                   value (the same one for the same object every time: `listing_etag`)
  endless_listing  ListObjectsV2 answered IsTruncated=true with the same continuation
                   token forever (`ENDLESS_TOKEN`; a request carrying it lists page 1 again)
  restarting_listing  the same with a fresh token each time (`RESTART_TOKEN` + a number):
                   page 1 again and again, behind tokens never seen before
  truncated_listing  IsTruncated=true with no continuation token
  unordered_listing  a page's Contents in reverse order (not S3's key order)

Not a lie but a kind of server: ``etag_not_md5`` (a switch, not a rate) gives every
ETag it sends, in headers (GET, HEAD, PUT) and in XML bodies (listings, completed
uploads), another 32-hex value, the same one every time (`listing_etag`), and maps
them back in what it forwards (If-Match, If-None-Match, completion bodies): a
consistent server whose single-part ETags are not the MD5 of the bytes.

And a server that checks auth: ``expired_tokens`` answers 400 ExpiredToken to a
request signed with one of those session tokens (credentials that expired); with
``verify_secrets`` (access key -> secret key) a request whose SigV4 signature is not
right for what arrived, Host header included, is answered 403 SignatureDoesNotMatch
(`tests.sigv4check`). Each refusal counts in ``faults`` under its code. Object GETs
are counted by client in ``get_agents`` (the User-Agent's first word; the bulk
workers send none: "").
"""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests import sigv4check

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INTERNAL = (
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
)
ENDLESS_TOKEN = "s3cachefs-endless-listing"
RESTART_TOKEN = "s3cachefs-restart-"
_LISTING_LIES = frozenset(
    {
        "listing_etag",
        "endless_listing",
        "restarting_listing",
        "truncated_listing",
        "unordered_listing",
    }
)
_CONTENTS = re.compile(rb"<Contents>.*?</Contents>", re.DOTALL)
# Drawn for every request (subject to ``methods``); the lies only where they apply.
_EVERY_REQUEST = frozenset({"slowdown", "internal", "reset", "cut", "stall"})
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")
_ETAG_ELEMENT = re.compile(rb"<ETag>(.*?)</ETag>", re.DOTALL)
_HEX32 = re.compile(rb"[0-9a-fA-F]{32}")


def listing_etag(etag: bytes) -> bytes:
    """What ``listing_etag`` makes of an ETag: another hex value, the same one every time."""
    return _HEX32.sub(
        lambda m: (
            hashlib.md5(b"listing-etag:" + m.group(0), usedforsecurity=False).hexdigest().encode()
        ),
        etag,
    )


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up (a daemon dropping a response it refused) is not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        slowdown: float = 0.0,
        internal: float = 0.0,
        reset: float = 0.0,
        cut: float = 0.0,
        stall: float = 0.0,
        ignore_range: float = 0.0,
        flip_byte: float = 0.0,
        short_range: float = 0.0,
        strip_if_match: float = 0.0,
        listing_etag: float = 0.0,
        endless_listing: float = 0.0,
        restarting_listing: float = 0.0,
        truncated_listing: float = 0.0,
        unordered_listing: float = 0.0,
        seed: int = 5,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.rates = {
            "slowdown": slowdown,
            "internal": internal,
            "reset": reset,
            "cut": cut,
            "stall": stall,
            "ignore_range": ignore_range,
            "flip_byte": flip_byte,
            "short_range": short_range,
            "strip_if_match": strip_if_match,
            "listing_etag": listing_etag,
            "endless_listing": endless_listing,
            "restarting_listing": restarting_listing,
            "truncated_listing": truncated_listing,
            "unordered_listing": unordered_listing,
        }
        self._restarts = 0
        self.listing_agents: list[str] = []  # the User-Agent of each listing request
        self.stall_seconds = 60.0
        self.down = False
        # Methods the rates apply to (None: all), e.g. {"PUT", "POST"} to fail only uploads.
        self.methods: set[str] | None = None
        self.write_delay = 0.0  # seconds each PUT (object or part) waits before going upstream
        # A server without additional checksums (see `_checksum_headers`): True answers every
        # PUT/POST that carries one 400 InvalidArgument; strip forwards it without them.
        self.reject_checksum_headers = False
        self.strip_checksum_headers = False
        self.etag_not_md5 = False
        self._real_etags: dict[bytes, bytes] = {}  # what etag_not_md5 sent -> upstream's
        self.expired_tokens: set[str] = set()
        self.verify_secrets: dict[str, str] = {}
        self.get_agents: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # stop() waits for the serving loop's next poll: 0.5 s by default, in every test.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    # ---- servers that do not take additional checksums (x-amz-checksum-*) ----

    CHECKSUM_HEADERS = ("x-amz-checksum-", "x-amz-sdk-checksum-")

    def _checksum_headers(self, req: BaseHTTPRequestHandler) -> bool:
        """Act as a server that knows no checksum headers; True if the request was answered.

        Older MinIO answers CreateMultipartUpload with CRC64NVME 400 InvalidArgument, and
        Backblaze B2 any x-amz-checksum-* or x-amz-sdk-checksum-algorithm header ("Unsupported
        header ... received for this API call"); older Ceph RGW ignores them (strip).
        """
        if req.command not in ("PUT", "POST"):
            return False
        names = [k for k in req.headers if k.lower().startswith(self.CHECKSUM_HEADERS)]
        if not names:
            return False
        if self.strip_checksum_headers:
            for name in names:
                del req.headers[name]
            return False
        if not self.reject_checksum_headers:
            return False
        with self._lock:
            self.faults["reject_checksum"] += 1
        length = int(req.headers.get("Content-Length") or 0)
        if length:
            req.rfile.read(length)  # the connection stays usable for the next request
        payload = (
            b"<Error><Code>InvalidArgument</Code><Message>Unsupported header '"
            + names[0].lower().encode()
            + b"' received for this API call.</Message></Error>"
        )
        req.send_response(400)
        req.send_header("Content-Type", "application/xml")
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        req.wfile.write(payload)
        return True

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self, method: str, applicable: frozenset[str] = frozenset()) -> str:
        with self._lock:
            if self.down:
                return "down"
            if self.methods is not None and method not in self.methods:
                return "ok"
            x = self._rng.random()
            for name, rate in self.rates.items():
                if name not in _EVERY_REQUEST and name not in applicable:
                    continue
                if x < rate:
                    self.faults[name] += 1
                    return name
                x -= rate
            return "ok"

    @staticmethod
    def _applicable(
        req: BaseHTTPRequestHandler, listing: bool, asked: re.Match[str] | None
    ) -> frozenset[str]:
        """The lies that can be told in answer to this request."""
        if listing:
            return _LISTING_LIES
        modes = {"strip_if_match"} if "If-Match" in req.headers else set()
        if req.command == "GET":
            modes.add("flip_byte")
            if asked:
                modes.add("ignore_range")
                if int(asked.group(2)) > int(asked.group(1)):
                    modes.add("short_range")
        return frozenset(modes)

    def _listing(self, req: BaseHTTPRequestHandler) -> tuple[bool, str]:
        """Whether ``req`` is a listing, and the path to send upstream (tokens of ours out)."""
        url = urlsplit(req.path)
        query = parse_qsl(url.query, keep_blank_values=True)
        if req.command != "GET" or not any(k == "list-type" for k, _ in query):
            return False, req.path
        with self._lock:
            self.listing_agents.append(req.headers.get("User-Agent", ""))
        if any(k == "continuation-token" and v.startswith("s3cachefs-") for k, v in query):
            kept = [(k, v) for k, v in query if k != "continuation-token"]  # page 1 again
            return True, url._replace(query=urlencode(kept)).geturl()
        return True, req.path

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        if self._checksum_headers(req):  # a server without additional checksums
            return
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else None
        if self._refused(req):
            return
        listing, path = self._listing(req)
        asked = _RANGE.match(req.headers.get("Range", "")) if req.command == "GET" else None
        outcome = self._draw(req.command, self._applicable(req, listing, asked))
        if self.write_delay and req.command == "PUT":
            time.sleep(self.write_delay)
        if outcome in ("down", "reset"):
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)
            return
        if outcome in ("slowdown", "internal"):
            payload = SLOWDOWN if outcome == "slowdown" else INTERNAL
            req.send_response(503 if outcome == "slowdown" else 500)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(payload)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(payload)
            return
        resp, data = self._forward(req, path, body, outcome, asked)
        headers = resp.getheaders()
        ok = 200 <= resp.status < 300
        if ok:
            data = self._lie(outcome, data)
        headers, data = self._other_etags(
            headers, data, xml=ok and (listing or req.command == "POST")
        )
        cut = outcome in ("cut", "stall") and req.command == "GET" and len(data) > 1
        req.send_response(resp.status)
        for name, value in headers:
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                req.send_header(name, value)
        # A HEAD answer has no body: its length is the object's, as upstream said.
        if req.command == "HEAD":
            req.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            req.end_headers()
            return
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if cut:  # promise all of it, send half, then hang up (cut) or go silent (stall)
            req.wfile.write(data[: len(data) // 2])
            req.wfile.flush()
            if outcome == "stall":
                time.sleep(self.stall_seconds)
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)
            return
        req.wfile.write(data)

    def _refused(self, req: BaseHTTPRequestHandler) -> bool:
        """Answer a request whose auth a server refuses (``expired_tokens``,
        ``verify_secrets``); True if it was. Object GETs are counted by client first."""
        if req.command == "GET" and "list-type" not in req.path:
            with self._lock:
                self.get_agents[req.headers.get("User-Agent", "").split("/")[0]] += 1
        if req.headers.get("X-Amz-Security-Token") in self.expired_tokens:
            status, code = 400, "ExpiredToken"
        elif self.verify_secrets and not sigv4check.valid(
            req.command, req.path, req.headers.items(), self.verify_secrets
        ):
            status, code = 403, "SignatureDoesNotMatch"
        else:
            return False
        with self._lock:
            self.faults[code] += 1
        payload = f"<Error><Code>{code}</Code><Message>refused</Message></Error>".encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/xml")
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(payload)
        return True

    def _forward(
        self,
        req: BaseHTTPRequestHandler,
        path: str,
        body: bytes | None,
        outcome: str,
        asked: re.Match[str] | None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """Send the request upstream, less what ``outcome`` takes out of it."""
        headers = {k: v for k, v in req.headers.items() if k.lower() != "host"}
        headers["Host"] = self.upstream.netloc
        if self.etag_not_md5:  # conditions and completions name the ETags we sent
            body = self._real(body) if body is not None and req.command == "POST" else body
            headers = {
                k: self._real(v.encode()).decode()
                if k.lower() in ("if-match", "if-none-match")
                else v
                for k, v in headers.items()
            }
        dropped = {"strip_if_match": "if-match", "ignore_range": "range"}.get(outcome)
        headers = {k: v for k, v in headers.items() if k.lower() != dropped}
        if outcome == "short_range" and asked:  # ask upstream for half: its headers agree
            start, last = int(asked.group(1)), int(asked.group(2))
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
            headers["Range"] = f"bytes={start}-{start + (last - start + 1) // 2 - 1}"
        conn = http.client.HTTPConnection(
            self.upstream.hostname or "127.0.0.1", self.upstream.port, timeout=30
        )
        try:
            conn.request(req.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp, resp.read()
        finally:
            conn.close()

    def _other_etags(
        self, headers: list[tuple[str, str]], data: bytes, *, xml: bool
    ) -> tuple[list[tuple[str, str]], bytes]:
        """``etag_not_md5``: the ETag header, and those of an XML body, as this server says."""
        if not self.etag_not_md5:
            return headers, data
        headers = [
            (name, self._other(value.encode()).decode() if name.lower() == "etag" else value)
            for name, value in headers
        ]
        if xml:
            data = _ETAG_ELEMENT.sub(
                lambda m: b"<ETag>" + self._other(m.group(1)) + b"</ETag>", data
            )
        return headers, data

    def _other(self, etag: bytes) -> bytes:
        """``etag_not_md5``: the ETag as this server says it (remembered, to map back)."""
        other = listing_etag(etag)
        with self._lock:
            for fake, real in zip(_HEX32.findall(other), _HEX32.findall(etag), strict=True):
                self._real_etags[fake] = real
        return other

    def _real(self, data: bytes) -> bytes:
        """Every ETag ``etag_not_md5`` sent, in ``data``, back to upstream's."""
        with self._lock:
            return _HEX32.sub(lambda m: self._real_etags.get(m.group(0), m.group(0)), data)

    def _lie(self, outcome: str, data: bytes) -> bytes:
        """The successful answer's body as ``outcome`` tells it."""
        if outcome == "flip_byte" and data:
            with self._lock:
                at = self._rng.randrange(len(data))
            return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        if outcome in _LISTING_LIES:
            return self._listing_lie(outcome, data)
        return data

    def _listing_lie(self, outcome: str, page: bytes) -> bytes:
        """A ListObjectsV2 page as ``outcome`` tells it."""
        if outcome == "listing_etag":
            return _ETAG_ELEMENT.sub(
                lambda m: b"<ETag>" + listing_etag(m.group(1)) + b"</ETag>", page
            )
        if outcome == "unordered_listing":
            entries = _CONTENTS.findall(page)
            pieces = _CONTENTS.split(page)
            for entry, piece in zip(reversed(entries), pieces[1:], strict=True):
                pieces[0] += entry + piece
            return pieces[0]
        token = ""  # truncated_listing
        if outcome == "endless_listing":
            token = ENDLESS_TOKEN
        elif outcome == "restarting_listing":
            with self._lock:
                self._restarts += 1
                token = f"{RESTART_TOKEN}{self._restarts}"
        return _endless(page, token)


def _endless(page: bytes, token: str) -> bytes:
    """A ListObjectsV2 page that says more follows, behind ``token`` (none if empty)."""
    page = re.sub(rb"<NextContinuationToken>.*?</NextContinuationToken>", b"", page)
    page = re.sub(rb"<IsTruncated>\w+</IsTruncated>", b"<IsTruncated>true</IsTruncated>", page)
    if not token:
        return page
    element = f"<NextContinuationToken>{token}</NextContinuationToken>".encode()
    return page.replace(b"</IsTruncated>", b"</IsTruncated>" + element, 1)

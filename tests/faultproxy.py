"""A fault-injecting HTTP proxy between the daemon and the test S3 server.

What only the wire shows: 503 SlowDown, 500 InternalError, connections reset
before an answer, bodies cut half-way (the headers promise more bytes than
arrive), and bodies that stall half-way (the connection stays open, silent).
Each request draws one outcome from the configured rates with a seeded RNG,
so a run is reproducible; ``down`` refuses every request, as an unreachable
S3 would (connection reset without a response).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INTERNAL = (
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
)


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
        seed: int = 5,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.rates = {
            "slowdown": slowdown,
            "internal": internal,
            "reset": reset,
            "cut": cut,
            "stall": stall,
        }
        self.stall_seconds = 60.0
        self.down = False
        # Methods the rates apply to (None: all), e.g. {"PUT", "POST"} to fail only uploads.
        self.methods: set[str] | None = None
        self.write_delay = 0.0  # seconds each PUT (object or part) waits before going upstream
        # A server without additional checksums (see `_checksum_headers`): True answers every
        # PUT/POST that carries one 400 InvalidArgument; strip forwards it without them.
        self.reject_checksum_headers = False
        self.strip_checksum_headers = False
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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

    def _draw(self, method: str) -> str:
        with self._lock:
            if self.down:
                return "down"
            if self.methods is not None and method not in self.methods:
                return "ok"
            x = self._rng.random()
            for name, rate in self.rates.items():
                if x < rate:
                    self.faults[name] += 1
                    return name
                x -= rate
            return "ok"

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        if self._checksum_headers(req):  # a server without additional checksums
            return
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else None
        outcome = self._draw(req.command)
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
        conn = http.client.HTTPConnection(
            self.upstream.hostname or "127.0.0.1", self.upstream.port, timeout=30
        )
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() != "host"}
            headers["Host"] = self.upstream.netloc
            conn.request(req.command, req.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        cut = outcome in ("cut", "stall") and req.command == "GET" and len(data) > 1
        req.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                req.send_header(name, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command == "HEAD":
            return
        if cut:  # promise all of it, send half, then hang up (cut) or go silent (stall)
            req.wfile.write(data[: len(data) // 2])
            req.wfile.flush()
            if outcome == "stall":
                time.sleep(self.stall_seconds)
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)
            return
        req.wfile.write(data)

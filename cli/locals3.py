"""A local S3-compatible server on loopback: moto's server mode, counting requests.

The embedded default behind ``s3cachefs demo`` and the test fixtures. Every
request is recorded at the HTTP layer (what the daemon really sent), so tests
can assert "zero GETs" rather than infer it. moto is an optional dependency
(the ``demo`` and ``test`` extras).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from s3cachefs.base.errors import ConfigError

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Request:
    op: str  # get, head, list, put, delete, other
    path: str
    range: str | None


def classify(method: str, path: str, query: str) -> str:
    """Name the S3 operation of one request (path-style addressing)."""
    has_key = "/" in path.strip("/")
    if method == "GET":
        if "list-type" in query or not has_key:
            return "list"
        return "get"
    return {"HEAD": "head", "PUT": "put", "DELETE": "delete", "POST": "post"}.get(method, "other")


class LocalS3:
    """moto on 127.0.0.1 in a background thread; ``requests`` records what arrived."""

    def __init__(self, port: int = 0, latency: float = 0.0) -> None:
        """``latency`` delays every request, like the first-byte latency of a remote S3."""
        try:
            from moto.moto_server.werkzeug_app import (
                DomainDispatcherApplication,
                create_backend_app,
            )
            from werkzeug.serving import WSGIRequestHandler, make_server
        except ImportError:
            raise ConfigError(
                "the local S3 server needs moto: pip install 's3cachefs[demo]'"
            ) from None
        self._lock = threading.Lock()
        self.log: list[Request] = []
        app: WSGIApp = DomainDispatcherApplication(create_backend_app)

        def counting(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> Iterable[bytes]:
            request = Request(
                classify(
                    environ["REQUEST_METHOD"],
                    environ.get("PATH_INFO", ""),
                    environ.get("QUERY_STRING", ""),
                ),
                environ.get("PATH_INFO", ""),
                environ.get("HTTP_RANGE"),
            )
            with self._lock:
                self.log.append(request)
            if latency:
                time.sleep(latency)
            return app(environ, start_response)

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args: object, **kwargs: object) -> None:
                pass  # one line per request drowns the demo and test output

        self._server = make_server(
            "127.0.0.1", port, counting, threaded=True, request_handler=QuietHandler
        )
        self.port: int = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        # stop() waits for the serving loop's next poll (0.5 s by default).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> LocalS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(r.op for r in self.log)

    def gets(self, key_suffix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if r.op == "get" and r.path.endswith(key_suffix)]

    def reset(self) -> None:
        with self._lock:
            self.log.clear()

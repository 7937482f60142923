"""A minimal read-only S3-compatible server over a local directory, for benchmarks.

moto re-reads the whole object for every ranged GET (40 ms for any range of a
64 MiB object on this machine, 4 ms for a 2 MiB one), which would make the
benchmarks measure moto. This server answers HeadBucket, ListObjectsV2
(delimiter, pagination), HeadObject and GetObject (Range, If-Match) straight
from files, with an optional per-request latency standing in for S3's
first-byte latency. Bucket = a subdirectory; ETag = MD5 of the file. No auth
checks: loopback only.

As a process (``python -m bench.dirs3 ROOT [--host H] [--port P]``) it prints
its endpoint URL on the first line of stdout, and ``GET /_bench/stats`` (JSON
request counts and bytes sent) / ``GET /_bench/reset`` let a harness count the
S3 traffic of a run from outside (``_bench`` is no valid bucket name);
``GET /_bench/rescan`` takes in files a harness added, changed or removed
(bench/refresh.py: objects changed in S3);
``GET /_bench/events`` gives each request's arrival and end (CLOCK_MONOTONIC,
the same in every namespace) with its operation, for a timeline (`bench.w1trace`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # rclone/aws open 32+ connections at once


class DirS3:
    def __init__(
        self, root: Path, latency: float = 0.0, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.root = root
        self.latency = latency
        self.etags: dict[Path, str] = {}
        self.stamps: dict[Path, tuple[int, int, int, int]] = {}  # (dev, inode, size, mtime)
        self._lock = threading.Lock()
        self.rescan()
        self.requests: dict[str, int] = {}
        self.bytes_sent = 0
        self.ranges: list[str] = []  # Range headers of GETs, in arrival order
        self.events: list[tuple[float, float, str]] = []  # (arrived, ended, operation)
        self._op = threading.local()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as S3 and every HTTP server built for throughput: with Nagle,
            # a body's last partial segment waits for the client's delayed ACK (~40 ms).
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                server.timed(self, head=True)

            def do_GET(self) -> None:
                server.timed(self, head=False)

        self.httpd = _Server((host, port), Handler)
        self.endpoint_url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> DirS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def rescan(self) -> None:
        """ETags of the files now under the root; a file seen before (a hard link too) is
        not read again."""
        known = {self.stamps[path]: etag for path, etag in self.etags.items()}
        etags: dict[Path, str] = {}
        stamps: dict[Path, tuple[int, int, int, int]] = {}
        for path in self.root.rglob("*"):
            if path.is_file():
                st = path.stat()
                stamps[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                etags[path] = known.get(stamps[path]) or (
                    '"' + hashlib.md5(path.read_bytes()).hexdigest() + '"'
                )
        with self._lock:
            self.etags, self.stamps = etags, stamps

    def count(self, op: str) -> None:
        self._op.name = op
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1

    def timed(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        arrived = time.monotonic()
        self._op.name = ""
        self.handle(req, head)
        if self._op.name:
            with self._lock:
                self.events.append((arrived, time.monotonic(), self._op.name))

    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:  # noqa: PLR0911
        if self.latency:
            time.sleep(self.latency)
        url = urlsplit(req.path)
        if url.path.startswith("/_bench/"):
            return self._admin(req, url.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        query = parse_qs(url.query)
        if not key and "list-type" in query and not head:
            self.count("list")
            return self._list(req, bucket, query)
        if not key:
            self.count("head_bucket")
            ok = (self.root / bucket).is_dir()
            return _reply(req, 200 if ok else 404, b"", head=True)
        path = self.root / bucket / key
        etag = self.etags.get(path)
        if etag is None:
            return _reply(req, 404, _error("NoSuchKey"), head=head)
        match = req.headers.get("If-Match")
        if match and match != etag:
            return _reply(req, 412, _error("PreconditionFailed"), head=head)
        size = path.stat().st_size
        headers = {"ETag": etag, "Last-Modified": _http_date(path), "Accept-Ranges": "bytes"}
        start, end, status = 0, size - 1, 200
        spec = req.headers.get("Range")
        if spec and not head:
            with self._lock:
                self.ranges.append(f"{time.monotonic():.3f} {spec}")
        if spec:
            first, _, last = spec.removeprefix("bytes=").partition("-")
            if not first:  # "bytes=-N": the last N bytes
                start, end = max(0, size - int(last)), size - 1
            else:  # "bytes=A-B" or "bytes=A-"
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.count("head" if head else "get")
        if head:
            return _reply(req, 200, b"", head=True, headers=headers, length=size)
        length = end - start + 1
        _reply(req, status, b"", head=True, headers=headers, length=length)
        with path.open("rb") as f:  # sendfile: the body never passes through Python
            req.connection.sendfile(f, start, length)
        with self._lock:
            self.bytes_sent += length
        return None

    def _admin(self, req: BaseHTTPRequestHandler, path: str) -> None:
        if path == "/_bench/rescan":
            self.rescan()
        with self._lock:
            if path == "/_bench/reset":
                self.requests.clear()
                self.bytes_sent = 0
                self.ranges.clear()
                self.events.clear()
            if path == "/_bench/events":
                body = json.dumps(self.events)
            else:
                body = json.dumps({"requests": self.requests, "bytes_sent": self.bytes_sent})
        _reply(req, 200, body.encode(), headers={"Content-Type": "application/json"})

    def _list(self, req: BaseHTTPRequestHandler, bucket: str, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        after = query.get("continuation-token", [""])[0]
        base = self.root / bucket
        keys = sorted(p.relative_to(base).as_posix() for p in self.etags if base in p.parents)
        contents: list[str] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        for key in keys:
            if not key.startswith(prefix) or key <= after:
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter)[0] + delimiter
                if prefixes and prefixes[-1] == common:
                    continue
                if common <= after:
                    continue
                prefixes.append(common)
                last = common + "\uffff"
            else:
                path = base / key
                contents.append(
                    f"<Contents><Key>{escape(key)}</Key><Size>{path.stat().st_size}</Size>"
                    f"<ETag>{escape(self.etags[path])}</ETag>"
                    f"<LastModified>{_iso_date(path)}</LastModified></Contents>"
                )
                last = key
            if len(contents) + len(prefixes) >= 1000:
                truncated = True
                break
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix>"
            f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
            + (
                f"<NextContinuationToken>{escape(last)}</NextContinuationToken>"
                if truncated
                else ""
            )
            + "".join(contents)
            + "".join(
                f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes
            )
            + "</ListBucketResult>"
        ).encode()
        _reply(req, 200, body, headers={"Content-Type": "application/xml"})


def _error(code: str) -> bytes:
    return f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()


def _http_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _iso_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _reply(
    req: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    *,
    head: bool = False,
    headers: dict[str, str] | None = None,
    length: int | None = None,
) -> None:
    req.send_response(status)
    for name, value in (headers or {}).items():
        req.send_header(name, value)
    req.send_header("Content-Length", str(len(body) if length is None else length))
    req.end_headers()
    if not head:
        req.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("root", type=Path, help="folder whose subfolders are buckets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = DirS3(args.root, args.latency, args.host, args.port)
    print(server.endpoint_url, flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()

"""The bulk path: whole objects (or runs of blocks) into cache files, off the daemon's interpreter.

A prefetch or a sync moves thousands of objects; done block by block inside
the daemon (one thread hand-off per GET, one per block write, one per block
back to trio, a re-read to verify) it saturates one core at 0.4x the sync
tools. Here one `Job` is one GET of bytes ``[start, end)`` of one object
version, written with ``pwrite`` at the same offsets into the file the cache
will own. While the bytes pass, each block's CRC32 is computed from the very
buffer that is written, and, for a job that covers a whole object, the
end-to-end digest its `Check` asks for (hashlib and zlib release the GIL on
large buffers). A `Done` carries the CRCs and the digest back; the caller (the
daemon) decides, records and pins: this module touches no index and no pin.

Engines, same jobs, same results:

- `fetch_jobs` in the calling process, ``threads`` at once (the in-daemon
  option with one hand-off per job instead of per block; and the reference);
- `ProcessPool`: ``procs`` worker processes (spawned, never forked from a
  threaded daemon), each with its own connection pool and ``threads``
  threads; jobs go out and results come back in batches over a pipe.

The response is checked before a byte is used (`store.responses`), GETs carry
``If-Match``, and a failed attempt starts the job again from its first byte
(the digest must see every byte once, in order).
"""

from __future__ import annotations

import contextlib
import http.client
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.session

from s3cachefs.base.errors import StoreError, TransientError
from s3cachefs.store.checksums import Check, Digest
from s3cachefs.store.responses import check_get_response
from s3cachefs.store.s3 import error_for_code

BATCH_SECONDS = 0.02  # results wait this long at most to share a pipe message
_RETRY_STATUS = {429, 500, 502, 503, 504}  # throttling and server trouble: worth another try
_CODE = re.compile(rb"<Code>([^<]+)</Code>")


@dataclass(frozen=True)
class Endpoint:
    """Where and how to GET: picklable, so a worker process builds its own connections."""

    base_url: str  # ".../BUCKET/" (path style) or "https://BUCKET.host/"
    region: str
    timeout: float = 30.0
    attempts: int = 5


@dataclass(frozen=True)
class Job:
    oid: str
    key: str
    etag: str
    size: int  # of the object version
    start: int  # block-aligned
    end: int
    path: str  # the file to pwrite into (created, sized to ``size``, if missing)
    check: Check | None = None  # the digest to compute: only for a job of the whole object


@dataclass
class Done:
    oid: str
    start: int
    end: int
    crcs: list[int] = field(default_factory=list)  # one per block, from the bytes written
    digest: str = ""  # `Digest.result()` in the check's terms ("" if none asked)
    matches: bool = False  # the digest is the check's value
    error: str = ""  # "" on success; else "<ErrorClass>: message"
    seconds: float = 0.0  # wall time of the job in its thread
    attempts: int = 1


class _Conn:
    """One keep-alive HTTP(S) connection and a SigV4 signer (one per thread)."""

    def __init__(self, endpoint: Endpoint, credentials: botocore.credentials.Credentials) -> None:
        self.endpoint = endpoint
        url = urllib.parse.urlsplit(endpoint.base_url)
        self.host, self.prefix, self.https = url.netloc, url.path, url.scheme == "https"
        self.credentials = credentials
        self.http: http.client.HTTPConnection | None = None

    def get(self, key: str, etag: str, start: int, end: int) -> http.client.HTTPResponse:
        path = self.prefix + urllib.parse.quote(key, safe="/~")
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": etag}
        request = botocore.awsrequest.AWSRequest(
            method="GET", url=f"{'https' if self.https else 'http'}://{self.host}{path}",
            headers=headers,
        )  # fmt: skip
        frozen = self.credentials.get_frozen_credentials()
        botocore.auth.S3SigV4Auth(frozen, "s3", self.endpoint.region).add_auth(request)
        if self.http is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.http = cls(self.host, timeout=self.endpoint.timeout)
        try:
            self.http.request("GET", path, headers=dict(request.headers.items()))
            return self.http.getresponse()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None


def _credentials() -> botocore.credentials.Credentials:
    credentials = botocore.session.Session().get_credentials()
    if credentials is None:
        raise StoreError("no AWS credentials found")
    return credentials


def _open_target(path: str, size: int) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)  # sparse, full length: a complete file is the object
    return fd


def _attempt(conn: _Conn, job: Job, block_size: int, buf: memoryview, done: Done) -> None:
    what = f"{job.key} bytes {job.start}-{job.end}"
    response = conn.get(job.key, job.etag, job.start, job.end)
    try:
        if response.status not in (200, 206):
            match = _CODE.search(response.read())
            error = error_for_code(match.group(1).decode() if match else str(response.status), what)
            if response.status in _RETRY_STATUS and not isinstance(error, TransientError):
                error = TransientError(f"{what}: status {response.status}")
            raise error
        headers = dict(response.getheaders())
        check_get_response(
            response.status, headers, job.start, job.end, job.size, job.etag, what=what
        )
        digest = Digest(job.check) if job.check is not None else None
        fd = _open_target(job.path, job.size)
        try:
            pos = job.start
            while pos < job.end:
                want = min(block_size, job.end - pos)
                view = buf[:want]
                got = 0
                while got < want:
                    n = response.readinto(view[got:])
                    if not n:
                        raise TransientError(f"{what}: body ended early at byte {pos + got}")
                    got += n
                os.pwrite(fd, view, pos)
                done.crcs.append(zlib.crc32(view))
                if digest is not None:
                    digest.update(view)  # type: ignore[arg-type]  # memoryview is fine
                pos += want
        finally:
            os.close(fd)
        if digest is not None:
            done.digest, done.matches = digest.result(), digest.matches()
    except BaseException:
        conn.close()  # mid-body: the connection cannot be reused
        raise


def fetch(conn: _Conn, job: Job, block_size: int, buf: memoryview) -> Done:
    """One job, retried from its first byte on transient errors. Blocking; never raises."""
    start = time.perf_counter()
    done = Done(job.oid, job.start, job.end)
    for attempt in range(1, conn.endpoint.attempts + 1):
        done.crcs.clear()
        done.attempts = attempt
        try:
            _attempt(conn, job, block_size, buf, done)
            done.error = ""
            break
        except (OSError, http.client.HTTPException, TransientError) as exc:
            done.error = f"{type(exc).__name__}: {exc}"
            time.sleep(min(2.0, 0.05 * 2**attempt))
        except StoreError as exc:  # stale, bad response that is not worth retrying
            done.error = f"{type(exc).__name__}: {exc}"
            break
    done.seconds = time.perf_counter() - start
    return done


def fetch_jobs(
    endpoint: Endpoint, jobs: Iterable[Job], *, block_size: int, threads: int
) -> Iterator[Done]:
    """Run ``jobs`` in this process, ``threads`` at once; results as they finish."""
    todo: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    out: queue.SimpleQueue[Done | None] = queue.SimpleQueue()
    credentials = _credentials()
    count = 0
    for job in jobs:
        todo.put(job)
        count += 1
    workers = [
        threading.Thread(target=_serve, args=(endpoint, credentials, block_size, todo, out))
        for _ in range(max(1, min(threads, count)))
    ]
    for worker in workers:
        todo.put(None)
        worker.start()
    for _ in range(count):
        done = out.get()
        assert done is not None
        yield done
    for worker in workers:
        worker.join()


def _serve(
    endpoint: Endpoint,
    credentials: botocore.credentials.Credentials,
    block_size: int,
    todo: queue.SimpleQueue[Job | None],
    out: queue.SimpleQueue[Done | None],
) -> None:
    conn = _Conn(endpoint, credentials)
    buf = memoryview(bytearray(block_size))
    try:
        while (job := todo.get()) is not None:
            out.put(fetch(conn, job, block_size, buf))
    finally:
        conn.close()


# ---- worker processes -------------------------------------------------------


def _worker_main(
    conn: multiprocessing.connection.Connection, endpoint: Endpoint, block_size: int, threads: int
) -> None:
    """A worker process: jobs in (lists), results out (lists, batched); None stops it."""
    todo: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    out: queue.SimpleQueue[Done | None] = queue.SimpleQueue()
    credentials = _credentials()
    pool = [
        threading.Thread(
            target=_serve, args=(endpoint, credentials, block_size, todo, out), daemon=True
        )
        for _ in range(threads)
    ]
    for thread in pool:
        thread.start()

    def send_results() -> None:
        while True:
            first = out.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + BATCH_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = out.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    conn.send(batch)
                    return
                batch.append(item)
            conn.send(batch)

    sender = threading.Thread(target=send_results)
    sender.start()
    try:
        while (jobs := conn.recv()) is not None:
            for job in jobs:
                todo.put(job)
    except EOFError:
        pass  # the daemon went away: finish nothing more
    for _ in pool:
        todo.put(None)
    for thread in pool:
        thread.join()
    out.put(None)
    sender.join()


class ProcessPool:
    """``procs`` worker processes, ``threads`` GETs each; jobs out and results back in batches."""

    def __init__(self, endpoint: Endpoint, *, block_size: int, procs: int, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # the daemon has threads: never fork it
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        self.load: list[int] = []
        for _ in range(procs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(theirs, endpoint, block_size, threads), daemon=True
            )
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
            self.load.append(0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def submit(self, jobs: list[Job]) -> None:
        """Hand jobs to the least loaded worker (by bytes outstanding)."""
        i = min(range(len(self.conns)), key=self.load.__getitem__)
        self.load[i] += sum(j.end - j.start for j in jobs)
        self.conns[i].send(jobs)

    def results(self, timeout: float | None = None) -> list[Done]:
        """Whatever batches are ready (waits up to ``timeout`` for the first)."""
        ready = multiprocessing.connection.wait(self.conns, timeout)
        done: list[Done] = []
        for conn in ready:
            assert isinstance(conn, multiprocessing.connection.Connection)
            batch: list[Done] = conn.recv()
            i = self.conns.index(conn)
            self.load[i] -= sum(d.end - d.start for d in batch)
            done += batch
        return done

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()

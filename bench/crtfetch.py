"""Prototype engine (2) of issue 12: the jobs of `s3cachefs.cache.bulkfetch` run by awscrt.s3.

The AWS Common Runtime's S3 client (C, its own event loop threads and
connection pool; awscrt is already a dependency) GETs each job; its body
arrives in order, in part-sized chunks, in ``on_body`` callbacks on the CRT's
threads, where the chunk is written with ``pwrite`` and its blocks' CRC32s and
the object's digest are computed (the only Python per chunk; hashlib and zlib
release the GIL). Path-style, plain-http endpoints work: the endpoint is the
request's Host header, TLS off. Measured against the other engines by
``python -m bench.bulk``.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from queue import SimpleQueue
from typing import Any

from awscrt import auth, http, io, s3

from s3cachefs.cache.bulkjob import open_target
from s3cachefs.cache.bulkworker import Done, Endpoint, Job
from s3cachefs.store.checksums import Digest
from s3cachefs.store.responses import same_etag


def fetch_jobs_crt(
    endpoint: Endpoint, jobs: list[Job], *, block_size: int, gbps: float, part_size: int
) -> Iterator[Done]:
    """Every job at once (the CRT queues and paces them); results as they finish."""
    elg = io.EventLoopGroup(2)
    bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
    url = urllib.parse.urlsplit(endpoint.base_url)
    client = s3.S3Client(
        bootstrap=bootstrap,
        region=endpoint.region,
        credential_provider=auth.AwsCredentialsProvider.new_default_chain(bootstrap),
        tls_mode=s3.S3RequestTlsMode.ENABLED
        if url.scheme == "https"
        else s3.S3RequestTlsMode.DISABLED,
        part_size=part_size,
        throughput_target_gbps=gbps,
    )
    out: SimpleQueue[Done] = SimpleQueue()
    keep: list[Any] = []
    for job in jobs:
        keep.append(_start(client, url.netloc, url.path, job, block_size, out))
    for _ in jobs:
        yield out.get()
    del keep


def _start(
    client: s3.S3Client, host: str, prefix: str, job: Job, block_size: int, out: SimpleQueue[Done]
) -> Any:
    done = Done(job.oid, job.start, job.end)
    digest = Digest(job.check) if job.check is not None else None
    fd = open_target(job.path, job.size)
    started = time.perf_counter()
    lock = threading.Lock()
    carry = bytearray()  # a block split across two chunks

    def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
        etag = dict((k.lower(), v) for k, v in headers).get("etag", "")
        if not same_etag(etag, job.etag):
            done.error = f"StaleError: ETag {etag} is not {job.etag}"

    def on_body(chunk: bytes, offset: int, **_: Any) -> None:
        with lock:
            os.pwrite(fd, chunk, offset)  # offsets are the object's, also for a range
            view = memoryview(chunk)
            if carry:
                need = block_size - len(carry)
                carry.extend(view[:need])
                view = view[need:]
                if len(carry) == block_size:
                    done.crcs.append(zlib.crc32(carry))
                    carry.clear()
            while len(view) >= block_size:
                done.crcs.append(zlib.crc32(view[:block_size]))
                view = view[block_size:]
            carry.extend(view)
            if digest is not None:
                digest.update(chunk)

    def on_done(
        error: BaseException | None = None, status_code: int | None = None, **_: Any
    ) -> None:
        if carry:
            done.crcs.append(zlib.crc32(carry))
        os.close(fd)
        if error is not None:
            done.error = f"{type(error).__name__}: {error} (status {status_code})"
        if digest is not None:
            done.digest, done.matches = digest.result(), digest.matches()
        done.seconds = time.perf_counter() - started
        out.put(done)

    headers = http.HttpHeaders([("Host", host), ("If-Match", job.etag)])
    if (job.start, job.end) != (0, job.size):
        headers.add("Range", f"bytes={job.start}-{job.end - 1}")
    path = prefix + urllib.parse.quote(job.key, safe="/~")
    return client.make_request(
        type=s3.S3RequestType.GET_OBJECT,
        request=http.HttpRequest("GET", path, headers),
        on_headers=on_headers,
        on_body=on_body,
        on_done=on_done,
    )

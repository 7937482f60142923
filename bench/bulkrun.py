"""One prototype bulk engine downloading a whole dataset, as its own process (issue 12).

    python -m bench.bulkrun ENDPOINT BUCKET PREFIX DEST --engine threads|procs|crt
        [--threads N] [--procs N] [--part BYTES] [--block BYTES]

Lists ``s3://BUCKET/PREFIX/`` (boto3), makes `Job`s as the daemon would (an
object of at most ``--part`` bytes is one whole-object job whose MD5 ETag is
checked as it passes; a larger one is ``--part``-sized ranged jobs, then one
re-read of the file from the page cache checks every block's CRC and the
MD5), runs them on the engine into ``DEST/objects/ab/cd/<oid>`` (the cache's
layout), and prints one JSON line: bytes, phase wall times, failures. Run as
a child of `bench.bulk` so that its CPU and memory (and its workers') are
counted alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import boto3
from botocore.config import Config

from s3cachefs.cache.bulkconn import GetConnection
from s3cachefs.cache.bulkworker import Done, Endpoint, Job, Secrets, fetch_jobs
from s3cachefs.store.checksums import Check
from s3cachefs.store.responses import etag_md5

MIB = 1024 * 1024


def chain_secrets() -> Secrets:
    """This process's AWS credentials, frozen, as the daemon sends them to its workers."""
    credentials = boto3.Session().get_credentials()
    assert credentials is not None, "no AWS credentials"
    frozen = credentials.get_frozen_credentials()
    return Secrets(str(frozen.access_key), str(frozen.secret_key), frozen.token)


def _oid(bucket: str, key: str, etag: str) -> str:
    return hashlib.sha256(f"{bucket}\0{key}\0{etag}".encode()).hexdigest()[:40]


def _verify(path: str, size: int, block: int, crcs: list[int], md5: str | None) -> bool:
    """Re-read a file fetched in several jobs: its blocks' CRCs, then its MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb", buffering=0) as f:
        for i, crc in enumerate(crcs):
            data = os.pread(f.fileno(), block, i * block)
            if zlib.crc32(data) != crc:
                return False
            digest.update(data)
    return md5 is None or (digest.hexdigest() == md5 and len(crcs) == -(-size // block))


def _procs(
    endpoint: Endpoint, jobs: list[Job], block: int, procs: int, threads: int
) -> Iterator[Done]:
    """The daemon's worker processes (`cache.bulkworker`), driven without trio."""
    workers: list[tuple[subprocess.Popen[bytes], Connection]] = []
    for _ in range(procs):
        ours, theirs = socket.socketpair()
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "s3cachefs.cache.bulkworker", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        conn = Connection(ours.detach())
        conn.send((endpoint, block, threads))
        workers.append((proc, conn))
    secrets = chain_secrets()
    wire = (secrets.access_key, secrets.secret_key, secrets.token)
    try:
        for i in range(0, len(jobs), 16):
            workers[(i // 16) % procs][1].send((wire, jobs[i : i + 16]))
        left = len(jobs)
        while left:
            for ready in wait([c for _, c in workers], timeout=60):
                assert isinstance(ready, Connection)
                for done in ready.recv():
                    left -= 1
                    yield done
    finally:
        for proc, conn in workers:
            conn.close()
            proc.kill()
            proc.wait()


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    split: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)  # path, size, md5
    checked: set[str] = field(default_factory=set)  # whole-object jobs with a digest to match


def _list(endpoint: str, bucket: str, prefix: str) -> list[tuple[str, str, int]]:
    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix.rstrip("/") + "/"
    )
    return [(o["Key"], o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", [])]


def _plan(objects: list[tuple[str, str, int]], args: argparse.Namespace) -> Plan:
    plan = Plan()
    for key, etag, size in sorted(objects, key=lambda o: -o[2]):  # largest first
        oid = _oid(args.bucket, key, etag)
        path = str(args.dest / "objects" / oid[:2] / oid[2:4] / oid)
        md5 = None if args.no_digest else etag_md5(etag)
        if size <= args.part:
            if md5 is not None:
                plan.checked.add(oid)
            check = Check("md5", md5) if md5 else None
            plan.jobs.append(Job(oid, key, etag, size, 0, size, path, check))
            continue
        plan.split[oid] = (path, size, md5)
        for start in range(0, size, args.part):
            plan.jobs.append(Job(oid, key, etag, size, start, min(size, start + args.part), path))
    return plan


def _engine(args: argparse.Namespace, jobs: list[Job]) -> Iterator[Done]:
    endpoint = Endpoint(base_url=f"{args.endpoint.rstrip('/')}/{args.bucket}/", region="us-east-1")
    if args.engine == "threads":
        return fetch_jobs(
            endpoint, jobs, secrets=chain_secrets(), block_size=args.block, threads=args.threads
        )
    if args.engine == "procs":
        return _procs(endpoint, jobs, args.block, args.procs, args.threads)
    from bench.crtfetch import fetch_jobs_crt  # only this engine needs awscrt.s3

    return fetch_jobs_crt(endpoint, jobs, block_size=args.block, gbps=args.gbps, part_size=8 * MIB)


def _collect(plan: Plan, results: Iterator[Done], block: int, part: int) -> tuple[int, list[str]]:
    """Bytes fetched and failures; a split object is re-read as soon as it is whole."""
    failed: list[str] = []
    crcs: dict[str, dict[int, list[int]]] = {}
    nbytes = 0

    def verify(oid: str) -> bool:
        path, size, md5 = plan.split[oid]
        ordered = [c for _, part in sorted(crcs.get(oid, {}).items()) for c in part]
        return _verify(path, size, block, ordered, md5)

    verifying = {}
    parts = {oid: -(-size // part) for oid, (_, size, _) in plan.split.items()}
    with ThreadPoolExecutor(2) as pool:
        for done in results:
            nbytes += done.end - done.start
            if done.error or (done.oid in plan.checked and not done.matches):
                failed.append(f"{done.oid}: {done.error or 'digest mismatch'}")
            if done.oid in plan.split:
                crcs.setdefault(done.oid, {})[done.start] = done.crcs
                if len(crcs[done.oid]) == parts[done.oid]:
                    verifying[done.oid] = pool.submit(verify, done.oid)
        for oid, future in verifying.items():
            if not future.result():
                failed.append(f"{oid}: verify failed")
    return nbytes, failed


class Probe:
    """Foreground reads while the engine runs: first-byte time of GETs from this process.

    The daemon's own reads (FUSE) share its interpreter with whatever bulk work
    runs there; this thread stands in for them: every ``interval`` it GETs a
    page over its own connection and times the first byte, then drains the body.
    """

    def __init__(self, endpoint: str, bucket: str, keys: list[str], interval: float = 0.02) -> None:
        self.url = urllib.parse.urlsplit(endpoint)
        self.path = f"/{bucket}/"
        self.keys = keys
        self.interval = interval
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._signer = GetConnection(
            Endpoint(f"{endpoint.rstrip('/')}/{bucket}/", "us-east-1"), [chain_secrets()]
        )

    def sample(self, count: int) -> list[float]:
        """``count`` first-byte times now (the idle baseline)."""
        for i in range(count):
            self.times.append(self._one(self.keys[i % len(self.keys)]))
            time.sleep(self.interval)
        times, self.times = self.times, []
        return times

    def _one(self, key: str) -> float:
        start = time.perf_counter()
        response = self._signer.get(key, self._etags[key], 0, self._sizes[key])
        response.read(1)
        took = time.perf_counter() - start
        response.read()
        return took

    def start(self, etags: dict[str, str], sizes: dict[str, int]) -> Probe:
        self._etags, self._sizes = etags, sizes
        return self

    def run_during(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.interval):
            self.times.append(self._one(self.keys[i % len(self.keys)]))
            i += 1

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.times


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    if not ordered:
        return {}

    def ms(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"n": len(ordered), "p50_ms": ms(0.5), "p99_ms": ms(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("bucket")
    parser.add_argument("prefix")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--engine", choices=("threads", "procs", "crt"), required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--part", type=int, default=16 * MIB)
    parser.add_argument("--block", type=int, default=MIB)
    parser.add_argument("--gbps", type=float, default=10.0, help="crt: throughput target")
    parser.add_argument("--no-digest", action="store_true", help="CRCs only (what MD5 costs)")
    parser.add_argument("--probe", type=int, default=0, help="N idle first-byte probes, then")
    args = parser.parse_args()
    probe: Probe | None = None
    if args.probe:  # reads from this process: idle first, then during the bulk download
        objects = _list(args.endpoint, args.bucket, args.prefix)
        small = [(k, e, n) for k, e, n in objects if n <= MIB][:200]
        probe = Probe(args.endpoint, args.bucket, [k for k, _, _ in small]).start(
            {k: e for k, e, _ in small}, {k: n for k, _, n in small}
        )
        idle = probe.sample(args.probe)
        probe.run_during()
    t0 = time.perf_counter()
    objects = _list(args.endpoint, args.bucket, args.prefix)
    t_list = time.perf_counter() - t0
    plan = _plan(objects, args)
    nbytes, failed = _collect(plan, _engine(args, plan.jobs), args.block, args.part)
    t_get = time.perf_counter() - t0 - t_list  # download, and the re-reads that overlap it
    summary = {
        "objects": len(objects),
        "bytes": nbytes,
        "jobs": len(plan.jobs),
        "listing": round(t_list, 3),
        "download": round(t_get, 3),
        "failed": failed[:5],
        "failures": len(failed),
    }
    if probe is not None:
        summary["probe_idle"] = _percentiles(idle)
        summary["probe_busy"] = _percentiles(probe.stop())
    print(json.dumps(summary), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

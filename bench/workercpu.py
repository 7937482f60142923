"""A bulk worker's CPU per GB: the GET loop (http.client or the lean `cache.bulkhttp`) and
the block CRC-32 (zlib or isal, `store.crc`), side by side in one run.

    python -m bench.workercpu [--pages 400] [--rounds 3] [--threads 1]

The jobs run as a worker runs them (`cache.bulkworker.fetch_jobs`: GET, checks,
``pwrite``, each block's CRC-32, the MD5 of the whole object) in this process,
against `bench.dirs3` in another one (its CPU is not counted), on loopback.
Two sets: W1-like pages (log-normal sizes, median ~240 KB, whole objects with
their MD5 check) and 8 MiB ranges of a large object (no digest: parts). For
each variant, this process's CPU (all threads, ``getrusage``) per GB and per
GET; the variants alternate round by round (the machine drifts), medians.
The older engines are this build with one part swapped back (the bench's own
subclass of `GetConnection` for http.client, ``zlib.crc32`` for the CRC).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from s3cachefs.cache import bulkjob, bulkworker
from s3cachefs.cache.bulkconn import GetConnection, Response
from s3cachefs.cache.bulkworker import Endpoint, Job, Secrets, fetch_jobs
from s3cachefs.store import crc
from s3cachefs.store.checksums import Check

MIB = 1 << 20
BLOCK = MIB


class HttpClientConnection(GetConnection):
    """The GET over http.client, as every bulk worker did before `cache.bulkhttp`."""

    def _send(self, path: str, headers: dict[str, str]) -> Response:
        if self.http is None:
            self.http = http.client.HTTPConnection(self.host, timeout=self.endpoint.timeout)
        assert isinstance(self.http, http.client.HTTPConnection)
        try:
            self.http.request("GET", path, headers=headers)
            return self.http.getresponse()
        except (OSError, http.client.HTTPException):
            self.close()
            raise


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(variant: str, endpoint: Endpoint, jobs: list[Job], threads: int) -> tuple[float, int]:
    http_name, crc_name = variant.split("+")
    # The engine as it was, swapped in by name (its modules import them by name).
    vars(bulkworker)["GetConnection"] = (
        HttpClientConnection if http_name == "http.client" else GetConnection
    )
    vars(bulkjob)["crc32"] = zlib.crc32 if crc_name == "zlib" else crc.crc32
    start = _cpu()
    total = 0
    for done in fetch_jobs(endpoint, jobs, secrets=Secrets("b", "b"), block_size=BLOCK,
                           threads=threads):  # fmt: skip
        assert not done.error, done.error
        total += done.end - done.start
    return _cpu() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workercpu", description=__doc__)
    parser.add_argument("--pages", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-workercpu-"))
    server = None
    try:
        bucket = work / "s3" / "bench"
        bucket.mkdir(parents=True)
        rng = random.Random(12)
        pages: list[tuple[str, int, str]] = []
        for i in range(args.pages):
            size = int(min(3e6, max(30e3, rng.lognormvariate(12.4, 0.8))))
            data = os.urandom(size)
            (bucket / f"p{i}").write_bytes(data)
            pages.append((f"p{i}", size, hashlib.md5(data).hexdigest()))
        big = os.urandom(64 * MIB)
        (bucket / "big").write_bytes(big)
        big_etag = hashlib.md5(big).hexdigest()
        del big
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.dirs3", str(work / "s3")],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None
        endpoint = Endpoint(server.stdout.readline().strip() + "/bench/", "us-east-1")
        out = work / "out"
        out.mkdir()
        sets = {
            "pages": [
                Job(k, k, f'"{m}"', s, 0, s, str(out / k), Check("md5", m)) for k, s, m in pages
            ],
            "8 MiB parts": [
                Job("big", "big", f'"{big_etag}"', 64 * MIB, o, o + 8 * MIB, str(out / "big"))
                for o in range(0, 64 * MIB, 8 * MIB)
            ],
        }
        variants = ["http.client+zlib", "http.client+isal", "lean+isal"]
        print(f"crc engine installed: {crc.ENGINE}; load {os.getloadavg()}")
        for name, jobs in sets.items():
            cpu: dict[str, list[float]] = {v: [] for v in variants}
            gets = len(jobs)
            for rnd in range(args.rounds):
                order = variants if rnd % 2 == 0 else variants[::-1]
                for variant in order:
                    for job in jobs:
                        Path(job.path).unlink(missing_ok=True)
                    seconds, total = _run(variant, endpoint, jobs, args.threads)
                    cpu[variant].append(seconds)
            print(f"{name}: {gets} GETs, {total / 1e6:.0f} MB, {args.threads} thread(s), "
                  f"medians of {args.rounds}:")  # fmt: skip
            base = statistics.median(cpu[variants[0]])
            for variant in variants:
                med = statistics.median(cpu[variant])
                print(
                    f"  {variant:<18} {med / total * 1e9:5.2f} CPU-s/GB  "
                    f"{med / gets * 1e3:6.3f} ms/GET  ({med / base:4.2f}x)"
                )
        print(f"load {os.getloadavg()}")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

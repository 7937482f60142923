"""What one bulk worker costs to start: spawn to ready, its CPU, its unique RSS.

    python -m bench.workerstart [--runs 15]

Spawns `cache.bulkworker` as `cache.bulkpool` does, sends it the endpoint and
one job to a closed port (one attempt): its answer comes as soon as it is
ready. Then its unique RSS (``smaps_rollup``), EOF, and its CPU from
``wait4``. Another build: run it with that build first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection

from s3cachefs.cache.bulkworker import Endpoint, Job


def _uss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        kib = sum(int(line.split()[1]) for line in f if line.startswith("Private_"))
    return kib / 1024


def one(target: str) -> tuple[float, float, float]:
    """(seconds from spawn to its answer, its CPU-s, its unique RSS in MiB)."""
    ours, theirs = socket.socketpair()
    start = time.perf_counter()
    with theirs:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "s3cachefs.cache.bulkworker",
             str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    conn = Connection(ours.detach())
    conn.send((Endpoint("http://127.0.0.1:9/bucket/", "us-east-1", attempts=1), 1 << 20, 2))
    conn.send((("AKID", "SECRET", None), [Job("o", "k", '"e"', 10, 0, 10, target)]))
    (done,) = conn.recv()
    ready = time.perf_counter() - start
    assert "network error" in done.error, done
    uss = _uss_mib(proc.pid)
    conn.close()
    _, _, usage = os.wait4(proc.pid, 0)
    return ready, usage.ru_utime + usage.ru_stime, uss


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workerstart", description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one(os.path.join(tmp, "target")) for _ in range(args.runs)]
    print(f"bulk worker, {args.runs} runs, load {os.getloadavg()[0]:.1f}: median (min-max)")
    for i, name in enumerate(("spawn to ready, s", "CPU-s", "unique RSS, MiB")):
        values = [r[i] for r in runs]
        print(f"  {name:18} {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")


if __name__ == "__main__":
    main()

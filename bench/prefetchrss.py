"""Daemon memory and time of one prefetch: peak RSS, RSS after, CPU seconds.

    python -m bench.prefetchrss [--pages 300] [--large 3] [--jobs N] [--latency 0]

Pages of 30-600 KB plus ``--large`` x 512 MiB objects, served by `bench.dirs3`
(``--latency`` seconds added to every request). The daemon's RSS is sampled
every 0.1 s during the prefetch; "after" is one second after it ended.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import cli, drop_caches, mount
from bench.dirs3 import DirS3

MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--large", type=int, default=3)
    parser.add_argument("--jobs", type=int, help="prefetch --jobs (default: the daemon's)")
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    rng = random.Random(3)
    work = Path(tempfile.mkdtemp(prefix="bench-prefetchrss-"))
    try:
        root = work / "data" / "bench" / "dataset"
        for i in range(args.pages):
            path = root / f"part-{i % 8}" / f"doc-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(rng.randint(30_000, 600_000)))
        for i in range(args.large):
            (root / f"blob-{i}.bin").write_bytes(os.urandom(512 * MIB))
        total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        server = DirS3(work / "data", latency=args.latency).start()
        mnt = work / "mnt"
        mnt.mkdir()
        mount(server, mnt, work / "cache")
        try:
            daemon = next(
                p
                for p in psutil.process_iter(["cmdline"])
                if "--ready-fd" in (p.info["cmdline"] or []) and str(mnt) in p.info["cmdline"]
            )
            peak = 0
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, daemon.memory_info().rss)
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample)
            sampler.start()
            drop_caches()
            jobs = ["--jobs", str(args.jobs)] if args.jobs else []
            cpu0, start = sum(daemon.cpu_times()[:2]), time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "s3cachefs",
                    "prefetch",
                    "dataset",
                    "--mount",
                    str(mnt),
                    *jobs,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            secs = time.perf_counter() - start
            time.sleep(1)
            after = daemon.memory_info().rss
            done.set()
            sampler.join()
            cpu = sum(daemon.cpu_times()[:2]) - cpu0
            print(
                f"{total / 1e6:,.0f} MB in {secs:.1f} s ({total / secs / 1e6:.0f} MB/s), "
                f"daemon CPU {cpu:.1f} s, peak RSS {peak / MIB:.0f} MiB, "
                f"RSS after {after / MIB:.0f} MiB"
            )
        finally:
            cli("unmount", str(mnt))
        server.stop()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

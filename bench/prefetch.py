"""Prefetch throughput: ``s3cachefs prefetch`` next to ``aws s3 sync`` on the same data.

    python -m bench.prefetch [--latency 0.02] [--files 400] [--large 2] [--aws PATH]

A document-image-like dataset (files of 30 KB-600 KB in nested folders plus a
few 64 MiB archives) is served by `bench.dirs3` with ``--latency`` added to
every request. Each tool starts cold (empty cache / empty target dir, page
cache dropped) and the table gives wall time and MB/s. ``aws`` is the AWS CLI
(v1 from PyPI works: install it in its own virtualenv and pass ``--aws``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cli, drop_caches, mount
from bench.dirs3 import DirS3

MIB = 1024 * 1024


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--large", type=int, default=2)
    parser.add_argument("--aws", default=shutil.which("aws"))
    parser.add_argument("--jobs", type=int, default=8, help="s3cachefs prefetch --jobs")
    args = parser.parse_args()
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    rng = random.Random(3)
    work = Path(tempfile.mkdtemp(prefix="bench-prefetch-"))
    try:
        root = work / "data" / "bench" / "dataset"
        for i in range(args.files):
            path = root / f"part-{i % 8}" / f"doc-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(rng.randint(30_000, 600_000)))
        for i in range(args.large):
            (root / f"archive-{i}.tar").write_bytes(rng.randbytes(64 * MIB))
        total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        server = DirS3(work / "data", latency=args.latency).start()
        print(
            f"{args.files} files of 30-600 KB + {args.large} x 64 MiB = {total / 1e6:.0f} MB, "
            f"{args.latency * 1000:.0f} ms per request, {os.cpu_count()} cores"
        )
        rows: list[tuple[str, float]] = []

        mnt = work / "mnt"
        mnt.mkdir()
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        mount(server, mnt, work / "cache")
        try:
            secs = _timed(
                [
                    sys.executable,
                    "-m",
                    "s3cachefs",
                    "prefetch",
                    "dataset",
                    "--mount",
                    str(mnt),
                    "--jobs",
                    str(args.jobs),
                ],
                env,
            )
        finally:
            cli("unmount", str(mnt))
        rows.append((f"s3cachefs prefetch (jobs {args.jobs})", secs))

        if args.aws:
            secs = _timed(
                [
                    args.aws,
                    "s3",
                    "sync",
                    "s3://bench/dataset",
                    str(work / "sync"),
                    "--endpoint-url",
                    server.endpoint_url,
                    "--only-show-errors",
                ],
                env,
            )
            rows.append(("aws s3 sync (default 10 requests)", secs))
            synced = sum(p.stat().st_size for p in (work / "sync").rglob("*") if p.is_file())
            assert synced == total, (synced, total)
        server.stop()
        print(f"{'tool':<36} {'seconds':>8} {'MB/s':>8}")
        for name, secs in rows:
            print(f"{name:<36} {secs:>8.2f} {total / secs / 1e6:>8.1f}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

"""Choose the block size: cold reads through a real mount at several block sizes.

    python -m bench.blocksize [--latency 0.02] [--big-mib 64]

For each block size, a fresh cache dir and mount, against the embedded S3
server with ``--latency`` seconds added to every request (S3's first-byte
latency; loopback has none). Prints one table:

- seq MB/s: ``cat`` of one cold large object (readahead + parallel ranged GETs)
- ttfb ms: first 4 KiB of a cold large object
- small files/s: cold reads of document-image-sized files (30 KB-600 KB)
- rand amp: bytes fetched from S3 / bytes asked, for cold 4 KiB random reads
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

from s3cachefs.cli.locals3 import LocalS3

MIB = 1024 * 1024


def _mount(server: LocalS3, bucket: str, mnt: Path, cache: Path, block: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "s3cachefs",
            "mount",
            bucket,
            str(mnt),
            "--endpoint-url",
            server.endpoint_url,
            "--cache-dir",
            str(cache),
            "--block-size",
            block,
            "--min-free",
            "0",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _unmount(mnt: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "s3cachefs", "unmount", str(mnt)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _measure(
    server: LocalS3, block: str, big: bytes, small: dict[str, bytes], rng: random.Random
) -> tuple[float, float, float, float]:
    """One block size: seq MB/s, first-byte seconds, small files/s, random-read amplification."""
    with tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        _mount(server, "bench", mnt, Path(tmp) / "cache", block)
        try:
            t0 = time.perf_counter()
            with open(mnt / "big.bin", "rb") as f:
                f.read(4096)
            ttfb = time.perf_counter() - t0
            t0 = time.perf_counter()
            subprocess.run(["cat", str(mnt / "big.bin")], stdout=subprocess.DEVNULL, check=True)
            seq = len(big) / (time.perf_counter() - t0) / 1e6
        finally:
            _unmount(mnt)
        _mount(server, "bench", mnt, Path(tmp) / "cache2", block)  # cold again
        try:
            t0 = time.perf_counter()
            for key in small:
                (mnt / key).read_bytes()
            files_s = len(small) / (time.perf_counter() - t0)
            server.reset()
            fd = os.open(mnt / "big.bin", os.O_RDONLY)
            asked = 0
            for _ in range(50):
                asked += len(os.pread(fd, 4096, rng.randrange(len(big) - 4096)))
            os.close(fd)
            fetched = sum(_range_len(r.range) for r in server.gets("/big.bin"))
        finally:
            _unmount(mnt)
    return seq, ttfb, files_s, fetched / asked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--sizes", default="256K,1M,4M,8M")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    rng = random.Random(1)
    server = LocalS3(latency=0.0).start()
    s3 = boto3.client("s3", endpoint_url=server.endpoint_url)
    s3.create_bucket(Bucket="bench")
    big = rng.randbytes(args.big_mib * MIB)
    s3.put_object(Bucket="bench", Key="big.bin", Body=big)
    small = {f"pages/{i:04d}.png": rng.randbytes(rng.randint(30_000, 600_000)) for i in range(60)}
    for key, body in small.items():
        s3.put_object(Bucket="bench", Key=key, Body=body)
    server.stop()
    server = LocalS3(port=server.port, latency=args.latency).start()  # same moto state

    print(
        f"latency {args.latency * 1000:.0f} ms/request, big object {args.big_mib} MiB, "
        f"{len(small)} small files"
    )
    print(f"{'block':>6} {'seq MB/s':>9} {'ttfb ms':>8} {'small files/s':>14} {'rand amp':>9}")
    for block in args.sizes.split(","):
        seq, ttfb, files_s, amp = _measure(server, block, big, small, rng)
        print(f"{block:>6} {seq:>9.1f} {ttfb * 1000:>8.1f} {files_s:>14.1f} {amp:>9.1f}")
    server.stop()


def _range_len(header: str | None) -> int:
    if not header:
        return 0
    start, end = header.removeprefix("bytes=").split("-")
    return int(end) - int(start) + 1


if __name__ == "__main__":
    main()

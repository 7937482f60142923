"""Choose the block size: cold reads through a real mount at several block sizes.

    python -m bench.blocksize [--latency 0.02] [--big-mib 64] [--sizes 256K,1M,4M,8M]

For each block size, a fresh cache dir and mount, against `bench.dirs3` (a
file-backed S3 server: moto's cost per ranged GET grows with the object's
size, which would decide the question for us) with ``--latency`` seconds added
to every request (S3's first-byte latency; loopback has none). One table:

- seq MB/s: ``cat`` of one cold large object (readahead + parallel ranged GETs)
- ttfb ms: first 4 KiB of a cold large object (lookup, LIST, open, one GET)
- small files/s: cold reads of document-image-sized files (30 KB-600 KB), one reader
- rand amp: bytes sent by S3 / bytes asked, for 50 cold 4 KiB random reads
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import cli, mount
from bench.dirs3 import DirS3

MIB = 1024 * 1024


MOUNT_ARGS: list[str] = []  # --mount-args: extra `s3cachefs mount` options for every size


def _mount(server: DirS3, mnt: Path, cache: Path, block: str) -> None:
    mount(server, mnt, cache, "--block-size", block, *MOUNT_ARGS)


def _measure(
    server: DirS3, block: str, big: bytes, small: list[str], rng: random.Random
) -> tuple[float, float, float, float]:
    """One block size: seq MB/s, first-byte seconds, small files/s, random-read amplification."""
    with tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        _mount(server, mnt, Path(tmp) / "cache", block)
        try:
            t0 = time.perf_counter()
            with open(mnt / "big.bin", "rb") as f:
                f.read(4096)
            ttfb = time.perf_counter() - t0
            t0 = time.perf_counter()
            subprocess.run(["cat", str(mnt / "big.bin")], stdout=subprocess.DEVNULL, check=True)
            seq = len(big) / (time.perf_counter() - t0) / 1e6
        finally:
            cli("unmount", str(mnt))
        _mount(server, mnt, Path(tmp) / "cache2", block)  # cold again
        try:
            t0 = time.perf_counter()
            for key in small:
                (mnt / key).read_bytes()
            files_s = len(small) / (time.perf_counter() - t0)
            before = server.bytes_sent
            fd = os.open(mnt / "big.bin", os.O_RDONLY)
            asked = 0
            for _ in range(50):
                asked += len(os.pread(fd, 4096, rng.randrange(len(big) - 4096)))
            os.close(fd)
            amplification = (server.bytes_sent - before) / asked
        finally:
            cli("unmount", str(mnt))
    return seq, ttfb, files_s, amplification


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--sizes", default="256K,1M,4M,8M")
    parser.add_argument("--mount-args", default="", help="e.g. '--readahead 32'")
    args = parser.parse_args()
    MOUNT_ARGS.extend(args.mount_args.split())
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    rng = random.Random(1)
    data = Path(tempfile.mkdtemp(prefix="bench-blocksize-"))
    try:
        (data / "bench" / "pages").mkdir(parents=True)
        big = rng.randbytes(args.big_mib * MIB)
        (data / "bench" / "big.bin").write_bytes(big)
        small = [f"pages/{i:04d}.png" for i in range(60)]
        for key in small:
            (data / "bench" / key).write_bytes(rng.randbytes(rng.randint(30_000, 600_000)))
        server = DirS3(data, latency=args.latency).start()
        print(
            f"latency {args.latency * 1000:.0f} ms/request, one {args.big_mib} MiB object, "
            f"{len(small)} files of 30-600 KB"
        )
        print(f"{'block':>6} {'seq MB/s':>9} {'ttfb ms':>8} {'small files/s':>14} {'rand amp':>9}")
        for block in args.sizes.split(","):
            seq, ttfb, files_s, amp = _measure(server, block, big, small, rng)
            print(f"{block:>6} {seq:>9.1f} {ttfb * 1000:>8.1f} {files_s:>14.1f} {amp:>9.1f}")
        server.stop()
    finally:
        shutil.rmtree(data)


if __name__ == "__main__":
    main()

"""What kernel caching buys: each option on and off, side by side in one run.

    python -m bench.kernelcache [--files 300]

Against `bench.dirs3`, after one cold pass has filled s3cachefs's own cache:

- warm re-read: every file read again in the same mount (page cache kept or dropped)
- stat walk: os.walk + stat of the tree, twice (metadata TTL 60 s vs 0)
- seq from cache: a 128 MiB object after drop_caches, 128 KiB vs 1 MiB kernel readahead

Prints MB/s or walks/s and the FUSE requests the daemon saw (its stats line).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import cli, drop_caches, mount
from bench.dirs3 import DirS3

MIB = 1024 * 1024


def _read_tree(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            total += len((Path(dirpath) / name).read_bytes())
    return total


def _stat_tree(root: Path) -> int:
    count = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.stat(Path(dirpath) / name)
            count += 1
    return count


def _stats(log: Path) -> dict[str, int]:
    line = [ln for ln in log.read_text().splitlines() if " stats " in ln][-1]
    return {k: int(v) for k, v in (f.split("=") for f in line.split(" stats ", 1)[1].split())}


def _case(
    server: DirS3,
    cache: Path,
    options: list[str],
    warm: Callable[[Path], object],
    measure: Callable[[Path], float],
) -> tuple[float, dict[str, int]]:
    """Mount with ``options`` on a filled cache, warm up, measure, return (figure, daemon stats)."""
    with tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        log = Path(tmp) / "daemon.log"
        mount(server, mnt, cache, "--log-file", str(log), *options)
        try:
            warm(mnt)
            figure = measure(mnt)
        finally:
            cli("unmount", str(mnt))
        return figure, _stats(log)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=300)
    args = parser.parse_args()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    rng = random.Random(2)
    work = Path(tempfile.mkdtemp(prefix="bench-kernelcache-"))
    try:
        data = work / "data" / "bench"
        for i in range(args.files):
            path = data / "pages" / f"{i // 50:03d}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(rng.randint(30_000, 300_000)))
        (data / "big.bin").write_bytes(rng.randbytes(128 * MIB))
        server = DirS3(work / "data").start()
        cache = work / "cache"
        _case(server, cache, [], _read_tree, lambda m: 0.0)  # fill our cache
        pages_bytes = sum(p.stat().st_size for p in (data / "pages").rglob("*.png"))

        def reread(mnt: Path) -> float:
            t0 = time.perf_counter()
            _read_tree(mnt / "pages")
            return pages_bytes / (time.perf_counter() - t0) / 1e6

        def walk(mnt: Path) -> float:
            t0 = time.perf_counter()
            for _ in range(5):
                _stat_tree(mnt / "pages")
            return 5 / (time.perf_counter() - t0)

        def seq(mnt: Path) -> float:
            drop_caches()
            t0 = time.perf_counter()
            subprocess.run(["cat", str(mnt / "big.bin")], stdout=subprocess.DEVNULL, check=True)
            return 128 * MIB / (time.perf_counter() - t0) / 1e6

        rows = [
            ("warm re-read, keep_cache", [], lambda m: _read_tree(m / "pages"), reread, "MB/s"),
            (
                "warm re-read, no keep_cache",
                ["--no-keep-cache"],
                lambda m: _read_tree(m / "pages"),
                reread,
                "MB/s",
            ),
            ("stat walk x5, ttl 60", ["--metadata-ttl", "60"], lambda m: None, walk, "walks/s"),
            ("stat walk x5, ttl 0", ["--metadata-ttl", "0"], lambda m: None, walk, "walks/s"),
            ("seq from cache, readahead 1M", [], lambda m: None, seq, "MB/s"),
            (
                "seq from cache, readahead 128K",
                ["--kernel-readahead", "128K"],
                lambda m: None,
                seq,
                "MB/s",
            ),
        ]
        print(f"{args.files} files of 30-300 KB, one 128 MiB object, all in s3cachefs's cache")
        print(
            f"{'case':<32} {'figure':>12} {'fuse reads':>11} {'lookups':>8} {'getattrs':>9} "
            f"{'s3 lists':>9}"
        )
        for name, options, warm_fn, measure, unit in rows:
            figure, stats = _case(server, cache, options, warm_fn, measure)
            print(
                f"{name:<32} {figure:>7.1f} {unit:<4} {stats.get('fuse_read', 0):>11} "
                f"{stats.get('fuse_lookup', 0):>8} {stats.get('fuse_getattr', 0):>9} "
                f"{stats.get('s3_list', 0):>9}"
            )
        server.stop()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

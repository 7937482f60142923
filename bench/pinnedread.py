"""Reading a prefetched dataset: local disk vs the FUSE path vs kernel-served (a bind).

    python -m bench.pinnedread [--files 1000] [--readers 8] [--rounds 3]

Makes ``--files`` files of 30-600 KB in a local folder (the baseline), serves
the same folder through `bench.dirs3`, mounts it twice (``--no-kernel-serve-pinned``
and the default), prefetches the dataset in each, then, for each of the three
paths and each round: drop the page cache, and ``--readers`` processes read
every file once (each reader a disjoint share, in a shuffled order). Prints
MB/s, files/s and the ratio to local disk (median of the rounds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cli, drop_caches, mount
from bench.dirs3 import DirS3


def _read_files(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total


def _one_pass(root: Path, names: list[str], readers: int) -> tuple[float, int]:
    paths = [str(root / n) for n in names]
    random.Random(7).shuffle(paths)
    shares = [paths[i::readers] for i in range(readers)]
    drop_caches()
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(readers) as pool:
        total = sum(pool.map(_read_files, shares))
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    work = Path(tempfile.mkdtemp(prefix="pinnedread-"))
    rng = random.Random(1)
    names = []
    data = work / "s3" / "bench" / "ds"
    for i in range(args.files):
        name = f"d{i % 20:02d}/page-{i:05d}.png"
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(rng.randbytes(rng.randint(30_000, 600_000)))
        names.append(name)
    server = DirS3(work / "s3").start()
    mounts = {"fuse": work / "mnt-fuse", "kernel": work / "mnt-kernel"}
    try:
        for label, mnt in mounts.items():
            mnt.mkdir()
            extra = ("--no-kernel-serve-pinned",) if label == "fuse" else ()
            mount(server, mnt, work / f"cache-{label}", *extra)
            cli("prefetch", "ds", "--mount", str(mnt))
        bound = subprocess.run(["findmnt", "-rn", str(mounts["kernel"] / "ds")], check=False)
        print(f"kernel-served bind present: {bound.returncode == 0}", file=sys.stderr)
        roots = {"local": data, "fuse": mounts["fuse"] / "ds", "kernel": mounts["kernel"] / "ds"}
        times: dict[str, list[float]] = {k: [] for k in roots}
        nbytes = 0
        for _ in range(args.rounds):
            for label, root in roots.items():
                seconds, nbytes = _one_pass(root, names, args.readers)
                times[label].append(seconds)
        local = statistics.median(times["local"])
        print(
            f"{args.files} files, {nbytes / 1e6:.0f} MB, {args.readers} readers, "
            f"page cache dropped before each pass, median of {args.rounds}"
        )
        for label in roots:
            t = statistics.median(times[label])
            runs = ", ".join(f"{x:.2f}s" for x in times[label])
            print(
                f"  {label:<7} {nbytes / t / 1e6:8.1f} MB/s {args.files / t:8.0f} files/s"
                f"  {local / t:5.2f}x local   (runs: {runs})"
            )
    finally:
        for mnt in mounts.values():
            if mnt.exists() and os.path.ismount(mnt):
                subprocess.run(
                    [sys.executable, "-m", "s3cachefs", "unmount", str(mnt)],
                    check=False,
                    stdout=subprocess.DEVNULL,
                )
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""W4 (walk + stat of a prefetched dataset) on every path that can serve it, side by side.

    python -m bench.walkstat [--pages 1000] [--rounds 5] [--shard I/N]

Makes ``--pages`` small files in ``dataset-v3/shard-NN/page-NNNNN.png`` (the
bench's layout, 250 a directory) in a local folder, serves it through
`bench.dirs3`, mounts it twice (the default, and ``--no-kernel-serve-pinned``),
prefetches the dataset (``--shard``: that shard only, in the default mount),
then, each round, drops the page cache and walks (`bench.workloads.walk`):

- ``local``: the local folder (the baseline);
- ``kernel``: the default mount's dataset directory (an overlay of the tree over FUSE);
- ``tree``: the tree itself (``CACHE/v1/trees/<id>``): the best the kernel can do;
- ``fuse``: the ``--no-kernel-serve-pinned`` mount (every request through the daemon);
- ``ovl-unmarked`` / ``ovl-marked``: overlays of copies of the tree (hard links) over the
  ``fuse`` mount's dataset directory, with every directory merged (as before opaque marks,
  `datasets.kernelopaque`) or marked as the daemon marks them; ``ovl-empty``: the
  marked copy over an empty directory (no FUSE below: what overlayfs itself costs).

Prints entries/s and the ratio to local disk (median of the rounds), and the
FUSE requests each mount's daemon served during the walks (``status --json``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bench import peers
from bench.common import cli, drop_caches, mount
from bench.dirs3 import DirS3
from bench.workloads import walk

PREFIX = "dataset-v3"
OPAQUE = "trusted.overlay.opaque"
OWN = ("unmarked", "marked", "empty")  # the overlays walkstat mounts itself


def fuse_requests(mnt: Path) -> dict[str, int]:
    counts: dict[str, int] = peers.status(mnt)["fuse_requests"]
    return counts


def tree_of(target: Path) -> Path | None:
    """The top tree of the overlay (or the source of the bind) on ``target``."""
    out = subprocess.run(
        ["findmnt", "-rn", "-o", "FSTYPE,OPTIONS", str(target)],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.split()
    for option in out[1].split(",") if len(out) > 1 else []:
        name, _, value = option.partition("=")
        if name in ("lowerdir+", "lowerdir"):
            return Path(value.split(":")[0])
    return None


def own_overlay(tree: Path, fuse_dir: Path, work: Path, label: str) -> Path:
    """An overlay like the daemon's (a copy of its tree over a FUSE directory) on a
    directory of its own: ``unmarked``, every directory merged (before opaque marks)."""
    copy, target = work / f"tree-{label}", work / f"ovl-{label}"
    subprocess.run(["cp", "-al", str(tree), str(copy)], check=True)
    if label == "empty":  # no FUSE below: what the overlay itself costs
        fuse_dir = work / "empty"
        fuse_dir.mkdir()
    if label == "unmarked":
        for dirpath, _, _ in os.walk(copy):
            if OPAQUE in os.listxattr(dirpath):
                os.removexattr(dirpath, OPAQUE)
    target.mkdir()
    options = f"ro,xino=auto,lowerdir={copy}:{fuse_dir}"
    subprocess.run(["mount", "-t", "overlay", "walkstat", "-o", options, str(target)], check=True)
    return target


def make_dataset(data: Path, pages: int) -> None:
    rng = random.Random(1)
    for i in range(pages):
        path = data / f"shard-{i // 250:02d}" / f"page-{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(1_000, 8_000)))


def measure(roots: dict[str, Path], served_by: dict[str, Path], rounds: int) -> None:
    """Each round, each path: drop the page cache, walk; the FUSE requests of the walk
    (``served_by``: the mount whose daemon a path's walk may reach)."""
    rates: dict[str, list[float]] = {k: [] for k in roots}
    asked: dict[str, dict[str, int]] = {k: {} for k in roots}
    entries: dict[str, int] = {}
    for _ in range(rounds):
        for label, root in roots.items():
            mnt = served_by.get(label)
            before = fuse_requests(mnt) if mnt else {}
            drop_caches()
            secs, n = walk(root)
            rates[label].append(n / secs)
            entries[label] = n
            for op, count in (fuse_requests(mnt) if mnt else {}).items():
                if count - before.get(op, 0):
                    asked[label][op] = asked[label].get(op, 0) + count - before.get(op, 0)
    local = statistics.median(rates["local"])
    print(f"load: {os.getloadavg()}; {rounds} rounds, page cache dropped before each walk")
    print(f"{'path':12} {'entries':>7} {'entries/s':>9} {'vs local':>8}  passes (k entries/s)")
    for label, values in rates.items():
        med = statistics.median(values)
        passes = " ".join(f"{v / 1000:.0f}" for v in values)
        print(f"{label:12} {entries[label]:7} {med:9.0f} {med / local:7.2f}x  {passes}")
    for label, ops in asked.items():
        if label in served_by:
            per_walk = ", ".join(f"{op} {n / rounds:.0f}" for op, n in sorted(ops.items()))
            print(f"FUSE requests per walk, {label}: {per_walk or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shard", default="")
    args = parser.parse_args()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    work = Path(tempfile.mkdtemp(prefix="walkstat-"))
    data = work / "s3" / "bench" / PREFIX
    make_dataset(data, args.pages)
    server = DirS3(work / "s3").start()
    mounts = {"kernel": work / "mnt-kernel", "fuse": work / "mnt-fuse"}
    try:
        for label, mnt in mounts.items():
            mnt.mkdir()
            extra = ("--no-kernel-serve-pinned",) if label == "fuse" else ()
            mount(server, mnt, work / f"cache-{label}", *extra)
            shard = ("--shard", args.shard) if args.shard and label == "kernel" else ()
            cli("prefetch", PREFIX, "--mount", str(mnt), *shard)
        tree = tree_of(mounts["kernel"] / PREFIX)
        print(f"kernel-served tree: {tree}", file=sys.stderr)
        roots = {
            "local": data,
            "kernel": mounts["kernel"] / PREFIX,
            "fuse": mounts["fuse"] / PREFIX,
        }
        served_by = {"kernel": mounts["kernel"], "fuse": mounts["fuse"]}
        if tree is not None:
            roots["tree"] = tree
            for label in OWN:
                roots[f"ovl-{label}"] = own_overlay(tree, mounts["fuse"] / PREFIX, work, label)
                served_by[f"ovl-{label}"] = mounts["fuse"]
        measure(roots, served_by, args.rounds)
    finally:
        cleanup(work, mounts.values())
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def cleanup(work: Path, mounts: Iterable[Path]) -> None:
    for label in OWN:
        if (work / f"ovl-{label}").exists():
            subprocess.run(["umount", str(work / f"ovl-{label}")], check=False)
    for mnt in mounts:
        if mnt.exists():
            for lazy in ((), ("--lazy",)):  # lazy if busy: never leave a mount behind
                done = subprocess.run(
                    [sys.executable, "-m", "s3cachefs", "unmount", str(mnt), *lazy],
                    check=False,
                    stdout=subprocess.DEVNULL,
                )
                if done.returncode == 0:
                    break


if __name__ == "__main__":
    main()

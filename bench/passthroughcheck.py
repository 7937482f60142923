"""Spike (issue 13): hand checks of FUSE passthrough (`fs.passthrough`), not a benchmark.

    python -m bench.passthroughcheck [--small] [--mode 1|memo|keep]

Needs the patched pyfuse3 (`packaging/build-passthrough.sh`), root, Linux >= 6.9.
On one mount with ``S3CACHEFS_PASSTHROUGH=MODE`` and a 2 s metadata TTL:
1. every page read once (FUSE path), then again: byte-exact, each open passed through;
2. a cache file damaged on disk: its open is not passed through, its read is right
   (the CRC-checked path drops and refetches the block);
3. an object changed in S3: a handle opened before keeps the old bytes; after the
   TTL a new open reads the new bytes whole (never a mix), passed through once cached.
Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from bench import peers, standalone
from bench.dataset import Dataset
from bench.network import Network
from bench.report import Report

TTL = 2.0


def counts(fs: peers.S3CacheFS) -> dict[str, int]:
    status = fs.status()
    merged: dict[str, int] = dict(status["fuse_requests"])
    merged["corrupt_blocks"] = int(status.get("cache", {}).get("corrupt_blocks", 0))
    return merged


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        raise SystemExit(1)


def cache_file_of(cache: Path, content: bytes) -> Path:
    """The cache data file holding exactly ``content`` (the object's whole file)."""
    for path in cache.rglob("*"):
        if path.is_file() and path.stat().st_size == len(content) and path.read_bytes() == content:
            return path
    raise LookupError("no cache file holds these bytes")


def run(mode: str, net: Network, bucket: Path, local: Path, data: Dataset, work: Path) -> None:
    os.environ.update({"S3CACHEFS_PASSTHROUGH": mode, "S3CACHEFS_METADATA_TTL": str(TTL)})
    fs = peers.S3CacheFS(net.endpoint_url, work)
    fs.start()
    try:
        pages = [key for key, _ in data.pages]
        check_pages(fs, local, pages)
        check_damage(fs, local, pages[0])
        check_change(fs, net, bucket, local, pages[1])
        check_kill(fs, local, pages[2])
    finally:
        fs.stop()
        shutil.rmtree(work, ignore_errors=True)


def check_pages(fs: peers.S3CacheFS, local: Path, pages: list[str]) -> None:
    for key in pages:  # the first pass: FUSE, from S3
        (fs.mnt / key).read_bytes()
    before = counts(fs)
    same = all((fs.mnt / key).read_bytes() == (local / key).read_bytes() for key in pages)
    after = counts(fs)
    passed = after.get("open_passthrough", 0) - before.get("open_passthrough", 0)
    reads = after.get("read", 0) - before.get("read", 0)
    check(same, f"{len(pages)} pages byte-exact on the second pass")
    check(passed == len(pages), f"{passed} of {len(pages)} opens passed through, {reads} READs")


def check_damage(fs: peers.S3CacheFS, local: Path, key: str) -> None:
    right = (local / key).read_bytes()
    damaged = cache_file_of(fs.cache, right)
    with open(damaged, "r+b") as f:  # one byte flipped inside the first block
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = counts(fs)
    got = (fs.mnt / key).read_bytes()
    after = counts(fs)
    passed = after.get("open_passthrough", 0) - before.get("open_passthrough", 0)
    corrupt = after["corrupt_blocks"] - before["corrupt_blocks"]
    check(passed == 0, "a damaged cache file is not passed through")
    check(got == right, f"its read is byte-exact (the FUSE path; {corrupt} corrupt block seen)")
    got = (fs.mnt / key).read_bytes()
    passed = counts(fs).get("open_passthrough", 0) - after.get("open_passthrough", 0)
    check(got == right and passed == 1, "refetched whole, the next open passes through again")


def check_change(fs: peers.S3CacheFS, net: Network, bucket: Path, local: Path, key: str) -> None:
    old = (local / key).read_bytes()
    new = bytes(b ^ 0x5A for b in old)
    with open(fs.mnt / key, "rb") as held:  # opened (and passed through) before the change
        head = held.read(1000)
        (bucket / key).write_bytes(new)
        net.rescan()
        time.sleep(TTL + 1)
        rest = held.read()
    check(head + rest == old, "a handle opened before the change reads the old bytes whole")
    first = (fs.mnt / key).read_bytes()
    check(first == new, "after the TTL a new open reads the new bytes whole")
    before = counts(fs)
    second = (fs.mnt / key).read_bytes()
    passed = counts(fs).get("open_passthrough", 0) - before.get("open_passthrough", 0)
    check(second == new and passed == 1, "the new version, cached, is passed through")
    (bucket / key).write_bytes(old)
    net.rescan()


def check_kill(fs: peers.S3CacheFS, local: Path, key: str) -> None:
    """kill -9 of the daemon under a reader of a passed-through file (then the stale
    mount is cleaned by ``stop``: ``s3cachefs unmount``)."""
    right = (local / key).read_bytes()
    with open(fs.mnt / key, "rb") as held:
        head = held.read(1000)
        os.kill(fs.pid, signal.SIGKILL)
        time.sleep(1)
        try:
            rest = held.read()
            outcome = "read on" if head + rest == right else "WRONG BYTES"
        except OSError as exc:
            outcome = f"{exc.strerror}"
    print(f"info kill -9 under an open passed-through file: the reader got: {outcome}")
    check(outcome != "WRONG BYTES", "no wrong bytes after kill -9")
    try:
        (fs.mnt / key).read_bytes()
        after = "read"
    except OSError as exc:
        after = exc.strerror or str(exc)
    print(f"info a new open after kill -9: {after}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.passthroughcheck", description=__doc__)
    parser.add_argument("--mode", default="1", choices=["1", "memo", "keep"])

    def workload(
        args: argparse.Namespace,
        _report: Report,
        net: Network,
        bucket: Path,
        local: Path,
        data: Dataset,
        scratch: Callable[[str], Path],
    ) -> None:
        run(args.mode, net, bucket, local, data, scratch("passthrough-check"))

    standalone.main(parser, "s3cachefs-ptcheck-", workload)


if __name__ == "__main__":
    main()

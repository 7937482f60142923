"""W6, the cluster scenario: one node's shard read by 8 workers, a dataset at the mount root,
and files cached by reading.

    python -m bench.cluster [--small] [--pages N] [--rounds 3] [--json PATH]
    python -m bench --only w6 [--small]          # the same, inside the suite

A cluster of 4 nodes shares one dataset: node 0 runs ``s3cachefs prefetch
dataset-v3 --shard 0/4 --list-out keys`` and its 8 workers read exactly the
keys in ``keys``. Measured against local disk reading the same files, cold
(``drop_caches`` before the pass) and warm (the pass after), the median of
``--rounds`` rounds, local and s3cachefs alternating within a round (the
machine is shared). Checked on the same mount: S3 requests while the shard is
read (must be 0), ``ls -lR`` of the dataset shows every key (not only the
shard's), ``stat`` of a shard file and of a non-shard file, and a non-shard
file read byte-exact (lazily, through FUSE).

Then the same pages through two other paths:
- **mount root**: ``s3cachefs mount bench/dataset-v3 MNT`` then ``prefetch .``
  (the W2 figures of a dataset whose directory is the mount itself);
- **cached by reading**: a fresh mount, no prefetch, every page read once
  (from S3), then the timed passes over files that are complete in the cache, on
  the FUSE path and with ``--read-serve --metadata-ttl indefinite`` (opt-in).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import peers, standalone, workloads
from bench.common import drop_caches
from bench.dataset import PREFIX, Dataset
from bench.network import Network
from bench.report import Report, Row

MB = 1e6
W = "W6 cluster"
SHARD = "0/4"
READERS = 8


def fuse_requests(mount: peers.S3CacheFS) -> dict[str, int]:
    """The daemon's FUSE request counters (``status --json``): 0 opens = the kernel served."""
    counts: dict[str, int] = mount.status()["fuse_requests"]
    return counts


def prefetch(mount: peers.S3CacheFS, *args: str) -> str:
    """Run ``s3cachefs prefetch ARGS --mount MNT``; returns "" or the error line."""
    done = subprocess.run(
        [mount.cli, "prefetch", *args, "--mount", str(mount.mnt)],
        check=False,
        env=peers.env(),
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        return ""
    return (
        done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    )


class Cluster:
    """The W6 rows, added to ``report``; every mount made here is stopped here."""

    def __init__(
        self,
        report: Report,
        net: Network,
        local: Path,
        data: Dataset,
        scratch: Callable[[str], Path],
        rounds: int = 3,
        parts: str = "",
        read_systems: str = "fuse,read-serve",
    ) -> None:
        self.parts = parts.split(",") if parts else []  # of shard, mount_root, cached_by_reading
        self.read_systems = read_systems.split(",")  # of fuse, passthrough, read-serve
        self.report = report
        self.net = net
        self.local = local  # holds dataset-v3/... exactly as the bucket does
        self.data = data
        self.scratch = scratch
        self.rounds = rounds

    def run(self) -> None:
        for part in (self.shard, self.mount_root, self.cached_by_reading):
            if self.parts and part.__name__ not in self.parts:
                continue
            try:
                part()
            except Exception as exc:
                self.report.note(f"{W} {part.__name__}: failed: {exc!r}")

    # ---- the measurements --------------------------------------------------------

    def compare(self, system: str, local: list[Path], ours: list[Path], what: str) -> None:
        """Cold and warm MB/s of ``READERS`` processes, local vs ours, medians of the rounds."""
        mbps: dict[tuple[str, str], list[float]] = {}
        for _ in range(self.rounds):
            for name, paths in (("local disk", local), (system, ours)):
                drop_caches()
                for mode in ("cold", "warm"):
                    secs, n = workloads.read_all(paths, READERS)
                    mbps.setdefault((name, mode), []).append(n / secs / MB)
        files = len(ours)
        targets = {"cold": ">= 0.8", "warm": ">= 0.9"}
        if what == "cached by reading":
            targets = {"cold": ">= 0.5", "warm": ""}
        for mode, target in targets.items():
            base = statistics.median(mbps[("local disk", mode)])
            value = statistics.median(mbps[(system, mode)])
            measure = f"{what}: {files} files, {mode}, {READERS} readers"
            self.report.add(Row(W, "local disk", "-", measure, base, "MB/s"))
            self.report.add(
                Row(W, system, "-", measure, value, "MB/s", value / base, "vs local", target)
            )

    def shard(self) -> None:
        """Node 0 of 4: prefetch the shard, read exactly its keys; the checks on the same mount."""
        fs = peers.S3CacheFS(self.net.endpoint_url, self.scratch("w6-shard"))
        fs.start()
        try:
            keys_file = fs.cache.parent / "keys"
            self.net.reset()
            error = prefetch(fs, PREFIX, "--shard", SHARD, "--list-out", str(keys_file))
            if error:
                raise RuntimeError(f"prefetch --shard {SHARD}: {error}")
            keys = keys_file.read_text().split()
            self.report.note(
                f"{W}: prefetch --shard {SHARD} listed {len(keys)} of {self.data.count} keys"
                f" ({self.net.requests()} S3 requests)"
            )
            before = fuse_requests(fs)
            self.net.reset()
            self.compare(
                "s3cachefs",
                [self.local / k for k in keys],
                [fs.mnt / k for k in keys],
                f"shard {SHARD}",
            )
            requests = self.net.requests()
            if requests:
                self.report.note(f"{W}: S3 requests while the shard was read: {self.net.stats()}")
            opens = fuse_requests(fs).get("open", 0) - before.get("open", 0)
            measure = "S3 requests while the shard is read"
            self.report.add(Row(W, "s3cachefs", "-", measure, requests, "requests", target="== 0"))
            self.report.add(
                Row(W, "s3cachefs", "-", "FUSE opens while the shard is read", opens, "opens")
            )
            self.checks(fs, set(keys))
        finally:
            fs.stop()
            shutil.rmtree(fs.cache.parent, ignore_errors=True)

    def checks(self, fs: peers.S3CacheFS, shard_keys: set[str]) -> None:
        """``ls -lR`` shows every key; stat and a lazy read of a file outside the shard."""
        listed = 0
        for dirpath, _dirs, files in os.walk(fs.data):
            for name in files:
                os.lstat(os.path.join(dirpath, name))
                listed += 1
        self.report.add(
            Row(
                W,
                "s3cachefs",
                "-",
                "ls -lR of the dataset: files listed",
                listed,
                "files",
                target=f"== {self.data.count}",
            )
        )
        all_keys = [k for k, _ in self.data.pages]
        inside = next(k for k in all_keys if k in shard_keys)
        outside = next(k for k in all_keys if k not in shard_keys)
        ok = all(
            os.stat(fs.mnt / k).st_size == os.stat(self.local / k).st_size
            for k in (inside, outside)
        )
        self.net.reset()
        same = (fs.mnt / outside).read_bytes() == (self.local / outside).read_bytes()
        gets = self.net.requests()
        self.report.add(
            Row(
                W,
                "s3cachefs",
                "-",
                f"stat in+out of shard, read out byte-exact ({gets} S3 requests)",
                float(ok and same),
                "ok",
                target="== 1",
            )
        )

    def mount_root(self) -> None:
        """``mount bench/dataset-v3 MNT`` + ``prefetch .``: W2 over every page."""
        fs = peers.S3CacheFS(
            self.net.endpoint_url, self.scratch("w6-root"), target=f"{peers.BUCKET}/{PREFIX}"
        )
        fs.start()
        try:
            error = prefetch(fs, ".")
            measure = "mount root: prefetch . (the whole mount)"
            self.report.add(
                Row(W, "s3cachefs", "-", measure, float(not error), "ok", target="== 1")
            )
            if error:
                self.report.note(f"{W} mount root: `prefetch .` failed: {error}")
                for mode, target in (("cold", ">= 0.8"), ("warm", ">= 0.9")):
                    self.report.add(
                        Row(
                            W,
                            "s3cachefs",
                            "-",
                            f"mount root: all pages, {mode}, {READERS} readers",
                            0.0,
                            "not measured",
                            target=target,
                        )
                    )
                return
            pages = [k for k, _ in self.data.pages]
            self.compare(
                "s3cachefs",
                [self.local / k for k in pages],
                [fs.mnt / k.split("/", 1)[1] for k in pages],
                "mount root: all pages",
            )
        finally:
            fs.stop()
            shutil.rmtree(fs.cache.parent, ignore_errors=True)

    def cached_by_reading(self) -> None:
        """No prefetch: every page read once (from S3), then the timed passes; with the
        root overlay of read files (`datasets.readserve`: opt-in, `--read-serve
        --metadata-ttl indefinite`, immutable data) and without it (the FUSE path)."""
        # Passthrough is on by default where available: the FUSE path and the overlay
        # are measured with it off; "default" is the daemon with no flag.
        off = {"S3CACHEFS_PASSTHROUGH": "false"}
        on = {"S3CACHEFS_READ_SERVE": "true", "S3CACHEFS_METADATA_TTL": "indefinite", **off}
        passthrough = {"S3CACHEFS_PASSTHROUGH": "true"}  # needs the patched pyfuse3
        systems = {
            "fuse": ("s3cachefs --no-passthrough", off),
            "passthrough": ("s3cachefs --passthrough", passthrough),
            "default": ("s3cachefs (no flag)", {}),
            "read-serve": ("s3cachefs --read-serve", on),
        }
        for system, extra in (systems[name] for name in self.read_systems):
            fs = peers.S3CacheFS(self.net.endpoint_url, self.scratch("w6-read"))
            saved = {k: os.environ.pop(k, None) for k in {**on, **passthrough}}
            os.environ.update(extra)
            try:
                fs.start()
            finally:
                for key, value in saved.items():
                    os.environ.pop(key, None)
                    if value is not None:
                        os.environ[key] = value
            try:
                self._cached_by_reading(fs, system, "S3CACHEFS_READ_SERVE" not in extra)
            finally:
                fs.stop()
                shutil.rmtree(fs.cache.parent, ignore_errors=True)

    def _cached_by_reading(self, fs: peers.S3CacheFS, system: str, off: bool) -> None:
        pages = [k for k, _ in self.data.pages]
        ours = [fs.mnt / k for k in pages]
        drop_caches()
        secs, n = workloads.read_all(ours, READERS)
        self.report.note(f"{W} cached by reading: first pass {n / secs / MB:,.0f} MB/s from S3")
        if not off:  # the files go into the overlay in batches, a few seconds after their read
            linked = wait_linked(fs, len(pages))
            self.report.note(f"{W} cached by reading: {linked} of {len(pages)} files linked")
        self.net.reset()
        before = fuse_requests(fs)
        self.compare(system, [self.local / k for k in pages], ours, "cached by reading")
        after = fuse_requests(fs)
        opens = after.get("open", 0) - before.get("open", 0)
        reads = len(pages) * self.rounds * 2  # cold and warm passes
        per_file = {
            op: (after.get(op, 0) - before.get(op, 0)) / reads
            for op in ("lookup", "getattr", "open", "open_passthrough", "read", "release")
        }
        shown = ", ".join(f"{op} {n:.2f}" for op, n in per_file.items())
        self.report.note(f"{W} cached by reading, {system}: FUSE requests per file read: {shown}")
        measure = "cached by reading: S3 requests in the timed passes"
        self.report.add(Row(W, system, "-", measure, self.net.requests(), "requests"))
        measure = "cached by reading: FUSE opens in the timed passes"
        self.report.add(Row(W, system, "-", measure, opens, "opens"))


def wait_linked(fs: peers.S3CacheFS, files: int, timeout: float = 120) -> int:
    """Until ``files`` are linked or the count stops growing with nothing waiting."""
    deadline = time.monotonic() + timeout
    linked = 0
    while time.monotonic() < deadline:
        state = fs.status().get("read_serve") or {}
        linked = int(state.get("files", 0))
        if linked >= files or (linked and not state.get("waiting")):
            break
        time.sleep(0.5)
    return linked


def main() -> None:
    """Standalone: the dataset, the local S3 server, W6, one table."""
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--parts", default="", help="comma list of shard, mount_root, cached_by_reading (all)"
    )
    parser.add_argument(
        "--read-systems",
        default="fuse,read-serve",
        help="cached_by_reading: fuse, passthrough, default, read-serve (repeats alternate)",
    )
    standalone.main(
        parser,
        "s3cachefs-w6-",
        lambda args, report, net, _bucket, local, data, scratch: Cluster(
            report, net, local, data, scratch, args.rounds, args.parts, args.read_systems
        ).run(),
    )


if __name__ == "__main__":
    main()

"""Sync-before-Run that only moves what changed (issue 12): incremental refresh, content reuse.

    python -m bench --only refresh [--small]      # inside the suite, on the first profile
    python -m bench.refresh [--small] [--pages N] [--json PATH]   # standalone, local profile

- **Refresh**: prefetch ``dataset-v3``, change 1 % of its pages in S3 (40 of
  4,000; new bytes, a new ETag), prefetch again on the same mount: the S3 GETs
  counted at the server (target: exactly the changed objects), the seconds, and
  whether the kernel-served tree swapped (the dataset is served by the kernel
  from a new tree, and the changed files read back with their new bytes with no
  FUSE open and no S3 request).
- **Reuse**: ``dataset-v4`` shares 95 % of v3's pages and every large object
  (the same bytes under other keys) and has 5 % new pages. On the mount where
  v3 is pinned, ``prefetch dataset-v4``: GETs (target: the new pages only) and
  seconds, against a cold prefetch of v4 on a fresh cache.

The changes are made in the S3 server's folder and taken in by the server
(`bench.dirs3` ``/_bench/rescan``); every change is undone at the end, so the
other workloads see the dataset as generated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import peers, standalone
from bench.cluster import fuse_requests
from bench.common import drop_caches
from bench.dataset import PREFIX, Dataset
from bench.network import Network
from bench.report import Report, Row

V4 = "dataset-v4"
CHANGED = 0.01  # of the pages, changed in S3 for the refresh
NEW_IN_V4 = 0.05  # of the pages, new in v4; the rest and every large object shared


def prefetch(fs: peers.S3CacheFS, dataset: str) -> tuple[float, dict[str, Any]]:
    """``s3cachefs prefetch DATASET --json`` after drop_caches: (seconds, its final event)."""
    drop_caches()
    start = time.perf_counter()
    done = subprocess.run(
        [fs.cli, "prefetch", dataset, "--mount", str(fs.mnt), "--json"],
        check=False,
        env=peers.env(),
        capture_output=True,
        text=True,
    )
    secs = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    final: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if done.returncode or not final.get("ok"):
        raise RuntimeError(f"prefetch {dataset}: exit {done.returncode}: {done.stderr[-500:]}")
    return secs, final


def served_by(fs: peers.S3CacheFS, dataset: str) -> str | None:
    """The id of the mount the kernel serves ``dataset`` through (the top one on its
    directory, /proc/self/mountinfo) if ``status --json`` says it is kernel-served."""
    served = any(
        e["dataset"] == dataset and e.get("kernel_served") for e in fs.status()["datasets"]
    )
    target = str(fs.mnt / dataset)
    ids = [
        line.split()[0]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == target
    ]
    return ids[-1] if served and ids else None


class Refresh:
    """The refresh and reuse rows, added to ``report``; every mount made here is stopped
    here, every change to the bucket undone."""

    def __init__(
        self,
        report: Report,
        net: Network,
        bucket_dir: Path,
        data: Dataset,
        scratch: Callable[[str], Path],
    ) -> None:
        self.report = report
        self.net = net
        self.bucket_dir = bucket_dir  # the S3 server's folder of bucket `bench`
        self.data = data
        self.scratch = scratch
        self.rng = random.Random(12)
        pages = [key for key, _ in data.pages]
        self.changed = pages[:: round(1 / CHANGED)][: max(1, round(len(pages) * CHANGED))]
        self.aside = scratch("refresh-originals")  # the changed pages' originals

    def run(self) -> None:
        fs = peers.S3CacheFS(self.net.endpoint_url, self.scratch("refresh"))
        fs.start()
        try:
            prefetch(fs, PREFIX)
            for part in (self.refresh, self.reuse):
                try:
                    part(fs)
                except Exception as exc:
                    self.report.note(f"{part.__name__}: failed: {exc!r}")
        finally:
            fs.stop()
            shutil.rmtree(fs.cache.parent, ignore_errors=True)
            self.undo()

    def gets(self) -> int:
        requests = self.net.stats()["requests"]
        assert isinstance(requests, dict)
        return int(requests.get("get", 0))

    def add(self, measure: str, value: float, unit: str, **more: Any) -> None:
        self.report.add(
            Row(
                "refresh/reuse",
                "s3cachefs prefetch",
                self.net.profile.name,
                measure,
                value,
                unit,
                **more,
            )
        )

    # ---- refresh ------------------------------------------------------------------

    def refresh(self, fs: peers.S3CacheFS) -> None:
        pages, changed = [key for key, _ in self.data.pages], self.changed
        new: dict[str, bytes] = {}
        for n, key in enumerate(changed):
            path = self.bucket_dir / key
            new[key] = self.rng.randbytes(path.stat().st_size)
            os.replace(path, self.aside / str(n))  # the original, back at the end (`undo`)
            path.write_bytes(new[key])
        self.net.rescan()
        before = served_by(fs, PREFIX)
        self.net.reset()
        secs, final = prefetch(fs, PREFIX)
        gets = self.gets()
        what = f"{len(changed)} of {len(pages):,} pages changed"
        self.add(f"refresh, {what}: GETs", gets, "GETs", target=f"== {len(changed)}")
        self.add(f"refresh, {what}: seconds", secs, "s")
        # The kernel serves the new tree: the changed files, new bytes, no FUSE, no S3.
        after = served_by(fs, PREFIX)
        drop_caches()
        opens = fuse_requests(fs).get("open", 0)
        self.net.reset()
        same = all((fs.mnt / key).read_bytes() == body for key, body in new.items())
        opens = fuse_requests(fs).get("open", 0) - opens
        swapped = after is not None and after != before and same
        self.report.note(
            f"refresh: {final['bytes_fetched'] / 1e6:,.1f} MB fetched; kernel-served by mount "
            f"{before} -> {after}; the {len(changed)} changed files read back "
            f"{'exact' if same else 'WRONG'} with {opens} FUSE opens and "
            f"{self.net.requests()} S3 requests"
        )
        self.add(
            f"refresh: kernel-served tree swapped, changed files new ({opens} FUSE opens)",
            float(swapped and opens == 0),
            "ok",
            target="== 1",
        )

    # ---- reuse ----------------------------------------------------------------------

    def reuse(self, fs: peers.S3CacheFS) -> None:
        pages = [key for key, _ in self.data.pages]
        new = set(pages[:: round(1 / NEW_IN_V4)])
        for key in pages + [key for key, _ in self.data.large]:
            path = self.bucket_dir / key
            target = self.bucket_dir / key.replace(PREFIX, V4, 1)
            target.parent.mkdir(parents=True, exist_ok=True)
            if key in new:
                target.write_bytes(self.rng.randbytes(path.stat().st_size))
            else:
                os.link(path, target)  # the same bytes under another key
        self.net.rescan()
        shared = self.data.count - len(new)
        what = f"v4 sharing {shared:,} of {self.data.count:,} objects with v3"
        self.net.reset()
        secs, final = prefetch(fs, V4)
        gets = self.gets()
        cold = peers.S3CacheFS(self.net.endpoint_url, self.scratch("refresh-cold"))
        cold.start()
        try:
            self.net.reset()
            cold_secs, _ = prefetch(cold, V4)
            cold_gets = self.gets()
        finally:
            cold.stop()
            shutil.rmtree(cold.cache.parent, ignore_errors=True)
        self.report.note(f"reuse: {final.get('reused') or 'nothing reused'}")
        self.add(f"reuse, {what}: GETs", gets, "GETs", target=f"== {len(new)}")
        self.add(
            f"reuse, {what}: seconds",
            secs,
            "s",
            ratio=cold_secs / secs,
            versus=f"faster than a cold prefetch of v4 ({cold_secs:.1f} s)",
        )
        self.add("cold prefetch of v4 (fresh cache): GETs", cold_gets, "GETs")

    def undo(self) -> None:
        """The bucket as generated: v4 gone, the changed pages back."""
        shutil.rmtree(self.bucket_dir / V4, ignore_errors=True)
        for n, key in enumerate(self.changed):
            if (self.aside / str(n)).exists():
                os.replace(self.aside / str(n), self.bucket_dir / key)
        shutil.rmtree(self.aside, ignore_errors=True)
        self.net.rescan()


def main() -> None:
    """Standalone: the dataset, the local S3 server, the refresh and reuse rows, one table."""
    parser = argparse.ArgumentParser(prog="python -m bench.refresh", description=__doc__)
    standalone.main(
        parser,
        "s3cachefs-refresh-",
        lambda _args, report, net, bucket, _local, data, scratch: Refresh(
            report, net, bucket, data, scratch
        ).run(),
    )


if __name__ == "__main__":
    main()

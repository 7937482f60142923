"""What every benchmark does: run the CLI, mount the bench bucket, drop the page cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.dirs3 import DirS3


def cli(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "s3cachefs", *args], check=True, stdout=subprocess.DEVNULL
    )


def mount(server: DirS3, mnt: Path, cache: Path, *options: str) -> None:
    """Mount bucket ``bench`` of ``server`` (no --min-free: benchmarks fill the disk on purpose)."""
    cli(
        "mount",
        "bench",
        str(mnt),
        "--endpoint-url",
        server.endpoint_url,
        "--cache-dir",
        str(cache),
        "--min-free",
        "0",
        *options,
    )


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")

"""The W1 row of ``s3cachefs sync`` (issue 16): the dataset into a plain directory, no daemon.

Measured like the peers' copies (``aws s3 sync``, ``rclone copy``): page cache dropped,
wall time of the command, the copy's bytes checked; plus ``verify --dir`` (not timed)
and the command's CPU seconds per GB, as a note.

`bench/run.py` adds it to the W1 rows after the peers', so it gets the prefetch
row's ratio against the fastest peer and the same targets.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench import peers
from bench.dataset import PREFIX
from bench.report import Row

if TYPE_CHECKING:
    from bench.network import Network
    from bench.run import Suite

JOBS = 32  # as rclone's --transfers 32
GB = 1e9
SYSTEM = f"s3cachefs sync --jobs {JOBS}"


def command(endpoint: str, target: Path, *extra: str) -> list[str]:
    cli = str(Path(sys.executable).parent / "s3cachefs")
    url = f"s3://{peers.BUCKET}/{PREFIX}"
    return [cli, "sync", url, str(target), "--endpoint-url", endpoint, "--jobs", str(JOBS), *extra]


def run_sync(endpoint: str, target: Path) -> None:
    done = subprocess.run(
        command(endpoint, target), check=False, env=peers.env(), capture_output=True, text=True
    )  # captured: its progress lines would break up the table's log
    if done.returncode:
        raise RuntimeError(f"sync exit {done.returncode}: {done.stderr.strip()[-500:]}")


def copied_bytes(target: Path) -> int:
    """Bytes of the dataset's files in ``target`` (not the sync's own state)."""
    return sum(
        f.stat().st_size
        for f in target.rglob("*")
        if f.is_file() and ".s3cachefs" not in f.relative_to(target).parts
    )


def measure(suite: Suite, net: Network) -> Row | None:
    """Time one cold sync of the whole dataset; None (and a note) if it failed."""
    target = suite.scratch("sync") / "dest"
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        secs = suite._timed(run_sync, net.endpoint_url, target)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        got = copied_bytes(target)
        if got != suite.data.total_bytes:
            suite.report.note(f"{SYSTEM}: copied {got} bytes, expected {suite.data.total_bytes}")
        verify = subprocess.run(
            [str(Path(sys.executable).parent / "s3cachefs"), "verify", "--dir", str(target)],
            check=False,
            capture_output=True,
            text=True,
        )
        if verify.returncode:
            suite.report.note(f"{SYSTEM}: verify --dir failed: {verify.stderr.strip()[-300:]}")
        suite.report.note(
            f"{SYSTEM} on {net.profile.name}: {cpu:.1f} CPU-s "
            f"({cpu / (suite.data.total_bytes / GB):.1f} per GB)"
        )
        return suite.w1(SYSTEM, net.profile, secs)
    except Exception as exc:  # a row that failed is a note, as for the peers
        suite.report.note(f"{SYSTEM} on {net.profile.name}: failed: {exc!r}")
        return None
    finally:
        shutil.rmtree(target.parent, ignore_errors=True)

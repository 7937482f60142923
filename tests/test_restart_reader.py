"""A reader in another mount namespace survives daemon restarts without being restarted.

The README's container layout, without a container runtime: the mount lives
below a *shared* parent directory; the reader runs in its own mount namespace
(``unshare -m --propagation slave``, what ``-v PARENT:/mnt/host:rslave``
gives a container) and reads through the parent. The daemon is stopped
(SIGTERM) or killed (``kill -9``) and started again on the same mountpoint;
the reader, the same process all along, opens the file again until it reads
the right bytes: the new mount (and its kernel-serve overlay) reached its
namespace by propagation. Never wrong bytes in between, only errors.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Bucket, Mount, Mounter
from tests.test_kernelserve import wait_bound
from tests.test_prefetch import fill, prefetch

pytestmark = pytest.mark.exclusive  # see the marker in pyproject.toml

READER = """
import hashlib, os, sys, time
path, digest = sys.argv[1], sys.argv[2]
while True:
    try:
        with open(path, "rb") as f:
            body = f.read()
        line = "ok" if hashlib.sha256(body).hexdigest() == digest else "WRONG BYTES"
    except OSError as exc:
        line = f"error {exc.errno}"
    print(line, flush=True)
    time.sleep(0.05)
"""


@pytest.fixture
def shared_parent(tmp_path: Path) -> Iterator[Path]:
    """A directory that is a shared mount (the README's ``/mnt/s3cachefs``)."""
    parent = tmp_path / "parent"
    parent.mkdir()
    subprocess.run(["mount", "--bind", str(parent), str(parent)], check=True)
    subprocess.run(["mount", "--make-shared", str(parent)], check=True)
    yield parent
    subprocess.run(["umount", "-l", str(parent)], check=False)


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines()


def wait_ok_after(log: Path, start: int, what: str, timeout: float = 60) -> list[str]:
    """Poll (bounded) until the reader reads the right bytes after line ``start``."""
    deadline = time.monotonic() + timeout
    while "ok" not in lines(log)[start:]:
        assert time.monotonic() < deadline, (
            f"{what}: the reader never read again: {lines(log)[-5:]}"
        )
        time.sleep(0.1)
    return lines(log)[start:]


def test_readers_in_another_namespace_read_again_after_sigterm_and_kill_9(
    bucket: Bucket, mounter: Mounter, shared_parent: Path, tmp_path: Path
) -> None:
    """Two readers: a file of a kernel-served dataset (the overlay) and a file read
    through the FUSE path (not pinned)."""
    files = fill(bucket, count=6)
    files["other/plain.bin"] = b"through FUSE " * 5000
    bucket.put("other/plain.bin", files["other/plain.bin"])
    mount = mounter(bucket.name, "--min-free", "0", name="parent/mnt")
    assert prefetch(mount, "dataset-v3").returncode == 0
    assert wait_bound(mount)["kernel_served"]
    readers: dict[Path, subprocess.Popen[bytes]] = {}
    for key in ("dataset-v3/train/page-0001.png", "other/plain.bin"):
        log = tmp_path / f"reader-{len(readers)}.log"
        with log.open("w") as out:
            readers[log] = subprocess.Popen(
                ["unshare", "-m", "--propagation", "slave", sys.executable, "-c", READER,
                 str(mount.path / key), hashlib.sha256(files[key]).hexdigest()],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
    try:
        for log in readers:
            wait_ok_after(log, 0, "at start")
        current: Mount = mount
        for how in ("SIGTERM", "kill -9"):
            if how == "SIGTERM":
                current.proc.send_signal(signal.SIGTERM)
                assert current.proc.wait(timeout=30) == 0
            else:
                current.kill9()
            stopped = {log: len(lines(log)) for log in readers}
            current = mounter(bucket.name, "--min-free", "0", name="parent/mnt")
            assert wait_bound(current)["kernel_served"]  # the overlay is back too
            for log, reader in readers.items():
                seen = wait_ok_after(log, stopped[log], how)
                assert reader.poll() is None  # the same reader, never restarted
                assert "WRONG BYTES" not in seen
            # Once it reads again, it keeps reading: the new mount is its mount now.
            again = {log: len(lines(log)) for log in readers}
            time.sleep(1)
            for log in readers:
                assert set(lines(log)[again[log] :]) == {"ok"}, lines(log)[again[log] :]
        for log in readers:
            assert "WRONG BYTES" not in lines(log)
    finally:
        for reader in readers.values():
            reader.kill()
            reader.wait()
        for started in mounter.mounts:
            started.stop()

"""Uploading what a writable mount staged needs no free space: it is how a full disk empties."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Bucket, Mounter, run_cli, tmpfs
from tests.faultproxy import FaultProxy

MIB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB filesystem of its own, unmounted whatever happens."""
    with tmpfs(tmp_path / "small-disk", "24m") as path:
        yield path


def _fill(disk: Path) -> None:
    """Write zeros until the disk is full, to the last byte."""
    chunk = b"\0" * 65536
    with (disk / "filler").open("wb", buffering=0) as f:
        for size in (len(chunk), 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(chunk[:size])
    assert os.statvfs(disk).f_bavail == 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_staged_upload_on_a_full_disk_needs_no_space_and_frees_it(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy, small_disk: Path
) -> None:
    big, small = os.urandom(6 * MIB + 123), os.urandom(100_000)  # multipart, and one PUT
    cache = small_disk / "cache"
    mount = mounter(
        bucket.name,
        "--writable",
        "--upload-part-size",
        "5M",
        "--min-free",
        "0",
        cache_dir=cache,
        server=proxy,
    )
    proxy.methods = {"PUT", "POST"}
    proxy.rates["internal"] = 1.0  # S3 refuses every upload: both files stay staged
    for name, data in (("big.bin", big), ("small.bin", small)):
        with pytest.raises(OSError) as failed:
            (mount.path / name).write_bytes(data)
        assert failed.value.errno == errno.EIO
    listed = run_cli("staged", "--mount", str(mount.path))
    assert listed.stdout.count("failed") == 2, listed.stdout
    proxy.rates["internal"] = 0.0
    _fill(small_disk)

    result = run_cli("staged", "--upload", "--all", "--mount", str(mount.path))

    assert result.returncode == 0, result.stderr + result.stdout
    assert sorted(result.stdout.splitlines()) == ["uploaded big.bin", "uploaded small.bin"]
    # Before anything reads the files back (reads may cache blocks into the freed space).
    assert os.statvfs(small_disk).f_bavail > 0  # what S3 now holds was not all kept
    for name, data in (("big.bin", big), ("small.bin", small)):
        body = bucket.client.get_object(Bucket=bucket.name, Key=name)["Body"].read()
        assert _sha(body) == _sha(data), name
        assert _sha((mount.path / name).read_bytes()) == _sha(data), name
    assert os.listdir(cache / "v1" / "staging") == []  # no data, no record, no empty tmp file
    log = mount.log_text()
    assert "no space in" in log and "to record the multipart upload of big.bin" in log
    assert "unexpected error" not in log and "Traceback" not in log
    assert "nothing staged" in run_cli("staged", "--mount", str(mount.path)).stdout
    assert mount.proc.poll() is None

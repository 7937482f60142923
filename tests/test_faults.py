"""Faults: a flaky S3, S3 down, a full cache disk, other users. Real mounts, real S3."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from s3cachefs.daemon.runtime import read_record
from tests.conftest import CREDENTIALS, Bucket, Mounter, drop_page_cache, run_cli
from tests.faultproxy import FaultProxy

MIB = 1024 * 1024


def fill(bucket: Bucket, prefix: str, count: int, size: int = 150_000) -> dict[str, bytes]:
    files = {f"{prefix}/d{i % 4}/f{i:03d}.bin": os.urandom(size + i) for i in range(count)}
    files[f"{prefix}/big.bin"] = os.urandom(3 * MIB + 7)
    bucket.put_many(files)
    return files


def read_all(root: Path, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        data = (root / key).read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest(), key


def test_prefetch_completes_byte_exact_through_a_flaky_s3(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    files = fill(bucket, "ds", 40)
    mount = mounter(bucket.name, server=proxy)
    proxy.rates.update(slowdown=0.05, internal=0.03, reset=0.03, cut=0.05)
    result = run_cli("prefetch", "ds", "--mount", str(mount.path), "--json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert sum(proxy.faults.values()) >= 3, proxy.faults  # the faults really happened
    proxy.down = True  # every byte now comes from the cache, and must be right
    drop_page_cache()
    read_all(mount.path, files)


def test_a_stalled_body_is_abandoned_after_s3_timeout_not_waited_for(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    files = fill(bucket, "ds", 2)
    mount = mounter(bucket.name, "--s3-timeout", "1", server=proxy)
    proxy.rates.update(stall=1.0)  # every GET goes silent half-way, for 60 s
    key = "ds/big.bin"
    result: list[bytes | BaseException] = []
    thread = threading.Thread(target=lambda: result.append(_read_or_error(mount.path / key)))
    thread.start()
    thread.join(timeout=40)  # 3 attempts x 1 s of silence plus backoff (~10 s seen), not 60 s
    assert not thread.is_alive(), "a stalled S3 body hung the read"
    [outcome] = result
    assert isinstance(outcome, OSError) and outcome.errno == errno.EIO
    proxy.rates.update(stall=0.0)
    assert (mount.path / key).read_bytes() == files[key]  # and it recovers


def _read_or_error(path: Path) -> bytes | BaseException:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


def test_s3_down_pinned_data_serves_the_rest_fails_then_recovers(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    pinned = fill(bucket, "pinned", 8)
    other = fill(bucket, "other", 4)
    mount = mounter(bucket.name, server=proxy)
    assert run_cli("prefetch", "pinned", "--mount", str(mount.path)).returncode == 0
    os.listdir(mount.path / "other" / "d1")  # listed while S3 was up
    proxy.down = True
    drop_page_cache()
    read_all(mount.path, pinned)
    victim = next(k for k in other if "/d1/" in k)
    with pytest.raises(OSError) as info:
        (mount.path / victim).read_bytes()
    assert info.value.errno == errno.EIO
    proxy.down = False  # S3 is back: no restart needed
    assert (mount.path / victim).read_bytes() == other[victim]
    assert mount.proc.poll() is None


def test_a_full_cache_disk_refuses_prefetch_and_reads_still_work(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    files = fill(bucket, "ds", 10)
    cache = tmp_path / "small-disk"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(cache)], check=True)
    try:
        mount = mounter(bucket.name, "--min-free", "0", cache_dir=cache)
        result = run_cli("prefetch", "ds", "--mount", str(mount.path))
        assert result.returncode == 2
        assert "does not fit" in result.stderr and len(result.stderr.splitlines()) == 1
        fd = os.open(cache / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # now the disk is really full
            with pytest.raises(OSError) as info:
                while True:
                    os.write(fd, b"\0" * 65536)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        drop_page_cache()
        read_all(mount.path, files)  # served from S3, uncached, byte-exact
        status = json.loads(run_cli("status", str(mount.path), "--json").stdout)
        assert status["cache"]["used_bytes"] <= 2 * MIB
        assert mount.proc.poll() is None
        assert mount.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_other_users_cannot_reach_the_cache_or_the_control_socket(
    bucket: Bucket, mounter: Mounter
) -> None:
    fill(bucket, "ds", 2)
    mount = mounter(bucket.name)
    assert run_cli("prefetch", "ds", "--mount", str(mount.path)).returncode == 0
    record = json.loads(run_cli("status", str(mount.path), "--json").stdout)
    assert oct(os.stat(mount.cache_dir).st_mode & 0o777) == "0o700"
    mount_record = read_record(mount.path)
    assert mount_record is not None
    sock = Path(mount_record.socket)
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    as_nobody = ["runuser", "-u", "nobody", "--"]
    for cmd in (
        ["ls", str(mount.cache_dir)],
        [
            "python3",
            "-c",
            f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({str(sock)!r})",
        ],
        ["ls", str(mount.path)],  # allow_other is off: not even the mount
    ):
        result = subprocess.run(as_nobody + cmd, capture_output=True, text=True, check=False)
        assert result.returncode != 0, (cmd, result.stdout)
        assert "ermission denied" in result.stderr, result.stderr
    assert record["cache"]["dir"] == str(mount.cache_dir)


def test_credentials_never_appear_in_logs_or_status(bucket: Bucket, mounter: Mounter) -> None:
    fill(bucket, "ds", 3)
    mount = mounter(bucket.name)  # --log-level debug in the fixture
    assert run_cli("prefetch", "ds", "--mount", str(mount.path)).returncode == 0
    status = run_cli("status", str(mount.path), "--json").stdout
    assert mount.stop() == 0
    secret = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    for text in (mount.log_text(), status):
        assert secret not in text
        assert "Signature=" not in text and "X-Amz-Signature" not in text


def test_a_failing_cache_dir_fails_prefetch_clearly_and_reads_go_on(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Every write to the cache dir fails (a file stands where each of the 256 fan-out
    directories must go): prefetch names every object it could not keep; reads come
    from S3, byte-exact; the daemon stays up."""
    files = fill(bucket, "ds", 6)
    mount = mounter(bucket.name, "--min-free", "0")
    objects = mount.cache_dir / "v1" / "objects"
    for i in range(256):
        (objects / f"{i:02x}").write_bytes(b"")
    result = run_cli("prefetch", "ds", "--mount", str(mount.path))
    assert result.returncode == 4
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("FAILED ")]
    assert len(failed) == len(files)
    assert all("could not be kept in the cache" in ln for ln in failed)
    assert "Traceback" not in result.stderr
    drop_page_cache()
    read_all(mount.path, files)
    status = json.loads(run_cli("status", str(mount.path), "--json").stdout)
    assert any("cache write failed" in line for line in status["recent_errors"])
    assert mount.proc.poll() is None

"""What only a real mount shows: S3 request counts, persistence, lifecycle, read-only."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from s3cachefs.daemon.runtime import runtime_dir
from tests.conftest import Bucket, Mounter, drop_page_cache, mount_cli, run_cli

MIB = 1024 * 1024


def _read_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _ranges(bucket: Bucket, key: str) -> list[tuple[int, int]]:
    """The byte ranges GET requests asked for, as (first, last) pairs."""
    out = []
    for request in bucket.server.gets("/" + key):
        assert request.range is not None, "every data GET is a ranged GET"
        first, last = request.range.removeprefix("bytes=").split("-")
        out.append((int(first), int(last)))
    return sorted(out)


def assert_each_byte_fetched_once(bucket: Bucket, key: str, size: int) -> None:
    ranges = _ranges(bucket, key)
    position = 0
    for first, last in ranges:
        assert first == position, f"gap or overlap at {position}: {ranges}"
        position = last + 1
    assert position == size, ranges


def test_eight_readers_of_a_cold_file_fetch_each_byte_once(
    bucket: Bucket, mounter: Mounter
) -> None:
    data = os.urandom(8 * MIB + 100)
    bucket.put("big.bin", data)
    mount = mounter(bucket.name)
    bucket.server.reset()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        digests = pool.map(_read_file, [str(mount.path / "big.bin")] * 8)
    assert set(digests) == {hashlib.sha256(data).hexdigest()}
    assert_each_byte_fetched_once(bucket, "big.bin", len(data))


def test_reread_after_drop_caches_and_after_remount_costs_zero_gets(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = {f"d/{i}.png": os.urandom(40_000 + i) for i in range(10)}
    files["d/large.bin"] = os.urandom(3 * MIB)
    for key, body in files.items():
        bucket.put(key, body)
    mount = mounter(bucket.name)
    for key, body in files.items():
        assert (mount.path / key).read_bytes() == body
    for key, body in files.items():
        assert_each_byte_fetched_once(bucket, key, len(body))

    bucket.server.reset()
    drop_page_cache()
    for key, body in files.items():
        assert (mount.path / key).read_bytes() == body
    assert bucket.server.counts()["get"] == 0

    assert mount.stop() == 0
    bucket.server.reset()
    mount = mounter(bucket.name, name="mnt2")
    for key, body in files.items():
        assert (mount.path / key).read_bytes() == body
    assert bucket.server.counts()["get"] == 0


def test_one_list_per_directory_within_ttl(bucket: Bucket, mounter: Mounter) -> None:
    for i in range(5):
        bucket.put(f"a/{i}.txt", b"x")
        bucket.put(f"b/{i}.txt", b"y")
    mount = mounter(bucket.name, "--metadata-ttl", "300")
    bucket.server.reset()
    for _ in range(3):
        for dirpath, _, names in os.walk(mount.path):
            for name in names:
                os.stat(os.path.join(dirpath, name))
        assert not (mount.path / "a" / "missing").exists()
    # root, a/ and b/: one LIST each, however often they are walked and looked up in
    assert bucket.server.counts()["list"] == 3


def test_corrupted_block_is_detected_and_refetched(bucket: Bucket, mounter: Mounter) -> None:
    data = os.urandom(2 * MIB)
    bucket.put("c.bin", data)
    mount = mounter(bucket.name)
    assert (mount.path / "c.bin").read_bytes() == data
    assert mount.stop() == 0
    [obj] = [p for p in (mount.cache_dir / "v1" / "objects").rglob("*") if p.is_file()]
    with obj.open("r+b") as f:  # flip a byte in block 1, as a bad disk would
        f.seek(MIB + 77)
        byte = f.read(1)
        f.seek(MIB + 77)
        f.write(bytes([byte[0] ^ 0xFF]))
    bucket.server.reset()
    mount = mounter(bucket.name, name="mnt2")
    assert (mount.path / "c.bin").read_bytes() == data
    assert _ranges(bucket, "c.bin") == [(MIB, 2 * MIB - 1)]
    assert "failed verification" in mount.log_text()


def test_writes_are_refused_with_erofs(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("f.txt", b"data")
    mount = mounter(bucket.name)
    attempts: list[Callable[[], object]] = [
        lambda: open(mount.path / "f.txt", "ab"),  # noqa: SIM115
        lambda: open(mount.path / "new.txt", "wb"),  # noqa: SIM115
        lambda: os.mkdir(mount.path / "newdir"),
        lambda: os.unlink(mount.path / "f.txt"),
        lambda: os.rename(mount.path / "f.txt", mount.path / "g.txt"),
        lambda: os.truncate(mount.path / "f.txt", 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert (mount.path / "f.txt").read_bytes() == b"data"


def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_daemon_serves_on(
    bucket: Bucket, mounter: Mounter
) -> None:
    """What a stuck daemon is doing, without stopping it (README "Troubleshooting")."""
    bucket.put("f.txt", b"data")
    mount = mounter(bucket.name)
    mount.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "Current thread" not in mount.log_text():
        assert time.monotonic() < deadline, mount.log_text()
        time.sleep(0.05)
    assert "trio" in mount.log_text()  # the dump names the daemon's own frames
    assert (mount.path / "f.txt").read_bytes() == b"data"
    assert mount.proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(bucket: Bucket, mounter: Mounter, sig: signal.Signals) -> None:
    bucket.put("f.txt", b"data")
    mount = mounter(bucket.name)
    assert (mount.path / "f.txt").read_bytes() == b"data"
    mount.proc.send_signal(sig)
    assert mount.proc.wait(timeout=30) == 0
    assert not os.path.ismount(mount.path)
    assert "unmounting" in mount.log_text()


def test_unmount_cleans_a_stale_mount_and_mount_reuses_it(bucket: Bucket, mounter: Mounter) -> None:
    bucket.put("f.txt", b"data")
    mount = mounter(bucket.name)
    assert (mount.path / "f.txt").read_bytes() == b"data"
    mount.kill9()
    with pytest.raises(OSError) as info:
        os.listdir(mount.path)
    assert info.value.errno == errno.ENOTCONN
    result = run_cli("unmount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mount.path)
    assert os.listdir(mount.path) == []
    # And a daemon started on a stale mountpoint cleans it itself (systemd restart).
    again = mounter(bucket.name, name="mnt")
    dead = again.proc.pid
    again.kill9()
    third = mounter(bucket.name, name="mnt")
    assert (third.path / "f.txt").read_bytes() == b"data"
    assert "stale mount" in third.log_text()
    # and the dead daemon's runtime record and socket are gone
    records = [json.loads(p.read_text()) for p in runtime_dir().glob("mount-*.json")]
    assert dead not in [r["pid"] for r in records]
    assert third.proc.pid in [r["pid"] for r in records]


def test_background_mount_returns_when_usable_and_unmount_waits(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put("f.txt", b"data")
    mnt = tmp_path / "bg"
    mnt.mkdir()
    cache = tmp_path / "bgcache"
    result = mount_cli(bucket, mnt, cache)
    try:
        assert result.returncode == 0, result.stderr
        assert (mnt / "f.txt").read_bytes() == b"data"  # usable the moment mount returns
    finally:
        done = run_cli("unmount", str(mnt))
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(mnt)
    assert "mounted" in (cache / "daemon.log").read_text()
    # unmount waited for the daemon: the cache dir is free for the next one at once
    again = mount_cli(bucket, mnt, cache)
    assert again.returncode == 0, again.stderr
    assert run_cli("unmount", str(mnt)).returncode == 0


def test_slow_s3_request_does_not_block_other_files(bucket: Bucket, mounter: Mounter) -> None:
    """Cache hits are served while another file's fetch is in flight."""
    bucket.put("hot.txt", b"hot")
    bucket.put("cold.bin", os.urandom(8 * MIB))
    mount = mounter(bucket.name, "--s3-concurrency", "2")
    assert (mount.path / "hot.txt").read_bytes() == b"hot"
    reader = subprocess.Popen(["cat", str(mount.path / "cold.bin")], stdout=subprocess.DEVNULL)
    start = time.monotonic()
    for _ in range(50):
        with open(mount.path / "hot.txt", "rb") as f:
            assert f.read() == b"hot"
    assert reader.wait(timeout=60) == 0
    assert time.monotonic() - start < 60


def _stats(mount_log: str) -> dict[str, int]:
    """The daemon's last "stats key=value ..." line, parsed."""
    line = [ln for ln in mount_log.splitlines() if " stats " in ln][-1]
    return {k: int(v) for k, v in (f.split("=") for f in line.split(" stats ", 1)[1].split())}


@pytest.mark.parametrize("keep_cache", [True, False])
def test_page_cache_is_kept_across_opens_of_an_unchanged_file(
    bucket: Bucket, mounter: Mounter, keep_cache: bool
) -> None:
    data = os.urandom(2 * MIB)
    bucket.put("page.png", data)
    # keep_cache is the FUSE path's (a passed-through file's pages are its cache file's)
    extra = ("--no-passthrough",) if keep_cache else ("--no-passthrough", "--no-keep-cache")
    first = mounter(bucket.name, *extra)
    drop_page_cache()
    assert (first.path / "page.png").read_bytes() == data
    assert first.stop() == 0
    one_pass = _stats(first.log_text())["fuse_read"]

    again = mounter(bucket.name, *extra, name="mnt2")
    drop_page_cache()
    for _ in range(5):
        assert (again.path / "page.png").read_bytes() == data
    assert again.stop() == 0
    stats = _stats(again.log_text())
    assert stats["fuse_open"] == 5
    if keep_cache:  # opens 2-5 are served by the kernel alone
        assert stats["fuse_read"] == one_pass
    else:
        assert stats["fuse_read"] >= 5 * one_pass
    assert stats.get("s3_get", 0) == 0


def test_kernel_readahead_is_raised_so_fuse_reads_are_large(
    bucket: Bucket, mounter: Mounter
) -> None:
    data = os.urandom(4 * MIB)
    bucket.put("scan.tar", data)
    mount = mounter(bucket.name)
    st = os.stat(mount.path)
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    assert bdi.read_text().strip() == "1024"
    drop_page_cache()
    assert (mount.path / "scan.tar").read_bytes() == data
    assert mount.stop() == 0
    stats = _stats(mount.log_text())
    assert stats["fuse_read_bytes_asked"] / stats["fuse_read"] > 256 * 1024

"""Files cached by reading, served by the kernel through the root overlay (issue 13).

Real mounts, real S3 server. "Served by the kernel" is what the daemon and S3
did not see: the FUSE open/read counters and the server's request log stay
still during a second pass, page cache dropped.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3cachefs.datasets import binds, overlay
from tests.conftest import Bucket, Mount, Mounter, drop_page_cache, mount_cli, run_cli, status
from tests.test_cli_errors import _assert_one_line_error
from tests.test_kernelserve import fuse_reads, wait_for
from tests.test_prefetch import fill, prefetch

# Opt-in, and for immutable data only: an overlay over FUSE turns a changed object into ESTALE.
ON = ("--read-serve", "--metadata-ttl", "indefinite", "--min-free", "0")


def test_read_serve_is_off_by_default_and_needs_an_indefinite_ttl(
    bucket: Bucket, mounter: Mounter
) -> None:
    mnt = mounter.tmp_path / "refused"
    mnt.mkdir()
    for ttl in ((), ("--metadata-ttl", "60")):
        result = mount_cli(bucket, mnt, mounter.tmp_path / "c", "--read-serve", *ttl)
        _assert_one_line_error(result, 2, "--read-serve", "--metadata-ttl indefinite", "ESTALE")
    files = fill(bucket, count=3)
    mount = mounter(bucket.name, "--metadata-ttl", "indefinite")  # the default: off
    read_all(mount, files)
    assert status(mount)["read_serve"] is None


@pytest.fixture
def mounter(mounter: Mounter) -> Iterator[Mounter]:
    """`s3cachefs unmount` at the end: the overlay on the mountpoint first, as a user would
    (``fusermount3 -u`` refuses an overlay, ``umount -R`` would leave the FUSE mount)."""
    yield mounter
    for mount in mounter.mounts:
        alive = mount.proc.poll() is None
        if alive and run_cli("unmount", str(mount.path)).returncode != 0:
            # Refused: another mount namespace (another job's container) holds a copy.
            run_cli("unmount", "--lazy", str(mount.path))


def served(mount: Mount) -> dict[str, Any]:
    found: dict[str, Any] = status(mount)["read_serve"]
    return found


def read_all(mount: Mount, files: dict[str, bytes], prefix: str = "") -> None:
    for key, body in files.items():
        assert (mount.path / key.removeprefix(prefix)).read_bytes() == body, key


def layers(mount: Mount) -> tuple[str, ...]:
    found = [o for o in overlay.overlays() if o.mount_point == str(mount.path)]
    return found[-1].layers if found else ()


def test_a_file_read_once_is_kernel_served_on_the_second_pass(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=30)
    more = fill(bucket, prefix="more", count=5)
    bucket.put("other/unread.bin", b"never read " * 1000)
    mount = mounter(bucket.name, *ON)
    read_all(mount, files)
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    assert binds.stack_at(mount.path)[-1].fstype == "overlay"
    assert len(layers(mount)) == 2  # the tree, then FUSE

    drop_page_cache()
    bucket.server.reset()
    before = fuse_reads(mount)
    read_all(mount, files)
    assert fuse_reads(mount) == before  # not one open or read reached the daemon
    assert sum(bucket.server.counts().values()) == 0
    # The rest falls through to FUSE: merged listing, a lazy read of an unread file.
    assert sorted(os.listdir(mount.path)) == ["dataset-v3", "more", "other"]
    assert (mount.path / "other/unread.bin").read_bytes() == b"never read " * 1000
    assert fuse_reads(mount)[0] == before[0] + 1
    assert bucket.server.gets("other/unread.bin")

    # Files read later go into a delta on top; what was served stays served.
    read_all(mount, more)
    wait_for(lambda: served(mount)["files"] == len(files) + len(more) + 1, "the delta")
    assert served(mount)["layers"] >= 2
    drop_page_cache()
    before = fuse_reads(mount)
    read_all(mount, {**files, **more})
    assert fuse_reads(mount) == before

    # `s3cachefs unmount` takes the overlay first.
    assert run_cli("unmount", str(mount.path)).returncode == 0
    assert binds.mounts_below(mount.path) == []


def test_off_for_writable_mounts_and_the_setting(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket, count=4)
    for i, extra in enumerate(((*ON, "--writable"), ("--min-free", "0"))):
        mount = mounter(bucket.name, *extra, name=f"m{i}", cache_dir=mounter.tmp_path / f"c{i}")
        read_all(mount, files)
        before = fuse_reads(mount)
        read_all(mount, files)
        assert fuse_reads(mount)[0] == before[0] + len(files)  # every open through FUSE
        assert status(mount)["read_serve"] is None
        assert not [o for o in overlay.overlays() if o.mount_point.startswith(str(mount.path))]


def test_a_change_or_deletion_in_s3_is_seen_as_the_fuse_path_sees_it(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Immutable data: both paths keep what they listed and read, the old version whole."""
    files = fill(bucket, count=6)
    mount = mounter(bucket.name, *ON)
    fuse = mounter(
        bucket.name, "--metadata-ttl", "indefinite", name="fuse", cache_dir=mounter.tmp_path / "c2"
    )
    read_all(mount, files)
    read_all(fuse, files)
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    changed, deleted = sorted(files)[:2]
    bucket.put(changed, b"a new version " * 5000)
    bucket.delete(deleted)
    for m in (mount, fuse):
        drop_page_cache()
        assert (m.path / changed).read_bytes() == files[changed]
        assert (m.path / deleted).read_bytes() == files[deleted]
        for d in {k.rpartition("/")[0] for k in (changed, deleted)}:
            names = sorted(k.rpartition("/")[2] for k in files if k.rpartition("/")[0] == d)
            assert sorted(os.listdir(m.path / d)) == names


def test_a_damaged_linked_file_goes_back_to_the_checked_path(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, *ON, "--verify-interval", "2")
    read_all(mount, files)
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    key = sorted(files)[0]
    tree_file = Path(layers(mount)[0]) / key
    fd = os.open(tree_file, os.O_WRONLY)
    os.pwrite(fd, b"\xff" * 100, 10)  # the cache file itself: a bad sector, say
    os.fsync(fd)
    os.close(fd)
    wait_for(lambda: served(mount)["files"] == len(files) - 1, "the damaged file out")
    drop_page_cache()
    before = fuse_reads(mount)
    assert (mount.path / key).read_bytes() == files[key]  # checked, fetched again
    assert fuse_reads(mount)[0] == before[0] + 1


def test_eviction_never_punches_a_linked_file(bucket: Bucket, mounter: Mounter) -> None:
    rng = random.Random(7)
    first = {f"a/{i:02d}.bin": rng.randbytes(200_000) for i in range(12)}
    later = {f"b/{i:02d}.bin": rng.randbytes(200_000) for i in range(12)}
    for key, body in {**first, **later}.items():
        bucket.put(key, body)
    mount = mounter(bucket.name, *ON, "--block-size", "64K", "--cache-size", "3M")
    read_all(mount, first)
    wait_for(lambda: served(mount)["files"] > 0 and not served(mount)["waiting"], "linked")
    read_all(mount, later)  # through FUSE: the cache evicts to make room
    wait_for(lambda: not served(mount)["waiting"], "the later files handled")
    info = served(mount)
    assert info["files"] > 0 and info["files"] * 200_000 <= 1.5 * 1024 * 1024
    assert status(mount)["cache"]["evictions"] > 0
    linked = 0
    for layer in layers(mount):
        for path in Path(layer).rglob("*.bin") if layer.startswith(str(mount.cache_dir)) else ():
            fd = os.open(path, os.O_RDONLY)
            try:  # no hole before the end: every block is on disk
                assert os.lseek(fd, 0, os.SEEK_HOLE) == 200_000
            finally:
                os.close(fd)
            linked += 1
    assert linked >= info["files"]
    drop_page_cache()
    read_all(mount, {**first, **later})


def test_kill_9_leaves_no_overlay_and_a_restart_serves_again(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=6)
    mount = mounter(f"{bucket.name}/dataset-v3", *ON)
    read_all(mount, files, "dataset-v3/")
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    mount.kill9()
    mounter.mounts.remove(mount)
    again = mounter(f"{bucket.name}/dataset-v3", *ON, cache_dir=mount.cache_dir)
    log = again.log_text()
    assert "overlays of a dead daemon left on it; unmounting them" in log
    assert "Traceback" not in log
    assert [e.fstype for e in binds.mounts_below(again.path)] == ["fuse.s3cachefs"]
    read_all(again, files, "dataset-v3/")  # once through FUSE (freed whole at start: S3)
    wait_for(lambda: served(again)["files"] == len(files), "linked again")
    drop_page_cache()
    before = fuse_reads(again)
    read_all(again, files, "dataset-v3/")
    assert fuse_reads(again) == before


def test_a_pinned_dataset_takes_over_from_the_root_overlay(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=6)
    mount = mounter(bucket.name, *ON)
    read_all(mount, files)
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    assert prefetch(mount, "dataset-v3").returncode == 0
    wait_for(lambda: status(mount)["datasets"][0]["kernel_served"], "the dataset's overlay")
    assert not served(mount)["mounted"]
    assert [e.fstype for e in binds.mounts_below(mount.path)] == ["fuse.s3cachefs", "overlay"]
    drop_page_cache()
    before = fuse_reads(mount)
    read_all(mount, files)
    assert fuse_reads(mount) == before

    # Evicted: files read again are linked again, into a root overlay.
    assert run_cli("evict", "dataset-v3", "--mount", str(mount.path)).returncode == 0
    read_all(mount, files)
    wait_for(lambda: served(mount)["files"] == len(files), "linked again after evict")
    assert served(mount)["mounted"]
    drop_page_cache()
    before = fuse_reads(mount)
    read_all(mount, files)
    assert fuse_reads(mount) == before


def other_user_reads(path: Path) -> tuple[bool, str]:
    """Whether uid/gid 65534 (no groups) can read a byte of ``path``, and what it was told."""
    run = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "head", "-c1", str(path)]
    done = subprocess.run(run, capture_output=True, text=True, errors="replace", check=False)
    return done.returncode == 0, done.stderr.strip()


def stat_trail(path: Path) -> list[str]:
    """Mode and owner of every directory from /tmp down to ``path``: what a failed read met."""
    trail = [path, *path.parents]
    return [f"{oct(p.stat().st_mode)} {p.stat().st_uid} {p}" for p in trail if p != Path("/")]


@pytest.mark.parametrize("allow_other", [False, True])
def test_other_users_are_denied_as_fuse_denies_them(
    bucket: Bucket, mounter: Mounter, allow_other: bool
) -> None:
    """overlayfs reaches every layer (FUSE too) with the mounter's creds, so FUSE's "only the
    mounting user" check never applies under it: the trees' dirs are 0700 without allow_other."""
    p = mounter.tmp_path
    while p != Path("/tmp") and p != p.parent:  # the way to the mountpoint, open to all
        os.chmod(p, 0o755)
        p = p.parent
    files = fill(bucket, count=3)
    bucket.put("other/unread.bin", b"secret" * 100)
    mount = mounter(bucket.name, *ON, *(("--allow-other",) if allow_other else ()))
    read_all(mount, files)
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    assert binds.stack_at(mount.path)[-1].fstype == "overlay"
    for rel in (sorted(files)[0], "other/unread.bin"):  # linked, and through FUSE below
        read, told = other_user_reads(mount.path / rel)
        assert read == allow_other, (rel, told, stat_trail(mount.path / rel))


def test_a_file_open_in_a_dead_daemons_overlay_never_reads_zeros(
    bucket: Bucket, mounter: Mounter
) -> None:
    """kill -9: its holds die with it; the objects its trees linked are freed whole (unlinked)
    at the next start, so eviction never punches a hole in a file a reader still has open."""
    rng = random.Random(5)
    first = {f"a/{i:02d}.bin": rng.randbytes(200_000) for i in range(6)}
    later = {f"b/{i:02d}.bin": rng.randbytes(200_000) for i in range(24)}
    bucket.put_many({**first, **later})
    small = ("--block-size", "64K", "--cache-size", "3M")
    mount = mounter(bucket.name, *ON, *small)
    read_all(mount, first)
    wait_for(lambda: served(mount)["files"] == len(first), "the read files linked")
    fds = {key: os.open(mount.path / key, os.O_RDONLY) for key in first}
    try:
        mount.kill9()
        mounter.mounts.remove(mount)
        again = mounter(bucket.name, *ON, *small, cache_dir=mount.cache_dir)
        read_all(again, later)  # through FUSE: the cache evicts to make room
        assert status(again)["cache"]["evictions"] > 0
        drop_page_cache()
        for key, fd in fds.items():
            assert os.pread(fd, 300_000, 0) == first[key], key
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_dir_fd_in_an_old_overlay_lists_and_reads_after_two_compactions(
    bucket: Bucket, mounter: Mounter
) -> None:
    rng = random.Random(9)
    sets = [{f"{d}/{i:02d}.bin": rng.randbytes(200_000) for i in range(6)} for d in "abc"]
    bucket.put_many({k: v for files in sets for k, v in files.items()})
    mount = mounter(bucket.name, *ON, "--block-size", "64K", "--cache-size", "3M")
    read_all(mount, sets[0])
    wait_for(lambda: served(mount)["files"] == len(sets[0]), "the first files linked")
    assert binds.stack_at(mount.path)[-1].fstype == "overlay"
    fd = os.open(mount.path / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for files in sets[1:]:  # over the hold cap: the oldest leave, a compaction each
            swaps: int = served(mount)["swaps"]
            read_all(mount, files)

            def swapped(before: int = swaps) -> bool:
                info = served(mount)
                return bool(info["swaps"] > before and not info["waiting"])

            wait_for(swapped, "a swap")
        # The swap count moves before the publish logs its line: wait for the line.
        wait_for(lambda: mount.log_text().count("(compacted)") >= 3, "three compactions logged")
        assert sorted(os.listdir(fd)) == sorted(k.split("/")[1] for k in sets[0])
        drop_page_cache()
        for key, body in sets[0].items():
            f = os.open(key.split("/")[1], os.O_RDONLY, dir_fd=fd)
            try:
                assert os.pread(f, 300_000, 0) == body, key
            finally:
                os.close(f)
    finally:
        os.close(fd)


def test_sigterm_takes_the_overlay_and_the_fuse_mount(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, *ON)
    read_all(mount, files)
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(timeout=60) == 0
    assert binds.mounts_below(mount.path) == []
    assert "Traceback" not in mount.log_text()


def test_a_prefetch_gets_the_room_linked_files_hold(bucket: Bucket, mounter: Mounter) -> None:
    """Linked files are held against eviction (up to half the cache); a prefetch that fits only
    with that room gets it: read-serve steps aside and frees them whole, never punched."""
    rng = random.Random(11)
    first = {f"a/{i:02d}.bin": rng.randbytes(200_000) for i in range(12)}
    dataset = {f"b/{i:02d}.bin": rng.randbytes(200_000) for i in range(12)}  # 2.4 MB of 3 MiB
    bucket.put_many({**first, **dataset})
    mount = mounter(bucket.name, *ON, "--block-size", "64K", "--cache-size", "3M")
    read_all(mount, first)
    wait_for(lambda: served(mount)["files"] > 0 and not served(mount)["waiting"], "linked")
    held = served(mount)["files"] * 200_000
    assert held > 3 * 1024 * 1024 - len(dataset) * 200_000  # it fits only without the holds
    trees = [Path(p) for p in layers(mount) if p.startswith(str(mount.cache_dir))]
    fds = {
        key: os.open(tree / key, os.O_RDONLY)
        for key in first
        for tree in trees
        if (tree / key).exists()
    }
    assert len(fds) * 200_000 == held
    try:
        result = prefetch(mount, "b")
        assert result.returncode == 0, result.stderr
        assert not served(mount)["mounted"]
        drop_page_cache()
        read_all(mount, dataset)
        for key, fd in fds.items():  # freed whole (unlinked): a reader keeps every byte
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 200_000, key
            assert os.pread(fd, 300_000, 0) == first[key], key
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_swap_under_another_mount_leaves_no_overlay_behind(
    bucket: Bucket, mounter: Mounter
) -> None:
    """A swap while something is mounted on top cannot detach the old overlay: it is kept
    (one WARNING, status says so) and detached once uncovered, at stop at the latest."""
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, *ON, "--verify-interval", "2")
    read_all(mount, files)
    wait_for(lambda: served(mount)["files"] == len(files), "the read files linked")
    tree_file = Path(layers(mount)[0]) / sorted(files)[0]
    subprocess.run(["mount", "-t", "tmpfs", "cover", str(mount.path)], check=True)
    try:
        fd = os.open(tree_file, os.O_WRONLY)
        os.pwrite(fd, b"\xff" * 100, 10)  # fails its check: leaves, a swap (compaction)
        os.fsync(fd)
        os.close(fd)
        wait_for(lambda: served(mount)["files"] == len(files) - 1, "the damaged file out")
        assert "another mount is on top" in served(mount)["note"]
    finally:
        subprocess.run(["umount", str(mount.path)], check=True)  # the tmpfs: on top
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(timeout=60) == 0
    assert binds.mounts_below(mount.path) == []
    assert mount.log_text().count("has another mount on top") == 1


def test_a_failed_mount_turns_read_serve_off_for_the_daemons_life(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Not retried each batch (a warning and a CRC read of every file each time): here the
    mountpoint is covered (refused), the files read through a bind of the FUSE mount."""
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, *ON)
    other = mounter.tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(mount.path), str(other)], check=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "cover", str(mount.path)], check=True)
        try:
            for key, body in files.items():
                assert (other / key).read_bytes() == body
            wait_for(lambda: (served(mount)["note"] or "").startswith("off: mount failed"), "off")
            for key, body in files.items():  # offered again: nothing more is tried
                assert (other / key).read_bytes() == body
            info = served(mount)
            assert not info["mounted"] and info["files"] == 0 and info["waiting"] == 0
            assert mount.log_text().count("read-serve: mount on") == 1
        finally:
            subprocess.run(["umount", str(mount.path)], check=True)
    finally:
        subprocess.run(["umount", str(other)], check=True)
    assert binds.stack_at(mount.path)[-1].fstype == "fuse.s3cachefs"
    drop_page_cache()
    read_all(mount, files)


def test_an_error_in_read_serve_leaves_the_daemon_serving_through_fuse(
    bucket: Bucket, mounter: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Supervised: logged once (ERROR: Sentry's too), our overlay detached, read-serve off."""
    monkeypatch.setenv("S3CACHEFS_TEST_READSERVE_FAULT", "1")  # raised once files are linked
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, *ON)
    read_all(mount, files)
    wait_for(lambda: (served(mount)["note"] or "").startswith("off: failed"), "read-serve off")
    assert mount.proc.poll() is None
    assert not served(mount)["mounted"]
    assert [e.fstype for e in binds.mounts_below(mount.path)] == ["fuse.s3cachefs"]
    assert mount.log_text().count("read-serve failed; off") == 1
    drop_page_cache()
    before = fuse_reads(mount)
    read_all(mount, files)
    assert fuse_reads(mount)[0] == before[0] + len(files)  # every open through FUSE

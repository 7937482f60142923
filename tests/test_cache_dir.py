"""The cache dir: private (0700, files 0600), really a cache, and a --min-free it can honour."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

from s3cachefs.base.errors import CacheDirError
from s3cachefs.cache.cachedir import check_min_free, claim_cache_dir
from tests.conftest import Bucket, mount_cli, run_cli


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of everything under ``root``, by relative path."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` with its mode, size and mtime: "nothing was written"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = (Path(dirpath) / name).lstat()
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    st = root.stat()
    out["."] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_a_0755_cache_dir_is_made_0700_and_every_file_is_0600(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.put("ds/a.bin", os.urandom(300_000))
    bucket.put("ds/b.bin", os.urandom(2_500_000))
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)  # as a user's `mkdir` makes it
    mnt.mkdir()
    result = mount_cli(bucket, mnt, cache, "--writable", "--no-kernel-serve-pinned")
    assert result.returncode == 0, result.stderr
    try:
        (mnt / "new.txt").write_bytes(b"written through the mount\n")  # staging, then adopted
        assert run_cli("prefetch", "ds", "--mount", str(mnt)).returncode == 0  # blocks, manifest
        modes = _modes(cache)  # while the index is open: its -wal and -shm exist
    finally:
        assert run_cli("unmount", str(mnt)).returncode == 0
    for name in (
        "daemon.log",
        "lock",
        "v1/format.json",
        "v1/index/cache.db",
        "v1/index/cache.db-wal",
        "v1/index/cache.db-shm",
    ):
        assert name in modes, sorted(modes)
    assert any(name.startswith("v1/objects/") and len(name) > 50 for name in modes)
    assert any(name.startswith("v1/pins/") for name in modes)
    loose = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (cache / name).is_dir() else 0o600)
    }
    assert loose == {}  # nothing under it is readable by another user
    log = (cache / "daemon.log").read_text()
    assert f"cache dir {cache} was mode 0755; made it 0700" in log


def test_a_cache_dir_owned_by_another_user_is_refused(bucket: Bucket, tmp_path: Path) -> None:
    cache, mnt = tmp_path / "theirs", tmp_path / "mnt"
    cache.mkdir(mode=0o700)
    os.chown(cache, 4321, 4321)
    mnt.mkdir()
    result = mount_cli(bucket, mnt, cache)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"s3cachefs: cache dir {cache} belongs to uid 4321, not to this daemon's uid 0: "
        "chown it or give another --cache-dir"
    ]
    assert os.listdir(cache) == []
    assert not os.path.ismount(mnt)


def test_a_data_folder_is_refused_and_nothing_is_written_into_it(
    bucket: Bucket, tmp_path: Path
) -> None:
    data, mnt = tmp_path / "my-data", tmp_path / "mnt"
    (data / "photos").mkdir(parents=True)
    (data / "notes.txt").write_text("mine\n")
    (data / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    os.chmod(data, 0o755)
    mnt.mkdir()
    before = _snapshot(data)
    for extra in ((), ("--foreground",)):  # the daemon checks before its first byte either way
        result = mount_cli(bucket, mnt, data, *extra)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [
            f"s3cachefs: cache dir {data} is not empty and holds no s3cachefs cache "
            "(notes.txt, photos); give an empty or new directory"
        ]
        assert _snapshot(data) == before  # no lock, no daemon.log, no v1/, no chmod
        assert not os.path.ismount(mnt)


def test_what_counts_as_a_cache_dir(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert claim_cache_dir(fresh) == []
    assert sorted(os.listdir(fresh)) == ["v1"]  # a failed start leaves a recognisable dir
    assert claim_cache_dir(fresh) == []
    (fresh / "my.log").write_text("a --log-file inside the cache dir\n")
    assert claim_cache_dir(fresh) == []  # a cache: whatever else is at the top is its own

    new_disk = tmp_path / "new-disk"  # a freshly made filesystem
    (new_disk / "lost+found").mkdir(parents=True)
    claim_cache_dir(new_disk)

    early = tmp_path / "early"  # an old daemon stopped before it made its layout
    early.mkdir()
    (early / "lock").write_text("123\n")
    (early / "daemon.log").write_text("...\n")
    claim_cache_dir(early)

    not_ours = tmp_path / "datasets"
    (not_ours / "v1" / "images").mkdir(parents=True)  # a data folder with a "v1" of its own
    with pytest.raises(CacheDirError, match=r"holds no s3cachefs cache \(v1\); give an empty"):
        claim_cache_dir(not_ours)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(CacheDirError, match="is not a directory"):
        claim_cache_dir(a_file)


def test_min_free_the_disk_cannot_honour_is_refused_before_anything_is_made(
    bucket: Bucket, tmp_path: Path
) -> None:
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    total = psutil.disk_usage(str(tmp_path)).total
    for value in ("1PB", str(total)):
        result = mount_cli(bucket, mnt, cache, "--min-free", value)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("s3cachefs: --min-free ")
        assert "is not below the size of the cache disk" in lines[0]
        assert not cache.exists()


def test_min_free_above_the_free_space_is_noted_once(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        (small / "filler").write_bytes(b"x" * 3 * 1024 * 1024)
        notes = check_min_free(small / "cache", 2 * 1024 * 1024)  # asks the nearest parent
        assert len(notes) == 1
        assert notes[0].startswith("the cache disk has ")
        assert f"free at {small}, less than --min-free 2.0 MiB" in notes[0]
        assert check_min_free(small / "cache", 512 * 1024) == []
        with pytest.raises(CacheDirError, match=r"--min-free 4.0 MiB is not below"):
            check_min_free(small, 4 * 1024 * 1024)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)

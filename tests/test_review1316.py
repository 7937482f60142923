"""Review of issues 13 and 16 (branch review1316): failing tests that show defects.

Each test names the defect it shows; they are expected to FAIL on main at cfb1359.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from s3cachefs import DatasetProvider
from s3cachefs.datasets.dirfetch import FetchItem, FetchResult, ObjectFetcher, ThreadFetcher
from s3cachefs.datasets.dirresult import SyncOptions
from s3cachefs.datasets.dirsync import DirSync
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo, ObjectStore
from s3cachefs.testing.memorystore import MemoryStore
from tests.conftest import Bucket, Mounter, run_cli
from tests.test_kernelserve import wait_for
from tests.test_kernelshards import shard_status
from tests.test_prefetch import fill, prefetch


def fetcher(store: ObjectStore, planner: Callable[[ObjectInfo], Check]) -> ObjectFetcher:
    return ThreadFetcher(store, 2, planner)


class KillSelf:
    """A fetcher whose process is killed (SIGKILL) as soon as the fetches start."""

    bytes_received = 0

    def fetch(self, items: Sequence[FetchItem], **_: object) -> Iterator[FetchResult | None]:
        os.kill(os.getpid(), signal.SIGKILL)
        yield None


def killed_run(options: SyncOptions, store: MemoryStore) -> None:
    """A DirSync run in a forked child, killed with SIGKILL once it starts fetching."""
    pid = os.fork()
    if pid == 0:
        try:
            DirSync(options, store, lambda s, p: KillSelf()).run()
        finally:
            os._exit(1)  # never back into pytest
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_kill9_mid_sync_does_not_make_delete_forget_a_deleted_object(tmp_path: Path) -> None:
    """dirsync.py:113-117: the run's first save drops the files S3 no longer lists from
    ``objects`` and empties ``kept``; ``_gone`` re-adds them in memory only (no journal
    line). A kill -9 before `_finish` forgets them: a later ``--delete`` run never
    deletes them, exits complete, and DEST holds a file S3 deleted."""
    store = MemoryStore()
    for name in ("a", "b", "c"):
        store.put(f"ds/{name}.bin", name.encode() * 100)
    dest = tmp_path / "dest"
    options = SyncOptions(store.bucket, "ds/", dest)
    assert DirSync(options, store, fetcher).run().complete

    store.delete("ds/b.bin")  # deleted in S3
    store.put("ds/d.bin", b"new object")  # something to fetch: the kill lands mid-run
    killed_run(options, store)

    final = DirSync(SyncOptions(store.bucket, "ds/", dest, delete=True), store, fetcher).run()
    assert final.complete
    assert "b.bin" in final.deleted
    assert not (dest / "b.bin").exists(), "a --delete sync left a file S3 deleted"


def test_delete_never_removes_a_file_outside_dest_through_a_symlink(tmp_path: Path) -> None:
    """dirsync.py:214-216 (and _commit 295-299): DEST/<rel> is unlinked/written by path;
    a directory of DEST that is a symlink leads outside DEST, and ``--delete`` removes a
    file there that the sync never wrote."""
    store = MemoryStore()
    store.put("ds/sub/f.bin", b"synced")
    store.put("ds/keep.bin", b"stays")
    dest = tmp_path / "dest"
    assert DirSync(SyncOptions(store.bucket, "ds/", dest), store, fetcher).run().complete

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.bin").write_bytes(b"not the sync's: someone else's file")
    (dest / "sub" / "f.bin").unlink()
    (dest / "sub").rmdir()
    (dest / "sub").symlink_to(outside)  # e.g. a directory moved to a bigger disk

    store.delete("ds/sub/f.bin")
    DirSync(SyncOptions(store.bucket, "ds/", dest, delete=True), store, fetcher).run()
    assert (outside / "f.bin").exists(), "--delete removed a file outside DEST"


def test_sync_of_a_dataset_with_no_objects_is_not_complete_and_verified(tmp_path: Path) -> None:
    """dirsync.py:331-333: a prefix with no objects (a typo, a shard of a small dataset)
    ends complete (exit 0, "complete and verified", ``ensure`` returns an empty Dataset),
    where `prefetch` (datasets/prefetch.py:168) refuses "holds no objects": the two modes
    of `DatasetProvider.ensure` disagree on the same input."""
    store = MemoryStore()
    store.put("dataset-v3/a.bin", b"x")
    result = DirSync(
        SyncOptions(store.bucket, "dataset-v3-typo/", tmp_path / "dest"), store, fetcher
    ).run()
    assert not result.complete


def test_unmount_after_kill_9_with_a_mount_root_overlay(bucket: Bucket, mounter: Mounter) -> None:
    """cli/mount.py:146-148 + daemon/mountpoint.py:36: after kill -9 of a daemon whose
    dataset at the mount root was kernel-served, our overlay stays on the mountpoint. Its
    statvfs is answered by the tree layer, so `is_stale` says False; `unmount` then tries
    the dead FUSE mount under the overlay by path and finds it "covered". The documented
    clean-up (`s3cachefs unmount MOUNTPOINT` of a dead daemon's mount) fails."""
    fill(bucket, count=6)
    mount = mounter(f"{bucket.name}/dataset-v3", "--min-free", "0")
    assert prefetch(mount, str(mount.path)).returncode == 0
    wait_for(lambda: shard_status(mount, None)["kernel_served"], "the root overlay")
    mount.kill9()
    mounter.mounts.remove(mount)
    try:
        result = run_cli("unmount", str(mount.path))
        assert result.returncode == 0, (result.stdout, result.stderr)
    finally:
        for _ in range(4):  # the overlay, then the dead FUSE mount under it
            subprocess.run(["umount", "-l", str(mount.path)], check=False, capture_output=True)


def test_both_modes_agree_on_a_key_that_is_also_a_directory(
    bucket: Bucket, tmp_path: Path, mounter: Mounter
) -> None:
    """api/daemonmode.py:80 vs datasets/dirplan.py:329: with ``ds/a`` and ``ds/a/b`` in S3,
    directory mode skips ``a`` (the directory wins, as in the FUSE view) but daemon mode
    returns ``a`` among the keys (prefetch pins it): a launcher hands a worker a key that is
    a directory at ``path/key``, and ``objects``/``bytes`` differ between the modes."""
    bucket.put("ds/a", b"file hidden by the directory a/")
    bucket.put("ds/a/b", b"inside a")
    bucket.put("ds/c", b"plain")
    mount = mounter(bucket.name, "--min-free", "0")
    served = DatasetProvider(bucket.name, mountpoint=mount.path).ensure("ds")
    synced = DatasetProvider(
        bucket.name, directory=tmp_path / "data", endpoint_url=bucket.server.endpoint_url
    ).ensure("ds")
    assert synced.keys == ("a/b", "c")
    assert served.keys == synced.keys
    assert all((served.path / key).is_file() for key in served.keys)

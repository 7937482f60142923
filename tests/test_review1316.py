"""Review of issues 13 and 16 (branch review1316): failing tests that show defects.

Each test names the defect it shows; they are expected to FAIL on main at cfb1359.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from s3cachefs import DatasetProvider
from s3cachefs.datasets.dirfetch import ObjectFetcher, ThreadFetcher
from s3cachefs.datasets.dirresult import SyncOptions
from s3cachefs.datasets.dirsync import DirSync
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo, ObjectStore
from s3cachefs.testing.memorystore import MemoryStore
from tests.conftest import Bucket, Mounter


def fetcher(store: ObjectStore, planner: Callable[[ObjectInfo], Check]) -> ObjectFetcher:
    return ThreadFetcher(store, 2, planner)


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

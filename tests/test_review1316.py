"""Review of issues 13 and 16 (branch review1316): failing tests that show defects.

Each test names the defect it shows; they are expected to FAIL on main at cfb1359.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from s3cachefs import DatasetProvider
from s3cachefs.datasets.dirfetch import ObjectFetcher, ThreadFetcher
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo, ObjectStore
from tests.conftest import Bucket, Mounter


def fetcher(store: ObjectStore, planner: Callable[[ObjectInfo], Check]) -> ObjectFetcher:
    return ThreadFetcher(store, 2, planner)


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

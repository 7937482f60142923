"""S3Store against the real local S3 server: the lean GET path and the botocore one."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import cast

import pytest

from s3cachefs.daemon import store as store_module
from s3cachefs.daemon.config import MountConfig
from s3cachefs.daemon.errors import NotFoundError, StaleError
from s3cachefs.daemon.rangeget import proxy_applies
from s3cachefs.daemon.store import S3Store
from tests.conftest import Bucket


def make_store(bucket: Bucket, tmp_path: Path) -> S3Store:
    config = MountConfig(
        bucket=bucket.name,
        prefix="",
        mountpoint=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        endpoint_url=bucket.server.endpoint_url,
    )
    store = S3Store(config)
    store.check_bucket()
    return store


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
def test_ranged_gets_are_exact_conditional_and_translated(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    if not lean:  # what a proxy in the environment selects
        monkeypatch.setattr(store_module, "proxy_applies", lambda url: True)
    data = os.urandom(3_000_000)
    etag = bucket.put("dir/a file+x.bin", data)
    store = make_store(bucket, tmp_path)
    assert (store._getter is not None) == lean
    pieces = list(store.iter_range("dir/a file+x.bin", etag, 100, 2_500_000, 1 << 20))
    assert [len(p) for p in pieces] == [1 << 20, 1 << 20, 2_500_000 - 100 - 2 * (1 << 20)]
    assert b"".join(pieces) == data[100:2_500_000]
    with pytest.raises(StaleError):
        list(store.iter_range("dir/a file+x.bin", '"0123"', 0, 10, 10))
    with pytest.raises(NotFoundError):
        list(store.iter_range("dir/missing", etag, 0, 10, 10))
    # An abandoned body gives its connection up instead of leaving it half-read.
    stream = cast(
        Generator[bytes], store.iter_range("dir/a file+x.bin", etag, 0, len(data), 1 << 20)
    )
    next(stream)
    stream.close()
    assert b"".join(store.iter_range("dir/a file+x.bin", etag, 0, 10, 10)) == data[:10]
    assert store.requests["get"] == 5


def test_a_proxy_in_the_environment_selects_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert not proxy_applies("http://127.0.0.1:9000/bucket/")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert proxy_applies("http://minio.internal:9000/bucket/")
    monkeypatch.setenv("NO_PROXY", "minio.internal")
    assert not proxy_applies("http://minio.internal:9000/bucket/")

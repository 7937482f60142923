"""Objects stored with a Content-Encoding are served as the bytes stored, never decoded.

S3 sends a stored ``Content-Encoding`` back with every GET (``aws s3 cp
--content-encoding gzip``, a ``.json.gz`` uploaded with it). The headers
describe the stored bytes, so every response check passes: a client that
decodes the body would cache or serve bytes that are not the object's, or
fail a read forever. Both GET paths, and a real mount, read the stored bytes.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
from pathlib import Path

import pytest

from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.store import s3 as store_module
from s3cachefs.store.s3 import S3Store
from tests.conftest import Bucket, Mounter, drop_page_cache, make_store, read_at
from tests.faultproxy import FaultProxy

KIB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encoded_objects(bucket: Bucket) -> dict[str, bytes]:
    """Objects labelled gzip: valid gzip and not, one GET long and many blocks long."""

    def valid(size: int) -> bytes:  # random bytes do not shrink: ~size bytes of real gzip
        return gzip.compress(os.urandom(size), mtime=0)

    objects = {
        "small.json.gz": valid(20 * KIB),
        "big.json.gz": valid(300 * KIB),
        "small-not-gzip.gz": os.urandom(20 * KIB),
        "big-not-gzip.gz": os.urandom(300 * KIB),
    }
    for key, data in objects.items():
        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=data, ContentEncoding="gzip")
    return objects


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
def test_the_store_reads_the_stored_bytes_of_an_encoded_object(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    if not lean:  # what a proxy in the environment selects
        monkeypatch.setattr(store_module, "proxy_applies", lambda url: True)
    objects = encoded_objects(bucket)
    store: S3Store = make_store(bucket, tmp_path)
    assert (store._getter is not None) == lean
    for key, data in objects.items():
        head = bucket.client.head_object(Bucket=bucket.name, Key=key)
        assert head["ContentEncoding"] == "gzip"  # the server does send it back
        etag, size = head["ETag"], len(data)
        # The whole object (checked against its MD5), its start, its middle, its end.
        mid = size // 2
        for start, end in ((0, size), (0, 16 * KIB), (mid, min(size, mid + 64 * KIB)), (7, size)):
            got = b"".join(store.iter_range(key, etag, start, end, 16 * KIB, size=size))
            assert sha(got) == sha(data[start:end]), (key, start, end)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
def test_a_mount_serves_and_caches_the_stored_bytes_of_an_encoded_object(
    bucket: Bucket,
    mounter: Mounter,
    proxy: FaultProxy,
    s3_server: LocalS3,
    monkeypatch: pytest.MonkeyPatch,
    lean: bool,
) -> None:
    objects = encoded_objects(bucket)
    bucket.put("unread", b"x" * 100)
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    # Small blocks and GETs: the big objects are read in many ranged GETs (64 KiB each),
    # the small ones in one GET of the whole object (checked against its MD5).
    small = ("--block-size", "64K", "--fetch-size", "64K")
    if lean:  # S3 behind the proxy as its endpoint: the lean GET path
        mount = mounter(bucket.name, *small, server=proxy)
    else:  # S3 itself, through the proxy as an HTTP proxy: botocore does the GETs
        with monkeypatch.context() as env:
            env.setenv("HTTP_PROXY", proxy.endpoint_url)
            mount = mounter(bucket.name, *small, server=s3_server)
    for key, data in objects.items():  # a middle first: the start is not cached before it
        path = mount.path / key
        mid = len(data) // 2 + 100
        assert sha_of(read_at(path, mid, 70 * KIB)) == sha(data[mid : mid + 70 * KIB]), key
        assert sha_of(read_at(path, 0, 4096)) == sha(data[:4096]), key
        assert sha(path.read_bytes()) == sha(data), key
    # What the cache holds is the stored bytes, and is all it serves; and the GETs did go
    # through the proxy (the GET path this test is about): an uncached object now fails.
    proxy.down = True
    drop_page_cache()
    for key, data in objects.items():
        assert sha((mount.path / key).read_bytes()) == sha(data), key
    assert read_at(mount.path / "unread", 0, 100) == errno.EIO
    assert mount.stop() == 0


def sha_of(got: bytes | int) -> str:
    return sha(got) if isinstance(got, bytes) else f"errno {got}"

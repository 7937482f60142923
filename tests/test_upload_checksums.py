"""Uploads to servers without additional checksums: refused, sent again without; ignored, noticed.

The store against the real local S3 server behind the fault proxy, acting as a
server that refuses checksum headers (400 InvalidArgument, as older MinIO and
Backblaze B2 do) or drops them (as older Ceph does); the multipart restart over
the in-memory store, at each step a server may refuse. Through a real mount:
tests/test_writes.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import (
    AlreadyExistsError,
    ChecksumsRefusedError,
    NotFoundError,
    TransientError,
)
from s3cachefs.store.checkplan import plan
from s3cachefs.store.checksums import Digest, crc64nvme
from s3cachefs.store.s3 import S3Store
from s3cachefs.store.types import ObjectInfo
from s3cachefs.store.uploadchecksums import NOT_KEPT
from s3cachefs.testing.memorystore import MemoryStore
from tests.conftest import Bucket
from tests.faultproxy import FaultProxy
from tests.test_blockcache import make_cache, run_with
from tests.test_writeback import PART, make_writeback

MIB = 1024 * 1024


def make_store(bucket: Bucket, tmp_path: Path, endpoint: str) -> S3Store:
    config = MountConfig(
        bucket=bucket.name,
        prefix="",
        mountpoint=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        endpoint_url=endpoint,
    )
    store = S3Store(config)
    store.check_bucket()
    return store


def sha256_in_s3(bucket: Bucket, key: str) -> str:
    """Straight from the S3 server, not through the proxy."""
    body = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def kept_checksum(bucket: Bucket, key: str) -> dict[str, str]:
    head = bucket.client.head_object(Bucket=bucket.name, Key=key, ChecksumMode="ENABLED")
    return {k: v for k, v in head.items() if k.startswith("Checksum") and k != "ChecksumType"}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.endswith("uploadchecksums") and r.levelno == logging.WARNING
    ]


def test_a_put_refused_for_its_checksum_goes_again_without_and_later_ones_go_without(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.reject_checksum_headers = True
    store = make_store(bucket, tmp_path, proxy.endpoint_url)
    first, second = os.urandom(100_000), b""  # a file, and a directory marker
    etag = store.put_object("a.bin", first, create_only=True)
    assert etag == f'"{hashlib.md5(first, usedforsecurity=False).hexdigest()}"'
    assert sha256_in_s3(bucket, "a.bin") == hashlib.sha256(first).hexdigest()
    assert kept_checksum(bucket, "a.bin") == {}  # verifiable by its MD5 ETag only
    assert proxy.faults["reject_checksum"] == 1
    assert not store.sends_checksums

    store.put_object("dir/", second, create_only=True)
    assert proxy.faults["reject_checksum"] == 1  # no further attempt with checksums
    assert store.requests["put"] == 3
    with pytest.raises(AlreadyExistsError):  # If-None-Match still goes with every PUT
        store.put_object("a.bin", b"other", create_only=True)
    assert sha256_in_s3(bucket, "a.bin") == hashlib.sha256(first).hexdigest()

    [warning] = warnings(caplog)
    assert "InvalidArgument" in warning and "x-amz-sdk-checksum-algorithm" in warning
    assert "Content-MD5 only" in warning and "MD5/multipart ETag only" in warning


def test_uploads_refused_at_once_all_succeed_with_one_warning(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.reject_checksum_headers = True
    store = make_store(bucket, tmp_path, proxy.endpoint_url)
    files = {f"f{i}": os.urandom(10_000 + i) for i in range(6)}
    barrier = threading.Barrier(len(files))

    def put(key: str) -> str:
        barrier.wait()
        return store.put_object(key, files[key], create_only=True)

    with ThreadPoolExecutor(len(files)) as pool:
        etags = dict(zip(files, pool.map(put, files), strict=True))
    for key, data in files.items():
        assert etags[key] == f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
        assert sha256_in_s3(bucket, key) == hashlib.sha256(data).hexdigest()
    assert 1 <= proxy.faults["reject_checksum"] <= len(files)
    assert len(warnings(caplog)) == 1


def test_a_multipart_upload_refused_for_its_checksums_is_its_callers_to_restart(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy
) -> None:
    proxy.reject_checksum_headers = True
    store = make_store(bucket, tmp_path, proxy.endpoint_url)
    with pytest.raises(ChecksumsRefusedError, match="InvalidArgument"):
        store.create_multipart("big.bin")
    assert store.sends_checksums  # nothing went up yet: the caller decides (staging.uploads)
    parts = [os.urandom(5 * MIB), os.urandom(MIB)]
    upload_id = store.create_multipart("big.bin", with_checksums=False)
    etags = [
        store.upload_part("big.bin", upload_id, n, p, with_checksums=False)
        for n, p in enumerate(parts, start=1)
    ]
    etag = store.complete_multipart("big.bin", upload_id, etags, create_only=True)
    assert etag.endswith('-2"')
    assert sha256_in_s3(bucket, "big.bin") == hashlib.sha256(b"".join(parts)).hexdigest()
    assert proxy.faults["reject_checksum"] == 1


def test_a_refused_put_whose_plain_retry_fails_is_an_error_and_proves_nothing(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.reject_checksum_headers = True
    proxy.methods = {"PUT"}
    proxy.rates["internal"] = 1.0  # what the checksums did not refuse fails with a 500
    store = make_store(bucket, tmp_path, proxy.endpoint_url)
    with pytest.raises(TransientError):
        store.put_object("a.bin", b"data", create_only=True)
    assert not bucket.client.list_objects_v2(Bucket=bucket.name).get("Contents")
    assert store.sends_checksums  # not known to refuse them: the next upload tries again
    assert warnings(caplog) == []


def test_a_server_that_drops_checksums_is_noticed_once_after_the_first_upload(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.strip_checksum_headers = True
    store = make_store(bucket, tmp_path, proxy.endpoint_url)
    data = os.urandom(5000)
    store.put_object("a.bin", data, create_only=True)
    assert store.requests["head"] == 1  # no echo of the checksum: one HEAD asked
    assert warnings(caplog) == [f"{NOT_KEPT} (s3://{bucket.name})"]
    store.put_object("b.bin", data, create_only=True)
    upload_id = store.create_multipart("c.bin")
    etag = store.upload_part("c.bin", upload_id, 1, data)
    crc = crc64nvme(data)
    store.complete_multipart(
        "c.bin", upload_id, [etag], create_only=True, part_crcs=[crc], crc64nvme=crc
    )
    assert store.requests["head"] == 1
    assert store.sends_checksums  # they are not refused: harmless, and kept by servers that can
    assert len(warnings(caplog)) == 1
    assert sha256_in_s3(bucket, "c.bin") == hashlib.sha256(data).hexdigest()


def test_a_server_that_keeps_checksums_costs_a_head_at_most_once_and_no_warning(
    bucket: Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(bucket, tmp_path, bucket.server.endpoint_url)
    store.put_object("a.bin", b"data", create_only=True)
    assert store.requests["head"] == 0  # the PUT's response echoed the CRC64NVME
    store = make_store(bucket, tmp_path, bucket.server.endpoint_url)
    data = os.urandom(1000)
    upload_id = store.create_multipart("b.bin")
    etag = store.upload_part("b.bin", upload_id, 1, data)
    crc = crc64nvme(data)
    store.complete_multipart(
        "b.bin", upload_id, [etag], create_only=True, part_crcs=[crc], crc64nvme=crc
    )
    assert store.requests["head"] == 1  # moto's completion echoes nothing: asked once
    store.put_object("c.bin", data, create_only=True)
    assert store.requests["head"] == 1
    assert "ChecksumCRC64NVME" in kept_checksum(bucket, "b.bin")
    assert warnings(caplog) == []


@pytest.mark.parametrize("step", ["put", "create", "part", "complete"])
def test_an_upload_refused_at_any_step_is_sent_again_whole_and_without_checksums(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, step: str
) -> None:
    store = MemoryStore()
    store.refuse_checksums = {step}
    cache = make_cache(tmp_path, store)
    wb = make_writeback(cache, store)
    data = os.urandom(1000 if step == "put" else 2 * PART + 777)

    async def upload(key: str) -> None:
        staged = await wb.create(key, create_only=True)
        await wb.write(staged, 0, data)
        version = await wb.release(staged)  # close(): uploaded, or an error
        assert version is not None
        assert await cache.read(version, 0, len(data)) == data

    async def body() -> None:
        await upload("first.bin")
        before = store.request_counts()
        await upload("second.bin")  # straight without checksums: nothing refused
        sent = store.request_counts() - before
        if step == "put":
            assert sent == {"put": 1}
        else:
            assert sent == {"multipart": 2, "put_part": 3}

    run_with(cache, body)
    for key in ("first.bin", "second.bin"):
        assert (
            b"".join(
                store.iter_range(key, store.head(key).etag, 0, len(data), PART, size=len(data))
            )
            == data
        )
        assert store.head_checksum(key, store.head(key).etag).algorithm is None
    assert not store.sends_checksums
    assert store._uploads == {}  # the refused multipart upload was aborted
    assert len(warnings(caplog)) == 1


def test_a_server_that_refuses_checksum_mode_still_has_its_objects_checked_by_etag() -> None:
    """Backblaze B2 refuses x-amz-checksum-mode too (400): a multipart ETag still checks."""
    store = MemoryStore()
    parts = [os.urandom(300), os.urandom(300), os.urandom(40)]
    store.put_parts("mp", parts)
    store.refuse_checksums = {"head"}
    check = plan(store, store.head("mp"))
    assert (check.kind, check.parts) == ("mpu-etag", (300, 300, 40))
    digest = Digest(check)
    digest.update(b"".join(parts))
    assert digest.matches()
    store.delete("mp")
    with pytest.raises(NotFoundError):  # what is not a refusal still fails
        plan(store, ObjectInfo("mp", 640, '"' + "0" * 32 + '-3"', 0))

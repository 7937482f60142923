"""Staging and uploads on their own, over the in-memory store: exact bytes, exact requests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from s3cachefs.base.errors import TransientError, UploadFailedError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.staging.records import FAILED, LEFT_OVER
from s3cachefs.staging.writeback import Writeback
from s3cachefs.testing.memorystore import MemoryStore
from tests.test_blockcache import make_cache, run_with

PART = 5 * 1024 * 1024


def make_writeback(cache: BlockCache, store: MemoryStore, part_size: int = PART) -> Writeback:
    wb = Writeback(
        cache,
        store,
        part_size=part_size,
        s3_limiter=trio.CapacityLimiter(8),
        disk_limiter=trio.CapacityLimiter(4),
    )
    wb.open()
    return wb


def test_a_multipart_upload_is_exact_and_its_blocks_are_cached(tmp_path: Path) -> None:
    store = MemoryStore()
    cache = make_cache(tmp_path, store)
    wb = make_writeback(cache, store)
    data = os.urandom(2 * PART + 777)

    async def body() -> None:
        staged = await wb.create("out/big.bin", create_only=True)
        for pos in range(0, len(data), 100_000):  # in order, then one rewrite behind
            await wb.write(staged, pos, data[pos : pos + 100_000])
        await wb.write(staged, 10, data[10:20])
        await wb.upload(staged)
        version = await wb.release(staged)
        assert version is not None and version.etag.endswith('-3"')
        gets = store.requests["get"]
        assert await cache.read(version, 0, len(data)) == data
        assert store.requests["get"] == gets  # the upload's bytes are the cache's bytes

    run_with(cache, body)
    assert store.requests["put_part"] == 3
    assert wb.staged == {} and list(wb.dir.iterdir()) == []


def test_a_failed_upload_stays_staged_and_is_found_after_a_restart(tmp_path: Path) -> None:
    store = MemoryStore()
    cache = make_cache(tmp_path, store)
    wb = make_writeback(cache, store)
    store.fail_puts = [TransientError("s3://mem/a.txt: S3 unavailable (500) after retries")]

    async def body() -> None:
        staged = await wb.create("a.txt", create_only=True)
        await wb.write(staged, 0, b"payload")
        with pytest.raises(UploadFailedError):
            await wb.upload(staged)
        assert await wb.release(staged) is None

    run_with(cache, body)
    assert [(s.key, s.state) for s in wb.left()] == [("a.txt", FAILED)]
    cache.close()

    cache = make_cache(tmp_path, store)  # a new daemon on the same cache dir
    wb = make_writeback(cache, store)
    (left,) = wb.left()
    assert (left.key, left.state, left.size) == ("a.txt", FAILED, 7)

    async def recover() -> None:
        version = await wb.upload_left(left, create_only=True)
        assert version == ObjectVersion("mem", "a.txt", version.etag, 7)

    run_with(cache, recover)
    assert store.head("a.txt").size == 7 and wb.left() == []


def test_a_file_open_at_a_crash_is_left_over_never_uploaded(tmp_path: Path) -> None:
    store = MemoryStore()
    cache = make_cache(tmp_path, store)
    wb = make_writeback(cache, store)

    async def body() -> None:
        staged = await wb.create("half.txt", create_only=True)
        await wb.write(staged, 0, b"half of it")

    run_with(cache, body)  # no close: the daemon "dies" here
    cache.close()
    cache = make_cache(tmp_path, store)
    wb = make_writeback(cache, store)
    assert [(s.key, s.state) for s in wb.left()] == [("half.txt", LEFT_OVER)]
    assert store.requests["put"] == 0

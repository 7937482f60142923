"""The block cache on its own, over the in-memory store: exact counters, injected faults."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from s3cachefs.base.errors import CacheDirError, StaleError, TransientError
from s3cachefs.cache import fetcher
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.state import BlockState
from s3cachefs.datasets.pins import Manifest, PinStore
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import ROOT_INODE
from s3cachefs.store.types import ObjectInfo
from s3cachefs.testing.memorystore import MemoryStore

BS = 64 * 1024  # small blocks keep these tests fast; the arithmetic is the same


def make_cache(path: Path, store: MemoryStore, **overrides: int) -> BlockCache:
    options = {"cache_size": 1 << 30, "min_free": 0, "memory_bytes": 0}
    options.update(overrides)
    cache = BlockCache(
        path,
        store,
        block_size=BS,
        s3_limiter=trio.CapacityLimiter(8),
        disk_limiter=trio.CapacityLimiter(4),
        **options,
    )
    cache.open()
    return cache


def run_with(cache: BlockCache, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            await body()
            await cache.drain()
            nursery.cancel_scope.cancel()

    trio.run(main)


def read_back(cache: BlockCache, v: ObjectVersion, data: bytes) -> None:
    """Read the whole object through ``cache`` and check every byte."""

    async def body() -> None:
        assert await cache.read(v, 0, len(data)) == data

    run_with(cache, body)


def version_of(store: MemoryStore, key: str, data: bytes) -> ObjectVersion:
    return ObjectVersion(store.bucket, key, store.put(key, data), len(data))


def test_concurrent_readers_share_one_get(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(3 * BS)
    v = version_of(store, "k", data)
    store.get_delay = 0.05
    cache = make_cache(tmp_path, store)
    results: list[bytes] = []

    async def body() -> None:
        async def reader() -> None:
            results.append(await cache.get_block(v, 1))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)

    run_with(cache, body)
    assert results == [data[BS : 2 * BS]] * 8
    assert store.requests["get"] == 1


def test_a_cancelled_reader_does_not_fail_the_others(tmp_path: Path) -> None:
    store = MemoryStore()
    v = version_of(store, "k", b"x" * BS)
    store.get_delay = 0.2
    cache = make_cache(tmp_path, store)
    got: list[bytes] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as doomed:
                nursery.start_soon(lambda: _append(got, cache.get_block(v, 0)))
                await trio.sleep(0.01)
                doomed.cancel()
            with trio.move_on_after(0.01):  # the first reader, cancelled mid-fetch
                await cache.get_block(v, 0)
        assert await cache.get_block(v, 0) == b"x" * BS

    run_with(cache, body)
    assert got == [b"x" * BS]
    assert store.requests["get"] == 1


async def _append(out: list[bytes], value: Awaitable[bytes]) -> None:
    out.append(await value)


def test_cache_persists_across_reopen_with_zero_gets(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(5 * BS + 123)
    v = version_of(store, "dir/obj", data)
    cache = make_cache(tmp_path, store)

    read_back(cache, v, data)
    cache.close()
    assert store.requests["get"] == 1  # six missing blocks in a row: one GET
    assert cache.stats["misses"] == 6
    cache = make_cache(tmp_path, store)
    assert cache.used_bytes == len(data)
    read_back(cache, v, data)
    assert store.requests["get"] == 1
    assert cache.stats["hits_disk"] == 6


def test_bit_flip_and_truncation_are_misses_never_wrong_bytes(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(4 * BS)
    v = version_of(store, "k", data)
    cache = make_cache(tmp_path, store)

    read_back(cache, v, data)
    cache.close()
    path = next(p for p in (tmp_path / "v1" / "objects").rglob("*") if p.is_file())
    raw = bytearray(path.read_bytes())
    raw[BS + 5] ^= 0x01
    path.write_bytes(bytes(raw[: 3 * BS]))  # one flipped bit, and the last block cut off
    cache = make_cache(tmp_path, store)
    read_back(cache, v, data)
    assert cache.stats["corrupt_blocks"] == 2
    assert store.requests["get"] == 1 + 2  # blocks 1 and 3 again, each its own GET


def test_a_run_of_missing_blocks_is_split_into_gets_of_fetch_size(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(7 * BS)
    v = version_of(store, "k", data)
    cache = make_cache(tmp_path, store, fetch_bytes=3 * BS)

    async def body() -> None:
        assert await cache.get_block(v, 2) == data[2 * BS : 3 * BS]
        await cache.drain()
        assert await cache.read(v, 0, len(data)) == data  # misses 0-1 and 3-6

    run_with(cache, body)
    assert store.requests["get"] == 1 + 1 + 2  # block 2; blocks 0-1; blocks 3-5 and 6
    assert cache.stats["blocks_from_s3"] == 7
    # get_block is not a read; the read found block 2 on disk: 6 misses, 1 hit
    assert (cache.stats["misses"], cache.stats["hits_disk"]) == (6, 1)


def test_a_failed_get_fails_its_waiters_and_is_retried_by_the_next(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(4 * BS)
    v = version_of(store, "k", data)
    cache = make_cache(tmp_path, store)

    async def body() -> None:
        store.fail_next = [TransientError("503 SlowDown")]
        with pytest.raises(TransientError):
            await cache.read(v, 0, len(data))
        assert await cache.read(v, 0, len(data)) == data

    run_with(cache, body)
    assert store.requests["get"] == 2


def test_index_rows_without_data_are_dropped(tmp_path: Path) -> None:
    store = MemoryStore()
    v = version_of(store, "k", b"y" * BS)
    cache = make_cache(tmp_path, store)

    async def read() -> None:
        assert await cache.get_block(v, 0) == b"y" * BS

    run_with(cache, read)
    cache.close()
    for p in (tmp_path / "v1" / "objects").rglob("*"):
        if p.is_file():
            p.unlink()
    cache = make_cache(tmp_path, store)
    assert cache.used_bytes == 0
    run_with(cache, read)
    assert store.requests["get"] == 2


def test_eviction_keeps_the_cache_bounded_and_drops_least_recent(tmp_path: Path) -> None:
    store = MemoryStore()
    versions = [version_of(store, f"k{i}", bytes([i]) * BS) for i in range(6)]
    cache = make_cache(tmp_path, store, cache_size=3 * BS)

    async def body() -> None:
        for i in (0, 1, 2, 0, 3):  # after the second k0, k1 is the least recent
            await cache.get_block(versions[i], 0)
            await cache.drain()
        assert cache.used_bytes == 3 * BS
        assert not cache.is_cached(versions[1], 0)
        assert cache.is_cached(versions[0], 0)
        for v in versions[4:]:
            await cache.get_block(v, 0)
        await cache.drain()
        assert cache.used_bytes <= 3 * BS

    run_with(cache, body)
    files = [p for p in (tmp_path / "v1" / "objects").rglob("*") if p.is_file()]
    assert len(files) == 3  # evicted objects' files are gone from disk
    assert cache.stats["evictions"] == 3


def test_min_free_larger_than_the_disk_serves_without_caching(tmp_path: Path) -> None:
    store = MemoryStore()
    v = version_of(store, "k", b"z" * BS)
    cache = make_cache(tmp_path, store, min_free=1 << 62)

    async def body() -> None:
        for _ in range(2):
            assert await cache.get_block(v, 0) == b"z" * BS
            await cache.drain()

    run_with(cache, body)
    assert cache.used_bytes == 0
    assert cache.stats["store_skipped_full"] == 2
    assert store.requests["get"] == 2
    assert not [p for p in (tmp_path / "v1" / "objects").rglob("*") if p.is_file()]


def test_changed_object_raises_stale_and_errors_reach_every_waiter(tmp_path: Path) -> None:
    store = MemoryStore()
    v = version_of(store, "k", b"a" * 2 * BS)
    store.put("k", b"b" * 2 * BS)
    cache = make_cache(tmp_path, store)

    async def body() -> None:
        with pytest.raises(StaleError):
            await cache.get_block(v, 0)
        store.fail_next = [TransientError("boom")]
        fresh = ObjectVersion(store.bucket, "k", store.head("k").etag, 2 * BS)
        with pytest.raises(TransientError):
            await cache.get_block(fresh, 0)
        assert await cache.get_block(fresh, 0) == b"b" * BS  # failures are not cached

    run_with(cache, body)


def test_a_second_daemon_on_the_same_cache_dir_is_refused(tmp_path: Path) -> None:
    store = MemoryStore()
    first = make_cache(tmp_path, store)
    with pytest.raises(CacheDirError, match="in use"):
        make_cache(tmp_path, store)
    first.close()
    make_cache(tmp_path, store).close()


def test_sequential_reads_trigger_readahead_random_reads_do_not(tmp_path: Path) -> None:
    store = MemoryStore()
    store.put("seq.bin", os.urandom(32 * BS))
    store.put("rand.bin", os.urandom(128 * BS))
    cache = make_cache(tmp_path, store)
    limiter = trio.CapacityLimiter(8)
    core = FsCore(store, cache, prefix="", metadata_ttl=60, s3_limiter=limiter, readahead_blocks=4)

    async def body() -> None:
        seq = await core.lookup(ROOT_INODE, "seq.bin")
        assert seq is not None
        fh, _ = await core.open(seq.ino)
        for i in range(4):
            await core.read(fh, i * BS, BS)
        await cache.drain()
        assert cache.stats["readahead"] > 0
        assert cache.is_cached(core.file_handle(fh).version, 6)  # fetched before it was asked for
        before = cache.stats["readahead"]
        rand = await core.lookup(ROOT_INODE, "rand.bin")
        assert rand is not None
        fh2, _ = await core.open(rand.ino)
        for block in (100, 3, 60, 20):  # jumps of more than SEQUENTIAL_SLACK
            await core.read(fh2, block * BS, BS)
        assert cache.stats["readahead"] == before

    run_with(cache, body)


def test_a_damaged_index_is_set_aside_and_the_cache_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    data = os.urandom(3 * BS)
    v = version_of(store, "k", data)
    cache = make_cache(tmp_path, store)

    read_back(cache, v, data)
    cache.close()
    db = tmp_path / "v1" / "index" / "cache.db"
    db.write_bytes(b"this is not an sqlite database" * 100)  # what a bad disk leaves
    with caplog.at_level("ERROR"):
        cache = make_cache(tmp_path, store)
    assert "cache index damaged" in caplog.text
    assert cache.used_bytes == 0
    assert list((tmp_path / "v1").glob("index.damaged-*"))
    assert not [p for p in (tmp_path / "v1" / "objects").rglob("*") if p.is_file()]
    read_back(cache, v, data)  # fetched again, right bytes
    assert store.requests["get"] == 2


class GatedStore(MemoryStore):
    """Sends the first piece of a GET, then waits for ``gate`` before the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def iter_range(
        self,
        key: str,
        etag: str,
        start: int,
        end: int,
        chunk: int,
        first: int = 0,
        *,
        size: int,
    ) -> Iterator[bytes]:
        pieces = super().iter_range(key, etag, start, end, chunk, first, size=size)
        for n, piece in enumerate(pieces):
            if n == 1:
                assert self.gate.wait(10)
            yield piece


def test_a_cold_read_of_a_block_start_is_served_before_the_whole_block(tmp_path: Path) -> None:
    store = GatedStore()
    data = os.urandom(3 * 1024 * 1024)
    v = ObjectVersion(store.bucket, "k", store.put("k", data), len(data))
    cache = BlockCache(
        tmp_path,
        store,
        block_size=1024 * 1024,
        cache_size=1 << 30,
        min_free=0,
        memory_bytes=0,
        s3_limiter=trio.CapacityLimiter(8),
        disk_limiter=trio.CapacityLimiter(4),
    )
    cache.open()

    async def body() -> None:
        with trio.fail_after(5):  # the rest of the block is held back: only the start can come
            assert await cache.read(v, 100, 4096) == data[100:4196]
        assert cache.stats.counts["early_reads"] == 1
        store.gate.set()
        assert await cache.read(v, 0, len(data)) == data  # the same GET finishes the block
        assert await cache.read(v, 200_000, 10) == data[200_000:200_010]

    run_with(cache, body)
    assert store.requests["get"] == 2  # the eager block 0, then blocks 1-2 in one run


def test_a_disk_slower_than_the_network_makes_the_download_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetcher, "UNWRITTEN_LIMIT", 4 * BS)
    store = MemoryStore()
    data = os.urandom(64 * BS)
    v = version_of(store, "big", data)
    cache = make_cache(tmp_path, store)
    slow_write = cache._disk.write_block

    def write(*args: Any) -> None:
        time.sleep(0.005)  # a slow disk
        slow_write(*args)

    monkeypatch.setattr(cache._disk, "write_block", write)
    peak = 0
    spawn = cache._fetcher._spawn_store

    def spawn_and_measure(version: ObjectVersion, index: int, block: bytes, **kw: Any) -> None:
        nonlocal peak
        spawn(version, index, block, **kw)
        peak = max(peak, cache._fetcher._unwritten)

    monkeypatch.setattr(cache._fetcher, "_spawn_store", spawn_and_measure)

    async def body() -> None:
        cache.start_fetch(v, range(64), persist=True)
        for idx in range(64):
            await cache.get_block(v, idx)

    run_with(cache, body)
    assert cache.missing_blocks(v) == []
    assert BS <= peak <= 5 * BS  # the limit, plus the block in hand when it was checked


def test_where_a_block_is_has_one_answer_through_its_life(tmp_path: Path) -> None:
    """The one predicate every read path asks (`cache.state`): missing, its GET under way,
    its bytes arrived but not yet written, on disk, in memory; in memory only when the
    disk cannot take it."""
    store = GatedStore()  # holds back every piece of a GET after the first
    v = version_of(store, "k", os.urandom(2 * BS))
    cache = make_cache(tmp_path / "a", store, memory_bytes=2 * BS)
    held = [object() for _ in range(4)]  # every token of the disk limiter: no write lands

    def where(index: int) -> BlockState:
        return cache._block_state(v, index)

    async def body() -> None:
        assert where(0) is BlockState.MISSING
        for h in held:
            cache._disk_limiter.acquire_on_behalf_of_nowait(h)
        cache.start_fetch(v, range(2), persist=True)  # one GET; a prefetch keeps no memory copy
        assert (where(0), where(1)) == (BlockState.IN_FLIGHT, BlockState.IN_FLIGHT)
        await cache.get_block(v, 0)  # block 0 is in; block 1 is held back by the store
        assert (where(0), where(1)) == (BlockState.ARRIVED, BlockState.IN_FLIGHT)
        store.gate.set()
        for h in held:
            cache._disk_limiter.release_on_behalf_of(h)
        await cache.drain()
        assert (where(0), where(1)) == (BlockState.DISK, BlockState.DISK)
        await cache.read(v, 0, BS)  # read back from disk, and kept in memory
        assert (where(0), where(1)) == (BlockState.MEMORY, BlockState.DISK)

    run_with(cache, body)
    assert store.requests["get"] == 1

    full = make_cache(tmp_path / "b", store, min_free=1 << 62, memory_bytes=2 * BS)

    async def read_uncached() -> None:
        await full.read(v, 0, BS)
        await full.drain()
        assert full._block_state(v, 0) is BlockState.MEMORY_ONLY
        assert full._block_state(v, 1) is BlockState.MISSING

    run_with(full, read_uncached)
    assert full.stats["store_skipped_full"] == 1


def test_the_pin_store_tells_the_cache_ledger_every_change(tmp_path: Path) -> None:
    """The ledger owns the pinned set; the pin store passes on each change at once."""
    store = MemoryStore()
    a, b = (version_of(store, f"ds/{n}", bytes([n]) * BS) for n in range(2))
    cache = make_cache(tmp_path, store)

    async def fill() -> None:
        for v in (a, b):
            await cache.get_block(v, 0)

    run_with(cache, fill)
    manifest = Manifest(store.bucket, "ds/", None, complete=True)
    manifest.objects["ds/0"] = ObjectInfo("ds/0", BS, a.etag, 1)
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()
    assert cache.pinned == set() and cache.pinned_bytes == 0
    pins.hold("job", b.oid)  # a running prefetch verified b
    assert cache.pinned == {b.oid} and cache.pinned_bytes == BS
    pins.save(manifest)
    assert cache.pinned == {a.oid, b.oid} == pins.pinned_oids()
    pins.release("job")
    assert cache.pinned == {a.oid}
    cache.close()

    cache = make_cache(tmp_path, store)  # a restart: the saved manifest pins a again
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()
    assert cache.pinned == {a.oid} and cache.pinned_bytes == BS
    pins.delete(manifest)
    assert cache.pinned == set() and cache.pinned_bytes == 0


def test_a_block_fetched_by_an_open_is_the_next_reads_miss(tmp_path: Path) -> None:
    # The GET an open starts often ends before the kernel's first READ arrives; that
    # read is still a miss (its bytes came from S3), and only the one after is a hit.
    store = MemoryStore()
    etag = store.put("a.bin", b"a" * 100)
    version = ObjectVersion(store.bucket, "a.bin", etag, 100)
    cache = make_cache(tmp_path, store)

    async def body() -> None:
        cache.open_hint(version)
        await cache.drain()  # the open's GET has ended
        assert await cache.read(version, 0, 100) == b"a" * 100
        assert await cache.read(version, 0, 100) == b"a" * 100

    run_with(cache, body)
    counts = cache.stats.counts
    assert (counts["open_fetches"], counts["misses"]) == (1, 1)
    assert counts["hits_memory"] + counts["hits_disk"] == 1
    assert store.requests["get"] == 1


def test_a_full_index_db_is_one_warning_and_gives_the_room_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk can show as SQLite's "database or disk is full" on the index row rather
    # than ENOSPC on the file: the same condition, so the same one line, and the read served.
    store = MemoryStore()
    data = os.urandom(BS)
    version = ObjectVersion(store.bucket, "k", store.put("k", data), BS)
    cache = make_cache(tmp_path, store)

    def full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(cache._disk, "write_block", full)
    got: list[bytes] = []

    async def body() -> None:
        got.append(await cache.read(version, 0, BS))

    with caplog.at_level(logging.WARNING, logger="s3cachefs.cache.fetcher"):
        run_with(cache, body)
    assert got == [data]
    warnings = [r for r in caplog.records if r.name == "s3cachefs.cache.fetcher"]
    assert [r.getMessage() for r in warnings] == [
        "cache write failed for k: index: database or disk is full; reads go to S3"
    ]
    assert warnings[0].exc_info is None  # no traceback
    assert cache.used_bytes == 0 and cache.stats["disk_errors"] == 1

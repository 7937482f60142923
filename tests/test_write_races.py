"""Write-through edge cases on the in-memory store: races, crashes, limits (no kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from s3cachefs.base.errors import ConfigError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import ROOT_INODE
from s3cachefs.fs.writes import Writer
from s3cachefs.staging.writeback import Writeback
from s3cachefs.testing.memorystore import MemoryStore
from tests.test_blockcache import BS, make_cache, run_with
from tests.test_writeback import make_writeback

PART = 5 * 1024 * 1024


def setup(
    tmp_path: Path,
    store: MemoryStore,
    *,
    overwrite: bool = False,
    delete: bool = False,
    **cache_opts: int,
) -> tuple[BlockCache, Writeback, FsCore, Writer]:
    cache = make_cache(tmp_path, store, **cache_opts)
    wb = make_writeback(cache, store)
    lim = trio.CapacityLimiter(8)
    core = FsCore(
        store,
        cache,
        prefix="",
        metadata_ttl=60,
        s3_limiter=lim,
        writeback=wb,
        allow_overwrite=overwrite,
        allow_delete=delete,
    )
    assert core.writer is not None
    return cache, wb, core, core.writer


def test_a_reader_of_a_written_file_reads_verified_bytes_after_eviction(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    cache, _wb, core, writer = setup(tmp_path, store, cache_size=4 * BS)
    data = b"x" * (4 * BS)
    got: list[bytes] = []

    async def body() -> None:
        fh, node = await writer.create(ROOT_INODE, "out.bin")
        await writer.write(fh, 0, data)
        reader, _ = await core.open(node.ino)  # e.g. `tail`/a consumer opened it while written
        await writer.flush(fh)
        await writer.release(fh)  # adopted: the staged inode is now the cache file
        other = ObjectVersion(
            store.bucket, "other.bin", store.put("other.bin", b"o" * 4 * BS), 4 * BS
        )
        await cache.read(other, 0, 4 * BS)  # cache pressure: out.bin's blocks evicted
        await cache.drain()
        got.append(await core.read(reader, 0, BS))

    run_with(cache, body)
    assert got[0] == b"x" * BS, f"reader got {got[0][:8]!r}... (holes punched by eviction)"


def test_staged_files_act_only_on_their_own_bucket(tmp_path: Path) -> None:
    a = MemoryStore("bucket-a")
    cache = make_cache(tmp_path, a)
    wb = make_writeback(cache, a)

    async def crash() -> None:
        s = await wb.create("results/out.json", create_only=True)
        await wb.write(s, 0, b"for bucket a")

    run_with(cache, crash)
    cache.close()
    b = MemoryStore("bucket-b")  # next mount on the same (default) cache dir is another bucket
    cache = make_cache(tmp_path, b)
    wb = make_writeback(cache, b)
    (left,) = wb.left()
    assert left.bucket == "bucket-a"

    with pytest.raises(ConfigError, match="s3://bucket-a"):
        wb.select(["results/out.json"], False, upload=True)
    assert wb.select([], True, upload=True) == []  # --all leaves other buckets' files alone

    async def upload() -> None:
        with pytest.raises(ConfigError):
            await wb.upload_left(left, create_only=True)

    run_with(cache, upload)
    assert list(b._objects) == []


def test_a_reopen_during_release_keeps_the_new_writer(tmp_path: Path) -> None:
    store = MemoryStore()
    cache, _wb, _core, writer = setup(tmp_path, store, overwrite=True, delete=True)
    out: dict[str, object] = {}

    async def body() -> None:
        fh, node = await writer.create(ROOT_INODE, "f.txt")
        await writer.write(fh, 0, b"first")
        await writer.flush(fh)  # close(): FLUSH
        # hold the cache's disk limiter so the RELEASE's adopt is parked mid-way
        holders = [object() for _ in range(4)]
        for h in holders:
            cache._disk_limiter.acquire_on_behalf_of_nowait(h)
        async with trio.open_nursery() as n:
            n.start_soon(writer.release, fh)  # RELEASE of the first `echo > f`
            await trio.testing.wait_all_tasks_blocked()
            fh2 = await writer.open(node.ino, truncate=True)  # the second `echo > f`
            for h in holders:
                cache._disk_limiter.release_on_behalf_of(h)
        out["staged_after"] = node.staged
        await writer.write(fh2, 0, b"second, still being written")
        # The file is open for writing, yet unlink is allowed and deletes the object
        try:
            await writer.unlink(ROOT_INODE, "f.txt")
            out["unlink"] = "allowed"
        except Exception as exc:
            out["unlink"] = type(exc).__name__
        await writer.flush(fh2)
        await writer.release(fh2)

    run_with(cache, body)
    assert out["staged_after"] is not None, "node.staged cleared while a new writer holds it"
    assert out["unlink"] == "BusyError"


def test_a_delete_right_after_close_waits_for_the_release(tmp_path: Path) -> None:
    # `echo x > f; rm f`: close() returns after FLUSH, the kernel's RELEASE (and the
    # hand-over to the cache) comes after; the delete must not see "still being written".
    store = MemoryStore()
    cache, _wb, _core, writer = setup(tmp_path, store, overwrite=True, delete=True)
    out: dict[str, object] = {}

    async def body() -> None:
        fh, node = await writer.create(ROOT_INODE, "f.txt")
        await writer.write(fh, 0, b"written")
        await writer.flush(fh)
        holders = [object() for _ in range(4)]  # park the release's adopt mid-way
        for h in holders:
            cache._disk_limiter.acquire_on_behalf_of_nowait(h)
        async with trio.open_nursery() as n:
            n.start_soon(writer.release, fh)
            await trio.testing.wait_all_tasks_blocked()
            out["staged_during"] = node.staged is not None
            n.start_soon(writer.unlink, ROOT_INODE, "f.txt")
            await trio.testing.wait_all_tasks_blocked()
            for h in holders:
                cache._disk_limiter.release_on_behalf_of(h)
        out["in_s3"] = "f.txt" in store._objects

    run_with(cache, body)
    assert out["staged_during"] is True  # the race was there
    assert out["in_s3"] is False  # and the delete went through once the release ended


def test_a_file_larger_than_the_cache_is_not_adopted_and_evicts_nothing(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    cache, _wb, _core, writer = setup(tmp_path, store, cache_size=4 * BS)
    warm = ObjectVersion(store.bucket, "warm.bin", store.put("warm.bin", b"w" * 3 * BS), 3 * BS)
    out: dict[str, object] = {}

    async def body() -> None:
        await cache.read(warm, 0, 3 * BS)
        await cache.drain()
        out["warm_before"] = len(cache.missing_blocks(warm))
        fh, _node = await writer.create(ROOT_INODE, "big.bin")
        await writer.write(fh, 0, b"b" * 6 * BS)  # bigger than --cache-size
        await writer.flush(fh)
        await writer.release(fh)
        out["warm_after"] = len(cache.missing_blocks(warm))
        out["adopted"] = cache.stats.counts["adopted_bytes"]

    run_with(cache, body)
    assert out["warm_after"] == 0, out


def test_a_part_size_the_cache_block_does_not_divide_is_refused(tmp_path: Path) -> None:
    store = MemoryStore()
    cache = make_cache(tmp_path, store)  # a cache dir keeps the block size it was made with
    with pytest.raises(ConfigError, match="not a multiple of the block size"):
        make_writeback(cache, store, part_size=BS + BS // 2)


def test_an_unexpected_part_error_fails_the_upload_and_aborts_it(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    cache = make_cache(tmp_path, store)
    wb = make_writeback(cache, store, part_size=2 * BS)
    out: dict[str, object] = {}

    async def body() -> None:
        s = await wb.create("m.bin", create_only=True)
        await wb.write(s, 0, b"z" * 5 * BS)
        store.fail_puts = [RuntimeError("an error nobody mapped")]  # type: ignore[list-item]
        try:
            await wb.upload(s)  # close(): FLUSH
        except Exception as exc:
            out["flush"] = type(exc).__name__
        out["state_after_flush"] = s.state
        out["record"] = s.record_path.read_text()
        await wb.release(s)  # RELEASE retries (state is still "writing") and succeeds
        out["open_uploads_in_s3"] = list(store._uploads)

    run_with(cache, body)
    assert out["open_uploads_in_s3"] == [], out

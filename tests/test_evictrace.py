"""A delete of an object's rows or file, taken off the books on the trio thread and run later
in a worker thread, must not land on a newer write of the same object (review finding).

Each test holds the disk side of one delete (its worker thread waits on an event), lets a
read (or a bulk commit) write the same object meanwhile, then lets the delete go. Before
the fix the late delete took the new write's object row (a block row with no object row is
dropped at the next start, its file swept), its file, or its block's row and bytes (a
hole): the ledger still counted the blocks, so the next read of one found no file or a
failed CRC (a warning, a miss, a second GET; never wrong bytes), and a restart lost them.
Now a write of an object that must stay on disk (a prefetch's) waits until every delete of
it taken before has run; a read's is not kept this time instead (it must not stall downloads).
"""

from __future__ import annotations

import errno
import os
import threading
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.bulk import _Waiting
from s3cachefs.cache.bulkworker import Done, Job
from s3cachefs.cache.deleting import WHOLE, Deleting
from s3cachefs.cache.flights import Flight
from s3cachefs.testing.memorystore import MemoryStore
from tests.test_blockcache import BS, make_cache, version_of


class HeldDeletes:
    """Holds, in their worker thread, the disk deletes (evictions, frees, a failed block's
    row) of one oid until
    ``release``; also tells when a block write of that oid has been made on the disk."""

    def __init__(self, cache: BlockCache, oid: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held = threading.Event()
        self.release = threading.Event()
        self.written = threading.Event()
        disk = cache._disk
        self.limiter = cache.disk_limiter
        evict, free, write_block = disk.evict, disk.free, disk.write_block
        forget_block = disk.forget_block
        index_written, adopt = disk.index_written, disk.adopt

        def hold() -> None:
            self.written.clear()  # a write of the oid from now on is the newer one
            self.held.set()
            assert self.release.wait(30), "the test never let the delete go"

        def held_evict(victims: list[Any]) -> None:
            if any(victim[0] == oid for victim in victims):
                hold()
            evict(victims)

        def held_free(victim: str, blocks: list[int]) -> None:
            if victim == oid:
                hold()
            free(victim, blocks)

        def held_forget(victim: str, index: int) -> None:
            if victim == oid:
                hold()
            forget_block(victim, index)

        def noted_write(version: ObjectVersion, *args: Any) -> None:
            write_block(version, *args)
            if version.oid == oid and args[2] is not None:  # data written, not only evictions
                self.written.set()

        def noted_commit(rows: list[Any]) -> list[bool]:
            kept = index_written(rows)
            self.written.set()
            return kept

        def noted_adopt(version: ObjectVersion, *args: Any) -> None:
            adopt(version, *args)
            if version.oid == oid:
                self.written.set()

        # Instance attributes: `Disk.write_block` calls ``self.evict``, so it is held too.
        monkeypatch.setattr(disk, "evict", held_evict)
        monkeypatch.setattr(disk, "free", held_free)
        monkeypatch.setattr(disk, "forget_block", held_forget)
        monkeypatch.setattr(disk, "write_block", noted_write)
        monkeypatch.setattr(disk, "index_written", noted_commit)
        monkeypatch.setattr(disk, "adopt", noted_adopt)

    async def until_held(self) -> None:
        assert await trio.to_thread.run_sync(self.held.wait, 30)

    async def let_go(self) -> None:
        """Let the delete go once the newer write is on the disk if it went ahead (the old
        order: the late delete then lands on it), or at once if it waits (the new order).
        Once every task waits, a write that went ahead is done, or holds a disk slot (its
        thread started) beside the held delete's; one that waits for the delete holds none."""
        await trio.testing.wait_all_tasks_blocked()
        if self.limiter.borrowed_tokens > 1 or self.written.is_set():
            assert await trio.to_thread.run_sync(self.written.wait, 30)
        self.release.set()


def run(cache: BlockCache, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(60):  # a hang is a failure
                await body()
                await cache.drain()
            nursery.cancel_scope.cancel()

    trio.run(main)


async def fetch(cache: BlockCache, v: ObjectVersion) -> bytes:
    """Block 0 of ``v`` fetched to stay on disk (as a prefetch does: its write waits for
    a pending delete of it; a read's is not kept instead: `Fetcher._store_block`)."""
    cache.start_fetch(v, range(1), persist=True)
    return await cache.get_block(v, 0)


def put(store: MemoryStore, key: str, size: int = BS) -> tuple[ObjectVersion, bytes]:
    data = os.urandom(size)
    return version_of(store, key, data), data


def outcome(
    cache: BlockCache, store: MemoryStore, path: Path, v: ObjectVersion, data: bytes
) -> tuple[list[int], int, int, list[int]]:
    """What the books say of ``v``, what a read of the blocks they hold costs, what a
    restart keeps: (missing blocks, extra GETs, corrupt blocks, missing after a restart)."""
    missing = cache.missing_blocks(v)
    gets, corrupt = store.requests["get"], cache.stats["corrupt_blocks"]

    async def read_held() -> None:
        for idx in set(range(-(-v.size // BS))) - set(missing):
            assert await cache.read(v, idx * BS, BS) == data[idx * BS : (idx + 1) * BS]

    run(cache, read_held)
    extra = (store.requests["get"] - gets, cache.stats["corrupt_blocks"] - corrupt)
    cache.close()
    again = make_cache(path, store, cache_size=1 << 30)
    try:
        return (missing, *extra, again.missing_blocks(v))
    finally:
        again.close()


def test_an_eviction_of_an_object_lands_before_its_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's last block evicted (by B's write, held); A fetched again meanwhile: its new record's
    first write puts the object row and marks it indexed. Before: the late delete took that
    row and the new file (a read then found no file: a warning, a second GET), and a
    restart dropped the block row and swept the file."""
    store = MemoryStore()
    (a, data), (c, _), (b, _) = (put(store, k) for k in "acb")
    cache = make_cache(tmp_path, store, cache_size=2 * BS)
    held = HeldDeletes(cache, a.oid, monkeypatch)

    async def body() -> None:
        for v in (a, c):
            await cache.read(v, 0, BS)
            await cache.drain_object(v)
        assert await cache.read(b, 0, BS)  # its write evicts A (the least recent): held
        await held.until_held()
        assert cache.missing_blocks(a) == [0]
        assert await fetch(cache, a)  # a GET; its write evicts C
        await held.let_go()

    run(cache, body)
    assert store.requests["get"] == 4
    assert outcome(cache, store, tmp_path, a, data) == ([], 0, 0, [])


def test_a_punched_block_lands_before_the_blocks_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One block of A evicted (a hole punched, held) while A keeps another; the block
    fetched again meanwhile. Before: the late punch made a hole of the new bytes and took their
    row (the read after it failed its CRC: a warning, a second GET; with no such read, a
    restart lost the block)."""
    store = MemoryStore()
    a, data = put(store, "a", 2 * BS)
    (c, _), (b, _) = (put(store, k) for k in "cb")
    cache = make_cache(tmp_path, store, cache_size=3 * BS)
    held = HeldDeletes(cache, a.oid, monkeypatch)

    async def body() -> None:
        await cache.read(a, 0, 2 * BS)
        await cache.drain_object(a)
        await cache.read(c, 0, BS)
        await cache.drain_object(c)
        await cache.read(a, BS, BS)  # from disk: A1 goes last; the LRU is A0, C0, A1
        assert await cache.read(b, 0, BS)  # its write punches A0: held
        await held.until_held()
        assert cache.missing_blocks(a) == [0]
        assert await fetch(cache, a)  # a GET; its write evicts C
        await held.let_go()

    run(cache, body)
    assert store.requests["get"] == 4
    assert outcome(cache, store, tmp_path, a, data) == ([], 0, 0, [])


def test_a_free_of_an_object_lands_before_its_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A freed (`BlockCache.free`: its rows and file deleted, held) and fetched again meanwhile.
    Before: the late free took the new record's object row and file."""
    store = MemoryStore()
    a, data = put(store, "a")
    cache = make_cache(tmp_path, store)
    held = HeldDeletes(cache, a.oid, monkeypatch)

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.free, {a.oid})
            await held.until_held()
            assert cache.missing_blocks(a) == [0]
            assert await fetch(cache, a)  # a GET
            await held.let_go()

    run(cache, body)
    assert store.requests["get"] == 2
    assert outcome(cache, store, tmp_path, a, data) == ([], 0, 0, [])


def test_a_bulk_commit_of_an_object_lands_after_its_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A evicted whole (held) while a bulk job's run of A comes back: its commit writes A's
    object row and marks the record indexed. Before: the late delete took that row and the
    file the worker wrote; the books kept the blocks. Now the commit waits for the delete,
    then finds the worker's file gone and indexes nothing (its caller fetches again): what
    the books hold is on the disk, and a restart keeps exactly that."""
    store = MemoryStore()
    (a, data), (c, _), (b, _) = (put(store, k) for k in "acb")
    cache = make_cache(tmp_path, store, cache_size=2 * BS)
    held = HeldDeletes(cache, a.oid, monkeypatch)
    engine = cache.bulk
    waiting: list[_Waiting] = []

    async def body() -> None:
        for v in (a, c):
            await cache.read(v, 0, BS)
            await cache.drain_object(v)
        assert await cache.read(b, 0, BS)  # its write evicts A: held
        await held.until_held()
        # A bulk job of A (as `BulkEngine._dispatch` sends it): room reserved (C evicted),
        # flights claimed; its worker wrote A's file (the one still in place).
        victims, fits = cache.ledger.reserve(BS, cache.bounds)
        assert fits and [victim[0] for victim in victims] == [c.oid]
        await engine._evict(victims)
        path = engine.disk.layout.path(a.oid)
        path.write_bytes(data)
        job = Job(a.oid, a.key, a.etag, a.size, 0, BS, str(path))
        flights = [engine.flights.start((a.oid, 0), Flight(remember=False))]
        waiting.append(_Waiting(job, a, range(1), flights))
        engine._waiting[(a.oid, 0)] = waiting[0]
        inode = path.stat().st_ino
        engine._commit([Done(a.oid, 0, BS, crcs=[zlib.crc32(data)], inode=inode, matches=True)])
        await held.let_go()
        await waiting[0].event.wait()

    run(cache, body)
    missing, gets, corrupt, after = outcome(cache, store, tmp_path, a, data)
    assert (gets, corrupt, after) == (0, 0, missing)
    done = waiting[0].done
    assert done is not None and done.lost and missing == [0]  # the file it wrote went


def test_an_adoption_of_an_object_lands_after_its_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A evicted whole (held) while an upload of the same version finishes and is adopted
    (its file moved into place, its rows in one transaction). Before: the late delete took
    the adopted file and rows; the books kept the blocks."""
    store = MemoryStore()
    (a, data), (c, _), (b, _) = (put(store, k) for k in "acb")
    cache = make_cache(tmp_path / "c", store, cache_size=2 * BS)
    held = HeldDeletes(cache, a.oid, monkeypatch)
    upload = tmp_path / "c" / "upload"
    kept: list[bool] = []

    async def adopt() -> None:
        kept.append(await cache.adopt(a, upload, {0: zlib.crc32(data)}))

    async def body() -> None:
        for v in (a, c):
            await cache.read(v, 0, BS)
            await cache.drain_object(v)
        assert await cache.read(b, 0, BS)  # its write evicts A: held
        await held.until_held()
        upload.write_bytes(data)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(adopt)  # its room evicts C
            await held.let_go()

    run(cache, body)
    assert kept == [True] and store.requests["get"] == 3
    assert outcome(cache, store, tmp_path / "c", a, data) == ([], 0, 0, [])


def test_a_write_waits_only_while_a_delete_of_its_object_is_pending() -> None:
    """`Deleting.settled` returns at once (no checkpoint: the writer's steps up to its
    thread call stay atomic) when nothing it writes is pending, and once every such delete
    ended. A block's delete holds back writes of that block (and whole files); an object's,
    every write of it."""
    deleting = Deleting()

    async def main() -> None:
        deleting.begin([("a", WHOLE), ("a", WHOLE), ("c", 3), ("d", 1)])
        with trio.testing.assert_no_checkpoints():
            await deleting.settled([("b", None), ("c", [0, 1, 2]), ("d", range(0))])
        woken: list[str] = []

        async def write(name: str, oid: str, blocks: list[int] | None) -> None:
            await deleting.settled([(oid, blocks)])
            woken.append(name)

        async with trio.open_nursery() as nursery:
            for name, oid, blocks in [("a0", "a", [0]), ("c3", "c", [2, 3]), ("c*", "c", None)]:
                nursery.start_soon(write, name, oid, blocks)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            deleting.end([("a", WHOLE), ("c", 3)])
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(woken) == ["c*", "c3"] and "a" in deleting
            deleting.end([("a", WHOLE)])
        assert woken[-1] == "a0" and "a" not in deleting and "d" in deleting
        with pytest.raises(AssertionError, match="never began"):  # it would let a write go
            deleting.end([("d", WHOLE)])
        assert deleting.pending("d", [1])

    trio.run(main)


def test_an_eviction_that_failed_lets_the_next_write_of_its_object_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write whose eviction raised (a failing disk) still ends its victims' deletes: a
    later write of the victim's object does not wait for ever."""
    store = MemoryStore()
    (a, data), (b, _) = (put(store, k) for k in "ab")
    cache = make_cache(tmp_path, store, cache_size=BS)
    write_block = cache._disk.write_block

    def failing(version: ObjectVersion, *args: Any) -> None:
        if version.oid == b.oid:
            raise OSError(errno.EIO, "the cache disk failed")
        write_block(version, *args)

    monkeypatch.setattr(cache._disk, "write_block", failing)

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        await cache.read(b, 0, BS)  # its write evicts A, then fails
        await cache.drain_object(b)
        assert cache.stats["disk_errors"] == 1 and cache.missing_blocks(a) == [0]
        assert await cache.read(a, 0, BS) == data
        await cache.drain_object(a)  # its write went
        assert cache.missing_blocks(a) == []

    run(cache, body)


class FirstFreeHeld:
    """F, S and Z (4 blocks each) with the unwritten-bytes limit at 2 blocks; of a free of
    several objects, the first delete is held in its thread until ``release``."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from s3cachefs.cache import fetcher

        monkeypatch.setattr(fetcher, "UNWRITTEN_LIMIT", 2 * BS)
        self.store = store = MemoryStore()
        self.objects = [put(store, k, 4 * BS) for k in "fsz"]
        self.cache = make_cache(tmp_path, store)
        self.held, self.release = threading.Event(), threading.Event()
        self.order: list[str] = []
        disk = self.cache._disk
        free = disk.free

        def held_free(oid: str, blocks: list[int]) -> None:
            self.order.append(oid)
            if len(self.order) == 1:
                self.held.set()
                assert self.release.wait(30), "the test never let the delete go"
            free(oid, blocks)

        monkeypatch.setattr(disk, "free", held_free)


def test_a_free_of_many_objects_stalls_no_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F and S freed together (`Integrity.free` runs their deletes one by one); the first
    one's delete is held (a slow disk, many rows), so the second's waits behind it. The
    second is read again meanwhile, and Z (never freed, never cached) too, with the
    unwritten-bytes limit at 2 blocks: a read's write of an object whose delete is pending
    is not kept this time, so no bytes stay counted as unwritten and both reads finish while
    the delete is held. Before: those writes waited for the delete, their bytes counted as
    unwritten, and at the limit every download of the daemon (Z's too) stopped."""
    setup = FirstFreeHeld(tmp_path, monkeypatch)
    store, cache, held, release, order = (
        setup.store,
        setup.cache,
        setup.held,
        setup.release,
        setup.order,
    )
    (f, f_data), (s, s_data), (z, z_data) = setup.objects

    async def body() -> None:
        for v in (f, s):
            await cache.read(v, 0, v.size)
            await cache.drain_object(v)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.free, {f.oid, s.oid})
            try:
                assert await trio.to_thread.run_sync(held.wait, 30)
                second, data = (s, s_data) if order[0] == f.oid else (f, f_data)
                assert await cache.read(second, 0, 2 * BS) == data[: 2 * BS]
                await trio.testing.wait_all_tasks_blocked()  # its writes ran (or wait)
                assert cache._fetcher._unwritten == 0
                assert await cache.read(second, 0, second.size) == data
                assert await cache.read(z, 0, z.size) == z_data  # a download never stalled
            finally:
                release.set()
            assert cache.stats["store_skipped_deleting"] >= 4  # the second's 4 blocks

    run(cache, body)
    assert cache.missing_blocks(z) == []
    for v, data in ((f, f_data), (s, s_data)):
        missing = cache.missing_blocks(v)
        assert outcome(cache, store, tmp_path, v, data)[1:] == (0, 0, missing)
        cache = make_cache(tmp_path, store)


def test_a_prefetch_whose_object_is_being_freed_stalls_no_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the second object is prefetched again (its writes must be kept, so
    they wait for its delete): its waiting bytes hold back prefetch downloads only, and Z's
    read (never freed) goes on while the delete is held. Before: they counted as unwritten,
    and at the limit every download of the daemon stopped until the free ended."""
    setup = FirstFreeHeld(tmp_path, monkeypatch)
    store, cache, held, release, order = (
        setup.store,
        setup.cache,
        setup.held,
        setup.release,
        setup.order,
    )
    (f, f_data), (s, s_data), (z, z_data) = setup.objects
    z_read: list[bool] = []

    async def body() -> None:
        for v in (f, s):
            await cache.read(v, 0, v.size)
            await cache.drain_object(v)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.free, {f.oid, s.oid})
            try:
                assert await trio.to_thread.run_sync(held.wait, 30)
                second = s if order[0] == f.oid else f
                cache.start_fetch(second, range(4), persist=True)
                await trio.testing.wait_all_tasks_blocked()
                with trio.move_on_after(30):  # before: stalled until the free ended
                    z_read.append(await cache.read(z, 0, z.size) == z_data)
                assert z_read == [True], "a read stalled behind a prefetch's parked writes"
                assert cache._fetcher._parked > 0  # its writes wait for the delete
            finally:
                release.set()

    run(cache, body)
    assert cache.missing_blocks(z) == []
    second = s if order[0] == f.oid else f
    assert cache.missing_blocks(second) == []  # the prefetch's writes made, after the delete
    for v, data in ((f, f_data), (s, s_data)):
        missing = cache.missing_blocks(v)
        assert outcome(cache, store, tmp_path, v, data)[1:] == (0, 0, missing)
        cache = make_cache(tmp_path, store)


def test_a_write_in_flight_whose_record_is_evicted_whole_and_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X0 on the books (X's only block); X1's write in flight (its thread wrote); X2's write
    evicts X0 as X's last block: a whole-object delete taken after X1's write started, which
    removes the file with X1's bytes (and not X1's row); X2 makes a new record. X1 then
    returns: it must not be indexed into the new record, and its row must go. Before: the
    books held X1 (a hole: a CRC failure, a second GET), and a restart too (its row)."""
    store = MemoryStore()
    x, data = put(store, "x", 3 * BS)
    cache = make_cache(tmp_path, store, cache_size=2 * BS)
    disk = cache._disk
    write_block = disk.write_block
    wrote, release = threading.Event(), threading.Event()

    def held(version: ObjectVersion, index: int, *args: Any) -> None:
        write_block(version, index, *args)
        if version.oid == x.oid and index == 1:
            wrote.set()
            assert release.wait(30), "the test never let the write return"

    monkeypatch.setattr(disk, "write_block", held)

    async def body() -> None:
        for idx in range(3):
            cache.start_fetch(x, range(idx, idx + 1), persist=True)
            await cache.get_block(x, idx)
            if idx == 0:
                await cache.drain_object(x)
            if idx == 1:
                assert await trio.to_thread.run_sync(wrote.wait, 30)  # X1's bytes are in
        # X2's write evicts X0 (X's last block on the books): its file removed, made anew
        try:
            await trio.testing.wait_all_tasks_blocked()
            # A new record: X0 gone, X1 not on it (X2 may have landed already or not)
            assert cache.missing_blocks(x) in ([0, 1, 2], [0, 1])
        finally:
            release.set()  # a failure above must not leave the held write waiting 30 s

    run(cache, body)
    assert cache.missing_blocks(x) == [0, 1]
    assert outcome(cache, store, tmp_path, x, data) == ([0, 1], 0, 0, [0, 1])


def test_an_adoption_whose_record_is_freed_and_made_anew_is_not_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload of A is adopted (its file placed, its rows in); before `adopt` returns, A
    is freed (the file and the object row go) and its block 0 fetched again (a new record,
    a new file with a hole at block 1). The adoption must not be indexed into that record,
    and its row of block 1 must go. Before: the books held block 1 (a hole: a CRC failure,
    a second GET), and a restart too."""
    store = MemoryStore()
    a, data = put(store, "a", 2 * BS)
    cache = make_cache(tmp_path / "c", store)
    adopt = cache._disk.adopt
    adopted, release = threading.Event(), threading.Event()

    def held(*args: Any) -> None:
        adopt(*args)
        adopted.set()
        assert release.wait(30), "the test never let the adoption return"

    monkeypatch.setattr(cache._disk, "adopt", held)
    upload = tmp_path / "c" / "upload"
    upload.write_bytes(data)
    crcs = {idx: zlib.crc32(data[idx * BS : (idx + 1) * BS]) for idx in range(2)}
    kept: list[bool] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:

            async def adopt_it() -> None:
                kept.append(await cache.adopt(a, upload, crcs))

            nursery.start_soon(adopt_it)
            assert await trio.to_thread.run_sync(adopted.wait, 30)
            await cache.free({a.oid})
            assert await fetch(cache, a) == data[:BS]
            await cache.drain_object(a)
            assert cache.missing_blocks(a) == [1]  # the new record's
            release.set()

    run(cache, body)
    assert outcome(cache, store, tmp_path / "c", a, data) == ([1], 0, 0, [1])
    assert kept == [False]


def test_a_bulk_run_whose_record_is_freed_and_made_anew_is_not_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk run of A's block 1 is committed (its rows in, the file still the worker's);
    before it is settled, A is freed (its file and rows go) and its block 0 fetched again
    (a new record, a new file with a hole at block 1). The run must not be indexed into
    that record, and its block row must go. Before: the books held block 1 (a hole: a CRC
    failure, a second GET), and a restart too."""
    store = MemoryStore()
    a, data = put(store, "a", 2 * BS)
    cache = make_cache(tmp_path, store)
    engine = cache.bulk
    index_written = cache._disk.index_written
    committed, release = threading.Event(), threading.Event()

    def held(rows: list[Any]) -> list[bool]:
        kept = index_written(rows)
        committed.set()
        assert release.wait(30), "the test never let the commit return"
        return kept

    monkeypatch.setattr(cache._disk, "index_written", held)
    waiting: list[_Waiting] = []

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        # A bulk job of A's block 1 (as `BulkEngine._dispatch` sends it); its worker wrote it.
        assert cache.ledger.reserve(BS, cache.bounds) == ([], True)
        path = engine.disk.layout.path(a.oid)
        with path.open("r+b") as file:
            file.seek(BS)
            file.write(data[BS:])
        job = Job(a.oid, a.key, a.etag, a.size, BS, 2 * BS, str(path))
        flights = [engine.flights.start((a.oid, 1), Flight(remember=False))]
        waiting.append(_Waiting(job, a, range(1, 2), flights))
        engine._waiting[(a.oid, BS)] = waiting[0]
        crc = zlib.crc32(data[BS:])
        engine._commit([Done(a.oid, BS, 2 * BS, crcs=[crc], inode=path.stat().st_ino)])
        assert await trio.to_thread.run_sync(committed.wait, 30)
        await cache.free({a.oid})
        assert await fetch(cache, a) == data[:BS]
        await trio.testing.wait_all_tasks_blocked()  # its record made, its write under way
        release.set()
        await waiting[0].event.wait()

    run(cache, body)
    assert outcome(cache, store, tmp_path, a, data) == ([1], 0, 0, [1])
    done = waiting[0].done
    assert done is not None and done.lost


def test_a_failed_blocks_row_delete_lands_before_the_blocks_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's block fails its CRC when read: it is dropped, its row's delete held; the block
    fetched again meanwhile. Its write waits for that delete (`Integrity.drop_block`'s
    pending delete of the block): landing after the write, it would take the new row (the
    block lost at the next start)."""
    store = MemoryStore()
    a, data = put(store, "a")
    cache = make_cache(tmp_path, store)
    held = HeldDeletes(cache, a.oid, monkeypatch)

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        cache._disk.layout.path(a.oid).write_bytes(os.urandom(BS))  # a torn block
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.read, a, 0, BS)  # fails its CRC: dropped, held
            await held.until_held()
            assert cache.missing_blocks(a) == [0]
            assert await fetch(cache, a) == data
            await held.let_go()

    run(cache, body)
    assert cache.stats["corrupt_blocks"] == 1
    assert outcome(cache, store, tmp_path, a, data) == ([], 0, 0, [])


def test_a_whole_reservation_whose_eviction_failed_lets_the_next_write_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Integrity.reserve_whole` (a copy's room) evicts A, and the eviction raises: A's
    pending delete still ends, so a later write of A does not wait for ever."""
    store = MemoryStore()
    (a, data), (b, _) = (put(store, k) for k in "ab")
    cache = make_cache(tmp_path, store, cache_size=BS)

    def failing(victims: list[Any]) -> None:
        raise OSError(errno.EIO, "the cache disk failed")

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        with monkeypatch.context() as patch:
            patch.setattr(cache._disk, "evict", failing)
            with pytest.raises(OSError):
                await cache.integrity.reserve_whole(b)
        assert cache.missing_blocks(a) == [0]
        assert await fetch(cache, a) == data
        await cache.drain_object(a)  # its write went
        assert cache.missing_blocks(a) == []

    run(cache, body)


class BulkJobs:
    """Bulk jobs of block 0 of an object (as `_dispatch` sends them), their workers done."""

    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self.waiting: dict[str, _Waiting] = {}

    def done(self, v: ObjectVersion, data: bytes) -> Done:
        cache, engine = self.cache, self.cache.bulk
        assert cache.ledger.reserve(BS, cache.bounds) == ([], True)
        path = engine.disk.layout.path(v.oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        job = Job(v.oid, v.key, v.etag, v.size, 0, BS, str(path))
        flights = [engine.flights.start((v.oid, 0), Flight(remember=False))]
        self.waiting[v.key] = engine._waiting[(v.oid, 0)] = _Waiting(job, v, range(1), flights)
        return Done(v.oid, 0, BS, crcs=[zlib.crc32(data)], inode=path.stat().st_ino)


def test_a_bulk_commit_holds_back_only_the_runs_whose_delete_is_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of two runs, A's (A being freed: its delete held) and D's: D's is indexed
    and its waiter goes while A's delete is held; A's waits for the delete, then finds its
    file gone (nothing indexed). Before: the whole batch waited for A's delete."""
    store = MemoryStore()
    (a, a_data), (d, d_data) = (put(store, k) for k in "ad")
    cache = make_cache(tmp_path, store)
    held = HeldDeletes(cache, a.oid, monkeypatch)
    jobs = BulkJobs(cache)
    waiting = jobs.waiting

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.free, {a.oid})
            await held.until_held()
            cache.bulk._commit([jobs.done(a, a_data), jobs.done(d, d_data)])
            await waiting["d"].event.wait()  # while A's delete is held
            assert not waiting["a"].event.is_set()
            await held.let_go()
            await waiting["a"].event.wait()

    run(cache, body)
    done_a, done_d = waiting["a"].done, waiting["d"].done
    assert done_a is not None and done_a.lost and done_d is not None and not done_d.error
    assert cache.missing_blocks(a) == [0]
    assert outcome(cache, store, tmp_path, d, d_data) == ([], 0, 0, [])


def test_a_lone_run_whose_delete_is_pending_holds_back_no_later_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's run arrives alone while A's free is held, then D's (another object): D's is
    indexed and its waiter goes while A's delete is still held. Before: the lone pending
    run went to a commit that waited for the delete, and D's sat in the queue behind it
    (review of i-evictfix, finding 3)."""
    store = MemoryStore()
    (a, a_data), (d, d_data) = (put(store, k) for k in "ad")
    cache = make_cache(tmp_path, store)
    held = HeldDeletes(cache, a.oid, monkeypatch)
    jobs = BulkJobs(cache)
    waiting = jobs.waiting

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.free, {a.oid})
            await held.until_held()
            cache.bulk._commit([jobs.done(a, a_data)])
            await trio.testing.wait_all_tasks_blocked()
            cache.bulk._commit([jobs.done(d, d_data)])
            with trio.move_on_after(30):  # the old order: D's waits for A's delete
                await waiting["d"].event.wait()
            assert waiting["d"].event.is_set(), "D's run waited behind A's pending delete"
            assert not waiting["a"].event.is_set()
            await held.let_go()
            await waiting["a"].event.wait()

    run(cache, body)
    done_a, done_d = waiting["a"].done, waiting["d"].done
    assert done_a is not None and done_a.lost and done_d is not None and not done_d.error
    assert cache.missing_blocks(a) == [0]
    assert outcome(cache, store, tmp_path, d, d_data) == ([], 0, 0, [])


def after_restart(tmp: Path, store: MemoryStore, v: ObjectVersion) -> tuple[bool, list[int]]:
    """Whether ``v``'s cache file exists, and its missing blocks, as a restart loads them."""
    again = make_cache(tmp, store, cache_size=1 << 30)
    try:
        return again._disk.layout.path(v.oid).exists(), again.missing_blocks(v)
    finally:
        again.close()


def test_an_adoption_whose_free_ran_before_its_file_was_placed_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adopt's thread is slow to start; A (its new, blockless record) is freed, and that
    free's disk call runs first (nothing to delete yet). Adopt then places the file and its
    rows and finds its record gone, not made anew. Before: only its block rows went; the
    file and the object row stayed on no books, and a restart loaded an empty record that
    is never evicted (review of i-evictfix, finding 1; this test failed on faaa449)."""
    store = MemoryStore()
    a, data = put(store, "a", 2 * BS)
    cache = make_cache(tmp_path / "c", store)
    adopt = cache._disk.adopt
    entered, go = threading.Event(), threading.Event()

    def held(*args: Any) -> None:
        entered.set()
        assert go.wait(30)
        adopt(*args)

    monkeypatch.setattr(cache._disk, "adopt", held)
    upload = tmp_path / "c" / "upload"
    upload.write_bytes(data)
    crcs = {i: zlib.crc32(data[i * BS : (i + 1) * BS]) for i in range(2)}
    kept: list[bool] = []

    async def body() -> None:
        async def adopt_it() -> None:
            kept.append(await cache.adopt(a, upload, crcs))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(adopt_it)
            assert await trio.to_thread.run_sync(entered.wait, 30)
            try:
                await cache.free({a.oid})  # its disk call runs before the file is placed
            finally:
                go.set()

    run(cache, body)
    assert kept == [False]
    assert cache.ledger.used == 0
    cache.close()
    assert after_restart(tmp_path / "c", store, a) == (False, [0, 1])


def test_a_first_write_whose_free_ran_before_it_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same in the fetcher: the first write of a new record (with its object row) is
    slow to start; A is freed and the free's disk call runs first. The write then makes the
    file, the object row and its block row. Before: only the block row went (finding 2 of
    the same review; this test failed on faaa449)."""
    store = MemoryStore()
    a, _ = put(store, "a", 2 * BS)
    cache = make_cache(tmp_path, store)
    write_block = cache._disk.write_block
    entered, go = threading.Event(), threading.Event()

    def held(version: ObjectVersion, *args: Any) -> None:
        if version.oid == a.oid and args[2] is not None:
            entered.set()
            assert go.wait(30)
        write_block(version, *args)

    monkeypatch.setattr(cache._disk, "write_block", held)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, cache, a)
            assert await trio.to_thread.run_sync(entered.wait, 30)
            try:
                await cache.free({a.oid})
            finally:
                go.set()
        await cache.drain_object(a)

    run(cache, body)
    assert cache.missing_blocks(a) == [0, 1]
    cache.close()
    assert after_restart(tmp_path, store, a) == (False, [0, 1])


def test_a_bulk_fetch_of_an_object_being_freed_waits_for_the_free_before_it_dispatches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk job's worker writes the object's file: sent while A's free is pending (held),
    the late delete would take the file under it. The fetch waits until the free ran, and
    only then looks whether it is a worker's job."""
    store = MemoryStore()
    a, _ = put(store, "a")
    cache = make_cache(tmp_path, store)
    held = HeldDeletes(cache, a.oid, monkeypatch)
    steps: list[str] = []

    async def bulk_fetch() -> None:
        await cache.bulk.fetch(a, range(1), None)
        steps.append("fetch returned")

    async def body() -> None:
        await cache.read(a, 0, BS)
        await cache.drain_object(a)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.free, {a.oid})
            await held.until_held()
            nursery.start_soon(bulk_fetch)
            await trio.testing.wait_all_tasks_blocked()
            steps.append("free let go")
            held.release.set()

    run(cache, body)
    assert steps == ["free let go", "fetch returned"]

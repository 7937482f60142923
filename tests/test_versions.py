"""An inode is one object version; a handle reads only the version it opened (rows 3, 4, 7).

The first half drives the core over the in-memory store (exact counters, a
fake clock for the TTL); the second half goes through a real mount with the
kernel's page cache in play, and through a proxy whose listings lie about
ETags (row 7).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from s3cachefs.base.errors import (
    AccessDeniedError,
    NotFoundError,
    StaleError,
    StoreError,
    TransientError,
)
from s3cachefs.base.values import INDEFINITE_TTL
from s3cachefs.datasets.pins import Manifest, PinStore
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import ROOT_INODE, Node
from s3cachefs.store.types import Listing, ObjectInfo
from s3cachefs.testing.memorystore import MemoryStore
from tests.conftest import Bucket, Mounter, drop_page_cache
from tests.faultproxy import FaultProxy
from tests.test_blockcache import BS, make_cache, run_with

MIB = 1024 * 1024
TTL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_core(tmp_path: Path, store: MemoryStore) -> tuple[Any, FsCore, Clock, list[Any]]:
    cache = make_cache(tmp_path, store)
    clock = Clock()
    core = FsCore(
        store,
        cache,
        prefix="",
        metadata_ttl=TTL,
        s3_limiter=trio.CapacityLimiter(8),
        readahead_blocks=0,
        clock=clock,
    )
    invalidated: list[Any] = []
    core.on_invalidate(invalidated.extend)
    return cache, core, clock, invalidated


async def lookup(core: FsCore, name: str) -> Node:
    node = await core.lookup(ROOT_INODE, name)
    assert node is not None
    core.remember(node)  # what the adapter does for every entry the kernel gets
    return node


def pattern(tag: bytes, size: int) -> bytes:
    """Bytes that differ from every other version's at every offset."""
    return (tag * (size // len(tag) + 1))[:size]


# ---- the core, over the in-memory store -----------------------------------


def test_a_changed_version_is_a_new_inode_and_the_old_handle_never_mixes(tmp_path: Path) -> None:
    store = MemoryStore()
    a, b = pattern(b"A", 4 * BS), pattern(b"B", 4 * BS)
    store.put("f.bin", a)
    cache, core, clock, invalidated = make_core(tmp_path, store)

    async def body() -> None:
        old = await lookup(core, "f.bin")
        fh_old, _ = await core.open(old.ino)
        assert await core.read(fh_old, 0, BS) == a[:BS]
        store.put("f.bin", b)  # same size, another ETag
        clock.now += TTL + 1
        new = await lookup(core, "f.bin")
        assert new.ino != old.ino and new.etag != old.etag
        assert invalidated == [(ROOT_INODE, "f.bin")]  # the kernel re-looks the name up
        fh_new, _ = await core.open(new.ino)
        assert await core.read(fh_new, 0, 4 * BS) == b
        # The old handle: its cached block still reads as A; an uncached one is ESTALE.
        assert await core.read(fh_old, 0, BS) == a[:BS]
        with pytest.raises(StaleError):
            await core.read(fh_old, 2 * BS, BS)
        assert (await core.getattr(old.ino)).size == len(a)  # the old inode keeps its version
        assert store.requests["head"] == 0  # a handle that served bytes is never re-bound
        # The old inode lives until the kernel forgets it and its handle is closed.
        core.release(fh_old)
        assert core.node(old.ino) is old
        core.forget(old.ino, 1)
        with pytest.raises(NotFoundError, match="unknown"):
            core.node(old.ino)
        core.forget(new.ino, 1)  # the current name's inode stays, forgotten or not
        assert core.node(new.ino) is new
        core.release(fh_new)

    run_with(cache, body)


def test_a_shorter_replacement_is_estale_for_the_old_handle_never_a_prefix(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    a, b = pattern(b"A", 4 * BS), pattern(b"b", BS // 2)
    store.put("f.bin", a)
    cache, core, clock, _ = make_core(tmp_path, store)

    async def body() -> None:
        old = await lookup(core, "f.bin")
        fh, _ = await core.open(old.ino)
        assert await core.read(fh, 0, 100) == a[:100]
        store.put("f.bin", b)
        clock.now += TTL + 1
        new = await lookup(core, "f.bin")
        assert (new.ino, new.size) != (old.ino, old.size)
        with pytest.raises(StaleError):  # A's second block: gone from S3
            await core.read(fh, BS, 3 * BS)
        with pytest.raises(StaleError):  # past B's end, within A's: not EOF
            await core.read(fh, 3 * BS, BS)
        assert await core.read(fh, 4 * BS, BS) == b""  # A's own end is EOF
        core.release(fh)

    run_with(cache, body)


def test_a_fresh_open_of_an_inode_that_served_bytes_is_estale_then_the_name_moves(
    tmp_path: Path,
) -> None:
    """Within the TTL the name still leads to the old inode; the kernel may hold A's pages."""
    store = MemoryStore()
    a, b = pattern(b"A", 4 * BS), pattern(b"B", 4 * BS)
    store.put("f.bin", a)
    cache, core, _clock, invalidated = make_core(tmp_path, store)

    async def body() -> None:
        node = await lookup(core, "f.bin")
        first, _ = await core.open(node.ino)
        assert await core.read(first, 0, BS) == a[:BS]
        store.put("f.bin", b)
        second, _ = await core.open((await lookup(core, "f.bin")).ino)  # within the TTL
        with pytest.raises(StaleError):
            await core.read(second, 2 * BS, BS)
        assert store.requests["head"] == 0
        assert node.retired and invalidated == [(ROOT_INODE, "f.bin")]
        moved = await lookup(core, "f.bin")  # re-listed at once, TTL or not
        assert moved.ino != node.ino
        third, _ = await core.open(moved.ino)
        assert await core.read(third, 0, 4 * BS) == b
        for fh in (first, second, third):
            core.release(fh)

    run_with(cache, body)


def test_a_fresh_open_that_served_nothing_is_revalidated_and_reads_one_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Row 12's fresh open within the TTL: nothing read yet, so HEAD decides, once."""
    store = MemoryStore()
    a, b = pattern(b"A", 4 * BS), pattern(b"B", 4 * BS)
    store.put("f.bin", a)
    cache, core, _clock, _ = make_core(tmp_path, store)

    async def body() -> None:
        node = await lookup(core, "f.bin")
        store.put("f.bin", b)  # replaced after the listing, before any read
        fh, _ = await core.open(node.ino)
        assert await core.read(fh, 0, 4 * BS) == b
        assert (await lookup(core, "f.bin")).ino == node.ino  # nothing to keep apart
        assert store.requests["head"] == 1
        core.release(fh)

    with caplog.at_level(logging.WARNING, logger="s3cachefs.fs.versions"):
        run_with(cache, body)
    (warning,) = caplog.records
    assert "key=f.bin" in warning.message
    assert hashlib.md5(a, usedforsecurity=False).hexdigest() in warning.message
    assert hashlib.md5(b, usedforsecurity=False).hexdigest() in warning.message


class LyingListing(MemoryStore):
    """A gateway whose listings carry other ETags than its GET and HEAD (row 7)."""

    def list_dir(self, prefix: str) -> Listing:
        listing = super().list_dir(prefix)
        listing.objects = [
            ObjectInfo(o.key, o.size, '"' + "f" * 32 + '"', o.mtime_ns) for o in listing.objects
        ]
        return listing


def test_listing_etags_that_differ_from_head_warn_once_and_serve_heads_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LyingListing()
    data = pattern(b"0123456789", 3 * BS + 5)
    etag = store.put("f.bin", data)
    cache, core, clock, _ = make_core(tmp_path, store)

    async def body() -> None:
        node = await lookup(core, "f.bin")
        fh, _ = await core.open(node.ino)
        assert await core.read(fh, 0, len(data)) == data
        assert node.etag == etag
        core.release(fh)
        clock.now += TTL + 1  # the next listing lies the same way: same version, same inode
        again = await lookup(core, "f.bin")
        assert again is node
        fh, keep_cache = await core.open(again.ino)
        assert keep_cache
        assert await core.read(fh, BS, BS) == data[BS : 2 * BS]
        core.release(fh)
        assert store.requests["head"] == 1

    with caplog.at_level(logging.WARNING, logger="s3cachefs.fs.versions"):
        run_with(cache, body)
    (warning,) = caplog.records
    assert "key=f.bin" in warning.message
    assert '"' + "f" * 32 + '"' in warning.message and etag in warning.message


def test_a_listing_etag_with_another_size_at_head_is_estale(tmp_path: Path) -> None:
    """HEAD disagrees on the size: a replaced object, not a lying listing."""
    store = LyingListing()
    store.put("f.bin", pattern(b"A", 2 * BS))
    cache, core, _clock, invalidated = make_core(tmp_path, store)

    async def body() -> None:
        node = await lookup(core, "f.bin")
        b = pattern(b"B", BS)
        store.put("f.bin", b)
        fh, _ = await core.open(node.ino)
        with pytest.raises(StaleError):
            await core.read(fh, 0, BS)
        assert store.requests["head"] == 1
        assert invalidated == [(ROOT_INODE, "f.bin")]
        new = await lookup(core, "f.bin")
        assert new.ino != node.ino and new.size == BS
        core.release(fh)

    run_with(cache, body)


class FailingHeads(MemoryStore):
    """HEADs fail with the given errors, in turn (S3 unavailable, access denied)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_errors: list[StoreError] = []

    def head(self, key: str) -> ObjectInfo:
        info = super().head(key)  # counted as sent
        if self.head_errors:
            raise self.head_errors.pop(0)
        return info


@pytest.mark.parametrize(
    "error",
    [
        TransientError("f.bin: S3 unavailable (SlowDown) after retries"),
        AccessDeniedError("f.bin: access denied (AccessDenied)"),
        StoreError("f.bin: S3 error 400"),
    ],
    ids=["transient", "denied", "other"],
)
def test_a_revalidation_head_that_fails_is_estale_and_retires_the_node(
    tmp_path: Path, error: StoreError
) -> None:
    """The GET was refused (stale); the HEAD that could have explained it failed: the read
    stays ESTALE (not EIO), the node is retired and the next open sees the current version."""
    store = FailingHeads()
    a, b = pattern(b"A", 2 * BS), pattern(b"B", 2 * BS)
    store.put("f.bin", a)
    cache, core, _clock, invalidated = make_core(tmp_path, store)

    async def body() -> None:
        node = await lookup(core, "f.bin")
        store.put("f.bin", b)  # same size: a HEAD that answered would re-bind in place
        fh, _ = await core.open(node.ino)
        store.head_errors = [error]
        with pytest.raises(StaleError):
            await core.read(fh, 0, BS)
        assert store.requests["head"] == 1
        assert node.retired and invalidated == [(ROOT_INODE, "f.bin")]
        new = await lookup(core, "f.bin")  # re-listed at once, TTL or not
        assert new.ino != node.ino and new.etag != node.etag
        fh_new, _ = await core.open(new.ino)
        assert await core.read(fh_new, 0, 2 * BS) == b
        with pytest.raises(StaleError):  # the old handle: still its version, never B's
            await core.read(fh, BS, BS)
        assert store.requests["head"] == 1  # a retired node is not re-checked
        core.release(fh)
        core.release(fh_new)

    run_with(cache, body)


class GatedStore(MemoryStore):
    """GETs of one range are held after the server said yes (the ETag matched)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.held = threading.Event()
        self.gated_start = -1

    def iter_range(
        self, key: str, etag: str, start: int, end: int, chunk: int, first: int = 0, *, size: int
    ) -> Iterator[bytes]:
        pieces = super().iter_range(key, etag, start, end, chunk, first, size=size)
        head = next(pieces)  # the ETag check happens here
        if start == self.gated_start:
            self.held.set()
            self.gate.wait(10)
        yield head
        yield from pieces


def test_a_read_of_the_old_version_that_lands_after_the_new_one_is_never_served(
    tmp_path: Path,
) -> None:
    """The kernel's pages of an inode are one version, whatever order the reads land in."""
    store = GatedStore()
    a, b = pattern(b"A", 4 * BS), pattern(b"B", 4 * BS)
    store.put("f.bin", a)
    store.gated_start = BS  # block 1
    cache, core, _clock, _ = make_core(tmp_path, store)
    got: dict[str, Any] = {}

    async def slow_old_read(fh: int) -> None:
        got["old"] = await core.read(fh, BS, BS)

    async def body() -> None:
        node = await lookup(core, "f.bin")
        first, _ = await core.open(node.ino)
        second, _ = await core.open(node.ino)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_old_read, first)  # A's block 1: accepted, then held
            await trio.to_thread.run_sync(store.held.wait)
            store.put("f.bin", b)
            got["new"] = await core.read(second, 2 * BS, BS)  # re-validated: B
            store.gate.set()
        core.release(first)
        core.release(second)

    run_with(cache, body)
    assert got["new"] == b[2 * BS : 3 * BS]
    # A's bytes arrived after the inode served B: the handle took B instead (it had
    # served nothing), never A's block next to B's pages.
    assert got["old"] == b[BS : 2 * BS]


def test_directories_keep_their_inodes_and_listings_survive_dropped_files(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    store.put("d/x.bin", b"x1")
    store.put("f.bin", b"v1")
    cache, core, clock, _ = make_core(tmp_path, store)

    async def body() -> None:
        d = await lookup(core, "d")
        f = await lookup(core, "f.bin")
        dh = await core.opendir(ROOT_INODE)
        store.put("f.bin", b"v2")
        clock.now += TTL + 1
        f2 = await lookup(core, "f.bin")  # re-lists: f's inode is superseded
        core.forget(f.ino, 1)  # and forgotten: dropped
        assert await lookup(core, "d") is d
        entries = {name: node.ino for name, node, _ in core.readdir(dh, 0)}
        assert entries == {"d": d.ino, "f.bin": f2.ino}  # the snapshot's dropped inode: now's
        core.releasedir(dh)
        assert (await core.lookup(d.ino, "x.bin")) is not None

    run_with(cache, body)


def test_the_core_tells_the_adapter_what_to_forget_when_pins_or_keys_change(
    tmp_path: Path,
) -> None:
    """pins_changed() and key_changed() call the registered callback themselves."""
    store = MemoryStore()
    data = b"pinned bytes"
    etag = store.put("ds/a.bin", data)
    store.put("top.txt", b"top")
    cache = make_cache(tmp_path, store)
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()
    manifest = Manifest(store.bucket, "ds/", None, complete=True)
    manifest.objects["ds/a.bin"] = ObjectInfo("ds/a.bin", len(data), etag, 1)
    pins.save(manifest)
    clock = Clock()
    core = FsCore(
        store,
        cache,
        prefix="",
        metadata_ttl=TTL,
        s3_limiter=trio.CapacityLimiter(8),
        pins=pins,
        clock=clock,
    )
    invalidated: list[Any] = []
    core.on_invalidate(invalidated.extend)

    async def body() -> None:
        ds = await lookup(core, "ds")
        lists = store.requests["list"]
        pinned = await core.lookup(ds.ino, "a.bin")  # from the manifest: no LIST
        assert pinned is not None and store.requests["list"] == lists
        assert core.attributes(pinned).timeout == INDEFINITE_TTL
        assert invalidated == []
        pins.delete(manifest)  # evict
        core.pins_changed()
        assert invalidated == [(ds.ino, "a.bin")]  # the kernel held it "for ever"
        again = await core.lookup(ds.ino, "a.bin")  # from S3 now, with the TTL
        assert again is not None and store.requests["list"] == lists + 1
        assert core.attributes(again).timeout == TTL
        invalidated.clear()
        await lookup(core, "top.txt")
        lists = store.requests["list"]
        core.key_changed("top.txt")  # e.g. `staged --upload` wrote it behind the tree's back
        assert invalidated == [(ROOT_INODE, "top.txt")]
        assert await core.lookup(ROOT_INODE, "top.txt") is not None
        assert store.requests["list"] == lists + 1  # its directory was re-listed

    run_with(cache, body)


# ---- through a real mount, page cache in play --------------------------------


def _read_all(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _old_reader_pass(fd: int, old: bytes, start: int, step: int) -> tuple[int, int]:
    """Read ``fd`` from ``start`` to its end; every byte must be ``old``'s, or ESTALE.

    A short read is followed up at once: a silent prefix then EOF is a failure.
    Returns (bytes that came, ESTALE errors).
    """
    good = stale = 0
    off = start
    while off < len(old):
        try:
            data = os.pread(fd, step, off)
        except OSError as exc:
            assert exc.errno == errno.ESTALE, exc
            stale += 1
            off += step
            continue
        assert data, f"EOF at {off} of the old version's {len(old)} bytes"
        assert data == old[off : off + len(data)], f"bytes at {off} are not the old version's"
        good += len(data)
        off += len(data)
    return good, stale


def test_same_size_replacement_old_reader_gets_old_bytes_or_estale(
    bucket: Bucket, mounter: Mounter
) -> None:
    a, b = os.urandom(8 * MIB), os.urandom(8 * MIB)
    bucket.put("v.bin", a)
    mount = mounter(bucket.name, "--metadata-ttl", "1", "--readahead", "0", "--min-free", "0")
    path = mount.path / "v.bin"
    drop_page_cache()
    fd_old = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd_old, MIB, 0) == a[:MIB]
        bucket.put("v.bin", b)
        time.sleep(1.5)  # past the TTL: the next open re-lists
        fd_new = os.open(path, os.O_RDONLY)
        try:
            assert os.fstat(fd_new).st_ino != os.fstat(fd_old).st_ino
            assert _read_all(fd_new, len(b)) == b  # B's pages, on B's inode
            good, stale = _old_reader_pass(fd_old, a, 0, 256 * 1024)
            assert good >= MIB  # what it had read stays readable
            assert stale > 0  # A's last blocks were never fetched: S3 has only B now
            drop_page_cache()
            good, _ = _old_reader_pass(fd_old, a, 0, 256 * 1024)
            assert good >= MIB  # A's block 0 from the verified cache, not B's
            assert os.fstat(fd_old).st_size == len(a)
        finally:
            os.close(fd_new)
    finally:
        os.close(fd_old)
    assert path.read_bytes() == b
    assert mount.stop() == 0


def test_shorter_replacement_old_reader_never_gets_a_silent_prefix(
    bucket: Bucket, mounter: Mounter
) -> None:
    a, b = os.urandom(4 * MIB), os.urandom(MIB)
    bucket.put("v.bin", a)
    mount = mounter(bucket.name, "--metadata-ttl", "1", "--readahead", "0", "--min-free", "0")
    path = mount.path / "v.bin"
    drop_page_cache()
    with path.open("rb", buffering=0) as old:
        assert os.pread(old.fileno(), 512 * 1024, 0) == a[: 512 * 1024]
        bucket.put("v.bin", b)
        time.sleep(1.5)
        st_new = os.stat(path)
        assert (st_new.st_size, st_new.st_ino) != (len(a), os.fstat(old.fileno()).st_ino)
        assert path.read_bytes() == b
        assert os.fstat(old.fileno()).st_size == len(a)
        _, stale = _old_reader_pass(old.fileno(), a, 512 * 1024, 128 * 1024)
        assert stale > 0
    assert mount.stop() == 0


# ---- row 7: listings whose ETags differ from GET's and HEAD's ----------------


def test_listing_etag_differs_from_get_one_warning_and_the_right_bytes(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = {"one.bin": os.urandom(300_000), "d/big.bin": os.urandom(3 * MIB + 7)}
    etags = {key: bucket.put(key, data) for key, data in files.items()}
    proxy = FaultProxy(bucket.server.endpoint_url, listing_etag=1.0).start()
    try:
        mount = mounter(bucket.name, "--min-free", "0", server=proxy)
        drop_page_cache()
        for key, data in files.items():
            assert (mount.path / key).read_bytes() == data
        drop_page_cache()  # again, from the cache: same version, no second check
        for key, data in files.items():
            with (mount.path / key).open("rb") as f:
                assert f.read() == data
        assert mount.stop() == 0
    finally:
        proxy.stop()
    log = mount.log_text()
    for key in files:
        lines = [ln for ln in log.splitlines() if "WARNING" in ln and f"key={key}:" in ln]
        assert len(lines) == 1, lines
        listed = re.search(r'listing gave ETag ("[0-9a-f]+")', lines[0])
        assert listed is not None and listed.group(1) != etags[key]
        assert f"server answers ETag {etags[key]}" in lines[0]
    for key in files:  # one re-check per object, then its version is known
        assert [r.op for r in bucket.server.log if r.path.endswith("/" + key)].count("head") == 1
    assert "ESTALE" not in log and "op=read failed" not in log

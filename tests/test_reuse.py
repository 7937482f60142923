"""Content reuse across datasets: a v4 that shares most of v3's content costs GETs only
for what changed, and a copy that does not pass its CRCs is never kept.

The core path runs over the in-memory store (GETs counted by the store); the same
claims are then made through a real mount, counting GETs at the S3 server.
"""

from __future__ import annotations

import os
import random
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from s3cachefs.base.values import human_bytes
from s3cachefs.cache import copies, reuse
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.ledger import Bounds, Ledger
from s3cachefs.datasets.contentindex import ContentIndex, index_of
from s3cachefs.datasets.pins import Manifest, PinStore, Shard
from s3cachefs.datasets.prefetch import PrefetchJob
from s3cachefs.store import checksums
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo
from s3cachefs.testing.memorystore import MemoryStore
from tests.conftest import Bucket, Mounter, run_cli, status
from tests.test_blockcache import BS, make_cache, read_back, run_with

PARTS = [b"p" * 200_000, b"q" * 200_000, b"r" * 50_000]


def pages(count: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, 3 * BS)) for _ in range(count)]


def put_v3_v4(store: MemoryStore, count: int = 20, changed: int = 1) -> dict[str, bytes]:
    """v3: ``count`` single-part pages and two multipart objects (one with a composite
    CRC32 checksum); v4: the same content under its own keys, but the first ``changed``
    pages new. Returns v4's content."""
    v4: dict[str, bytes] = {}
    for i, body in enumerate(pages(count)):
        store.put(f"v3/train/page-{i:03d}", body)
        new = body if i >= changed else b"changed " + body
        store.put(f"v4/train/page-{i:03d}", new)
        v4[f"v4/train/page-{i:03d}"] = new
    for version in ("v3", "v4"):
        store.put_parts(f"{version}/big-etag.bin", PARTS)
        store.put_parts(f"{version}/big-crc.bin", PARTS[::-1], checksum="crc32")
    v4["v4/big-etag.bin"] = b"".join(PARTS)
    v4["v4/big-crc.bin"] = b"".join(PARTS[::-1])
    return v4


async def _ignore(event: dict[str, Any]) -> None:
    pass


def prefetch(
    cache: BlockCache,
    pins: PinStore,
    prefix: str,
    *,
    shard: Shard | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    finals: list[dict[str, Any]] = []

    async def body() -> None:
        job = PrefetchJob(
            cache.store, cache, pins, prefix=prefix, shard=shard, jobs=4, dry_run=dry_run
        )
        finals.append(await job.run(_ignore))

    run_with(cache, body)
    return finals[0]


def setup(tmp_path: Path, store: MemoryStore, **options: int) -> tuple[BlockCache, PinStore]:
    cache = make_cache(tmp_path, store, **options)
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()
    return cache, pins


def version(store: MemoryStore, key: str) -> ObjectVersion:
    info = store.head(key)
    return ObjectVersion(store.bucket, key, info.etag, info.size)


def cache_file(cache: BlockCache, store: MemoryStore, key: str) -> Path:
    return cache.object_path(version(store, key).oid)


def test_v4_sharing_most_of_v3_gets_only_what_changed(tmp_path: Path) -> None:
    store = MemoryStore()
    v4 = put_v3_v4(store, count=20, changed=1)
    cache, pins = setup(tmp_path, store)
    assert prefetch(cache, pins, "v3/")["ok"]
    store.requests.clear()
    final = prefetch(cache, pins, "v4/")
    assert (final["ok"], final["failed"]) == (True, 0)
    assert store.requests["get"] == 1  # the one page that changed
    assert final["files_reused"] == len(v4) - 1
    assert final["bytes_reused"] == sum(len(b) for k, b in v4.items() if "page-000" not in k)
    assert final["bytes_fetched"] == len(v4["v4/train/page-000"])
    assert final["reused"] == (
        f"{len(v4) - 1} objects ({human_bytes(final['bytes_reused'])}) "
        "reused from the cache, 0 GETs"
    )
    manifest = pins.find("v4/", None)
    assert manifest is not None and manifest.complete
    # Pinned by the digest that found them (from the listing, no request): the MD5, or
    # the multipart ETag over the part layout the source's check recorded.
    assert manifest.checks["v4/train/page-005"].kind == "md5"
    for key, layout in (
        ("big-etag.bin", (200_000, 200_000, 50_000)),
        ("big-crc.bin", (50_000, 200_000, 200_000)),
    ):
        etag = store.head(f"v4/{key}").etag.strip('"')
        assert manifest.checks[f"v4/{key}"] == Check("mpu-etag", etag, layout)
    assert pins.find("v3/", None).checks["v3/big-crc.bin"].kind == "crc32-composite"  # type: ignore[union-attr]
    assert cache.stats["reused_objects"] == len(v4) - 1
    for key, body in v4.items():
        read_back(cache, version(store, key), body)
    assert store.requests["get"] == 1  # every read of v4 from its own, verified copy


def test_a_copy_is_its_own_file_evicting_v3_leaves_v4_whole(tmp_path: Path) -> None:
    """Not a hard link: freeing v3's versions (an evict) takes nothing from v4's."""
    store = MemoryStore()
    v4 = put_v3_v4(store, count=4, changed=0)
    cache, pins = setup(tmp_path, store)
    prefetch(cache, pins, "v3/")
    prefetch(cache, pins, "v4/")
    v3_file = cache_file(cache, store, "v3/train/page-001")
    v4_file = cache_file(cache, store, "v4/train/page-001")
    assert os.stat(v3_file).st_ino != os.stat(v4_file).st_ino
    manifest = pins.find("v3/", None)
    assert manifest is not None
    pins.delete(manifest)

    async def free() -> None:
        await cache.free({v.oid for v in manifest.versions()})

    run_with(cache, free)
    assert not v3_file.exists()
    store.requests.clear()
    for key, body in v4.items():
        read_back(cache, version(store, key), body)
    assert store.requests["get"] == 0


def test_a_corrupt_cached_source_is_not_reused_the_object_is_downloaded(tmp_path: Path) -> None:
    store = MemoryStore()
    v4 = put_v3_v4(store, count=6, changed=0)
    cache, pins = setup(tmp_path, store, fetch_bytes=2 * BS)  # big-etag.bin: 4 runs
    prefetch(cache, pins, "v3/")
    for key, offset in (("v3/train/page-002", 10), ("v3/big-etag.bin", 5 * BS + 7)):
        with cache_file(cache, store, key).open("r+b") as f:  # a byte flipped on disk
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
    store.requests.clear()
    final = prefetch(cache, pins, "v4/")
    assert (final["ok"], final["files_reused"]) == (True, len(v4) - 2)
    assert store.requests["get"] == 1 + 4  # the two whose source failed: downloaded
    assert cache.stats["corrupt_blocks"] == 2
    assert cache.missing_blocks(version(store, "v3/train/page-002")) == [0]  # dropped
    assert cache.missing_blocks(version(store, "v3/big-etag.bin")) == [5]
    for key in ("v4/train/page-002", "v4/big-etag.bin"):
        read_back(cache, version(store, key), v4[key])
    assert store.requests["get"] == 5


def test_reuse_under_a_shard(tmp_path: Path) -> None:
    store = MemoryStore()
    v4 = put_v3_v4(store, count=20, changed=0)
    cache, pins = setup(tmp_path, store)
    prefetch(cache, pins, "v3/")
    store.requests.clear()
    shard = Shard(0, 2)
    final = prefetch(cache, pins, "v4/", shard=shard)
    mine = [k for k in v4 if shard.holds(k)]
    assert (final["ok"], final["files_reused"], final["files_done"]) == (True, len(mine), len(mine))
    assert store.requests["get"] == 0
    for key in mine:
        read_back(cache, version(store, key), v4[key])
    assert store.requests["get"] == 0


def test_a_dry_run_counts_reusable_objects_as_not_to_download(tmp_path: Path) -> None:
    store = MemoryStore()
    v4 = put_v3_v4(store, count=10, changed=2)
    cache, pins = setup(tmp_path, store)
    prefetch(cache, pins, "v3/")
    store.requests.clear()
    dry = prefetch(cache, pins, "v4/", dry_run=True)
    changed = len(v4["v4/train/page-000"]) + len(v4["v4/train/page-001"])
    assert dry["files_reused"] == len(v4) - 2
    assert dry["bytes_to_download"] == changed
    assert dry["bytes_needed"] == sum(len(b) for b in v4.values())  # copies take room too
    assert dry["reused"].endswith("can be reused from the cache, 0 GETs")
    assert store.requests["get"] == 0
    assert cache.stats["reused_objects"] == 0


def test_the_same_content_found_by_s3_checksum_under_another_part_layout(
    tmp_path: Path,
) -> None:
    """A full-object SHA-256 does not depend on the part layout: one HEAD, no GET."""
    store = MemoryStore()
    data = b"".join(PARTS)
    store.put_parts("v3/full.bin", PARTS, checksum="sha256", full=True)
    store.put_parts("v4/full.bin", [data[:300_000], data[300_000:]], checksum="sha256", full=True)
    other = bytes(reversed(data))  # the same size, other bytes: asked, then downloaded
    store.put_parts("v4/other.bin", [other[:300_000], other[300_000:]], checksum="sha256")
    cache, pins = setup(tmp_path, store)
    prefetch(cache, pins, "v3/")
    store.requests.clear()
    final = prefetch(cache, pins, "v4/")
    assert (final["ok"], final["files_reused"]) == (True, 1)
    assert store.requests["get"] == 1  # other.bin, in one run
    # other.bin's checksum HEADs, asked for the reuse, are passed on to its download,
    # not asked again (7 HEADs before)
    assert store.requests["head"] == 5
    read_back(cache, version(store, "v4/other.bin"), other)
    manifest = pins.find("v4/", None)
    assert manifest is not None and manifest.checks["v4/full.bin"].kind == "sha256-full"
    read_back(cache, version(store, "v4/full.bin"), data)


def forge(data: bytes, want: int, crc: Callable[[bytes], int], width: int, at: int) -> bytes:
    """``data`` with some of the ``2 * width`` bits from byte ``at`` flipped so that its
    CRC is ``want``: a CRC is linear over GF(2), so a solve finds them (anyone can)."""
    base = crc(data)
    basis: dict[int, tuple[int, int]] = {}  # pivot bit -> (CRC change, bits flipped)
    for bit in range(2 * width):
        flipped = bytearray(data)
        flipped[at + bit // 8] ^= 1 << (bit % 8)
        change, mask = crc(bytes(flipped)) ^ base, 1 << bit
        for pivot in sorted(basis, reverse=True):
            if change >> pivot & 1:
                change, mask = change ^ basis[pivot][0], mask ^ basis[pivot][1]
        if change:
            basis[change.bit_length() - 1] = (change, mask)
    target, mask = want ^ base, 0
    for pivot in sorted(basis, reverse=True):
        if target >> pivot & 1:
            target, mask = target ^ basis[pivot][0], mask ^ basis[pivot][1]
    out = bytearray(data)
    for bit in range(2 * width):
        if mask >> bit & 1:
            out[at + bit // 8] ^= 1 << (bit % 8)
    assert target == 0 and crc(bytes(out)) == want
    return bytes(out)


@pytest.mark.parametrize(
    ("algorithm", "crc", "width"),
    [("crc32", zlib.crc32, 32), ("crc64nvme", checksums.crc64nvme, 64)],
)
def test_the_same_size_and_crc_is_no_proof_of_content_the_object_is_downloaded(
    tmp_path: Path, algorithm: str, crc: Callable[[bytes], int], width: int
) -> None:
    """A forged (or unlucky) object with another's size and CRC gets its own bytes."""
    store = MemoryStore()
    data = b"".join(PARTS)
    forged = forge(b"OTHER CONTENT " + data[14:], crc(data), crc, width, at=1000)
    assert forged != data and len(forged) == len(data)
    store.put_parts("v3/x.bin", PARTS, checksum=algorithm, full=True)
    store.put_parts("v4/x.bin", [forged[:300_000], forged[300_000:]], checksum=algorithm, full=True)
    cache, pins = setup(tmp_path, store)
    assert prefetch(cache, pins, "v3/")["ok"]
    store.requests.clear()
    final = prefetch(cache, pins, "v4/")
    assert (final["ok"], final["files_reused"]) == (True, 0)
    assert store.requests["get"] == 1  # downloaded, and checked against its own CRC
    manifest = pins.find("v4/", None)
    assert manifest is not None and manifest.checks["v4/x.bin"].kind == f"{algorithm}-full"
    read_back(cache, version(store, "v4/x.bin"), forged)
    assert store.requests["get"] == 1


def pinned_sum(cache: BlockCache) -> int:
    """The pinned bytes counted the slow way, block by block (`Ledger.pinned_bytes` keeps
    them as they change)."""
    ledger = cache.ledger
    return sum(
        ledger.block_len(record.version, idx)
        for oid in ledger.pinned
        if (record := ledger.record(oid)) is not None
        for idx in record.blocks
    )


def test_pinned_bytes_stay_exact_through_pins_copies_drops_frees_and_a_restart(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    put_v3_v4(store, count=8, changed=2)
    cache, pins = setup(tmp_path, store)
    prefetch(cache, pins, "v3/")
    assert cache.pinned_bytes == pinned_sum(cache) > 0
    with cache_file(cache, store, "v3/train/page-003").open("r+b") as f:
        f.write(b"\0\1\2")  # a source that fails its CRC: dropped from a pinned version
    prefetch(cache, pins, "v4/")
    assert cache.pinned_bytes == pinned_sum(cache)
    v3 = pins.find("v3/", None)
    assert v3 is not None
    pins.delete(v3)  # unpinned: its blocks rejoin the LRU
    assert cache.pinned_bytes == pinned_sum(cache)

    async def free() -> None:
        await cache.free({v.oid for v in v3.versions()})

    run_with(cache, free)
    assert cache.pinned_bytes == pinned_sum(cache) > 0
    cache.close()
    again, pins = setup(tmp_path, store)  # the index loaded, then the pins
    assert again.pinned_bytes == pinned_sum(again) == cache.pinned_bytes


def test_the_content_index_matches_digest_and_size_only() -> None:
    m = Manifest("b", "v3/", None)
    m.objects = {
        "v3/a": ObjectInfo("v3/a", 3, '"900150983cd24fb0d6963f7d28e17f72"', 0),
        "v3/s": ObjectInfo("v3/s", 3, '"9001509"', 0),  # size-checked only: no source
    }
    m.checks = {"v3/a": Check("md5", "900150983cd24fb0d6963f7d28e17f72"), "v3/s": Check("size")}
    index = ContentIndex([m], etag_md5s=True)
    same = ObjectInfo("v4/a", 3, '"900150983cd24fb0d6963f7d28e17f72"', 0)
    (source,) = index.find(same)
    assert (source.version.key, source.check.kind) == ("v3/a", "md5")
    assert index.find(ObjectInfo("v4/a", 4, same.etag, 0)) == []  # another size
    assert index.find(ObjectInfo("v4/s", 3, '"9001509"', 0)) == []
    assert ContentIndex([m], etag_md5s=False).find(same) == []  # the ETag is no MD5 then


def test_the_content_index_is_kept_between_runs_and_follows_the_pins(tmp_path: Path) -> None:
    """Not rebuilt over every pinned object per run: brought up to date with the
    manifests installed, replaced and deleted since."""
    store = MemoryStore()
    put_v3_v4(store, count=4, changed=1)
    cache, pins = setup(tmp_path, store)
    prefetch(cache, pins, "v3/")
    indexes: list[ContentIndex] = []

    def index() -> ContentIndex:
        async def body() -> None:
            indexes.append(await index_of(pins, etag_md5s=True))

        run_with(cache, body)
        return indexes[-1]

    def found(key: str) -> list[str]:
        return [s.version.key for s in index().find(store.head(key))]

    assert found("v4/train/page-002") == ["v3/train/page-002"]
    assert found("v4/train/page-000") == []  # changed
    prefetch(cache, pins, "v4/")
    assert found("v4/train/page-000") == ["v4/train/page-000"]
    assert sorted(found("v4/train/page-002")) == ["v3/train/page-002", "v4/train/page-002"]
    prefetch(cache, pins, "v4/")  # a refresh: v4's manifest replaced, indexed once
    assert sorted(found("v4/train/page-002")) == ["v3/train/page-002", "v4/train/page-002"]
    v3 = pins.find("v3/", None)
    assert v3 is not None
    pins.delete(v3)
    assert found("v4/train/page-002") == ["v4/train/page-002"]
    assert found("v4/big-crc.bin") == ["v4/big-crc.bin"]  # by its multipart ETag
    assert all(i is indexes[0] for i in indexes)  # one index, kept


def test_every_way_of_copying_gives_the_same_verified_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * BS + 17)
    source = tmp_path / "source"
    source.write_bytes(data)
    for how in copies.WAYS:
        target = tmp_path / how
        with source.open("rb") as src, target.open("wb") as dst:
            failed = copies.copy_with(how, src.fileno(), dst.fileno(), len(data), BS)
        # An error: this filesystem has no such way (FICLONE on ext4), nothing written.
        assert target.read_bytes() == (data if failed is None else b"")


def test_a_way_that_fails_before_writing_falls_back_and_is_not_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any error before a byte is written (here EBADF: a reflink or copy_file_range
    into an append-only file) falls back to the next way, once per cache."""
    data = os.urandom(3 * BS + 17)
    source = tmp_path / "source"
    source.write_bytes(data)
    cache_copies = copies.Copies()
    for n in range(2):
        target = tmp_path / f"target-{n}"
        with source.open("rb") as src, target.open("ab") as dst:  # pwrite appends: fine
            how = cache_copies.copy(src.fileno(), dst.fileno(), len(data), BS)
        assert (how, target.read_bytes()) == ("read-write", data)
        assert cache_copies.ways == ["read-write"]
        if n == 0:
            dropped = len(caplog.records)
            assert 1 <= dropped <= 2  # once per way, at most
            caplog.clear()
    assert caplog.records == []  # the second copy tries no dropped way: no more lines


def true_used(cache: BlockCache) -> int:
    """The bytes on the books counted the slow way, block by block."""
    ledger = cache.ledger
    return sum(
        ledger.block_len(record.version, idx)
        for oid in ledger.oids()
        if (record := ledger.record(oid)) is not None
        for idx in record.blocks
    )


class GatedStore(MemoryStore):
    """GETs of ``gated`` keys wait (in their thread) until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gated: set[str] = set()

    def iter_range(self, key: str, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        if key in self.gated:
            self.gate.wait(30)
        return super().iter_range(key, *args, **kwargs)


def v3_v4_same(tmp_path: Path, store: MemoryStore) -> tuple[BlockCache, bytes]:
    """v3/a cached and pinned; v4/a the same bytes (three blocks), not cached."""
    body = bytes(range(256)) * (2 * BS // 256) + b"tail"
    store.put("v3/a", body)
    store.put("v4/a", body)
    cache, pins = setup(tmp_path, store)
    assert prefetch(cache, pins, "v3/")["ok"]
    assert cache.ledger.used == true_used(cache)
    return cache, body


def test_a_reader_in_flight_first_the_copy_stands_aside(tmp_path: Path) -> None:
    """The target's GET is under way: no copy (it would count the block twice)."""
    store = GatedStore()
    cache, body = v3_v4_same(tmp_path, store)
    src, dst = version(store, "v3/a"), version(store, "v4/a")
    store.gated.add("v4/a")
    store.requests.clear()
    got: list[bytes] = []

    async def body_() -> None:
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.append(await cache.read(dst, 0, 10))

            nursery.start_soon(reader)
            await wait_all_tasks_blocked()  # the reader's GET waits at the gate
            assert cache.in_flight == 1
            assert not await reuse.copy_verified(cache, src, dst)
            store.gate.set()

    run_with(cache, body_)
    assert got == [body[:10]]
    assert store.requests["get"] == 1
    assert cache.ledger.used == true_used(cache)


def test_a_reader_during_the_copy_waits_for_it_no_get(tmp_path: Path) -> None:
    """Every target block is claimed by the copy: a reader waits for it, then reads disk."""
    store = MemoryStore()
    cache, body = v3_v4_same(tmp_path, store)
    src, dst = version(store, "v3/a"), version(store, "v4/a")
    store.requests.clear()
    got: list[bytes] = []

    async def body_() -> None:
        limiter, holders = cache.disk_limiter, [object() for _ in range(4)]
        for holder in holders:  # the disk busy: the copy waits with its claims
            await limiter.acquire_on_behalf_of(holder)
        copied: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def copy() -> None:
                copied.append(await reuse.copy_verified(cache, src, dst))

            async def reader() -> None:
                got.append(await cache.read(dst, 0, len(body)))

            nursery.start_soon(copy)
            await wait_all_tasks_blocked()
            nursery.start_soon(reader)
            await wait_all_tasks_blocked()
            for holder in holders:
                limiter.release_on_behalf_of(holder)
        assert copied == [True]

    run_with(cache, body_)
    assert got == [body]
    assert store.requests["get"] == 0
    assert cache.ledger.used == true_used(cache)


def test_a_block_on_the_books_twice_is_counted_once(tmp_path: Path) -> None:
    """Two writers of one block (each reserved it): the second gives its bytes back."""
    ledger = Ledger(BS)
    bounds = Bounds(tmp_path, 1 << 30, 0)
    record = ledger.new_record(ObjectVersion("b", "k", '"e"', 2 * BS))
    for _ in range(2):
        assert ledger.reserve(BS, bounds)[1]
        ledger.add_block(record, 0, 1)
    assert ledger.used == BS
    assert ledger.reserve(2 * BS, bounds)[1]
    ledger.add_blocks(record, {0: 1, 1: 2})
    assert ledger.used == 2 * BS


def test_a_copy_reserves_its_room_before_it_writes(tmp_path: Path) -> None:
    store = MemoryStore()
    cache, body = v3_v4_same(tmp_path, store)
    src, dst = version(store, "v3/a"), version(store, "v4/a")
    before = cache.ledger.used

    async def body_() -> None:
        limiter, holders = cache.disk_limiter, [object() for _ in range(4)]
        for holder in holders:  # the disk busy: the copy waits, its room on the books
            await limiter.acquire_on_behalf_of(holder)
        copied: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def copy() -> None:
                copied.append(await reuse.copy_verified(cache, src, dst))

            nursery.start_soon(copy)
            await wait_all_tasks_blocked()
            assert cache.ledger.used == before + len(body)
            for holder in holders:
                limiter.release_on_behalf_of(holder)
        assert copied == [True]

    run_with(cache, body_)
    assert cache.ledger.used == true_used(cache) == before + len(body)


def test_a_copy_takes_no_slot_of_the_disk_limiter_reads_wait_for(tmp_path: Path) -> None:
    """Every disk slot taken (by reads): the copy and its read-back still run; only the
    quick adopt at its end waits for a slot."""
    store = MemoryStore()
    cache, body = v3_v4_same(tmp_path, store)
    src, dst = version(store, "v3/a"), version(store, "v4/a")
    place = cache.object_path(dst.oid)
    store.requests.clear()

    def copied_and_checked() -> bool:
        made = list(place.parent.glob(f"{place.name}.reuse-*"))
        done = cache.integrity.copies.limiter.borrowed_tokens == 0
        return done and len(made) == 1 and made[0].stat().st_size == len(body)

    async def body_() -> None:
        limiter, holders = cache.disk_limiter, [object() for _ in range(4)]
        for holder in holders:
            await limiter.acquire_on_behalf_of(holder)
        copied: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def copy() -> None:
                copied.append(await reuse.copy_verified(cache, src, dst))

            nursery.start_soon(copy)
            for _ in range(3000):  # a bound: on the disk limiter it would never get there
                if copied_and_checked():
                    break
                await trio.sleep(0.01)
            assert copied_and_checked()
            assert not place.exists()  # not adopted yet: that waits for a disk slot
            for holder in holders:
                limiter.release_on_behalf_of(holder)
        assert copied == [True]

    run_with(cache, body_)
    read_back(cache, dst, body)
    assert store.requests["get"] == 0


def test_a_disk_error_in_a_copy_is_one_warning_the_object_is_downloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The copy's room needs an evicted file gone, and it cannot go (a directory in its
    place): the prefetch goes on, and downloads the object."""
    store = MemoryStore()
    body = bytes(range(256)) * (2 * BS // 256) + b"tail"
    store.put("v3/a", body)
    store.put("v4/a", body)
    store.put("other", b"o" * BS)
    cache, pins = setup(tmp_path, store, cache_size=2 * len(body) + BS // 2)
    assert prefetch(cache, pins, "v3/")["ok"]
    read_back(cache, version(store, "other"), b"o" * BS)  # unpinned: the copy's victim
    victim = cache.object_path(version(store, "other").oid)
    victim.unlink()
    victim.mkdir()
    store.requests.clear()
    final = prefetch(cache, pins, "v4/")
    assert (final["ok"], final["files_reused"]) == (True, 0)
    assert store.requests["get"] == 1
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "downloaded instead" in warning.getMessage()
    assert cache.ledger.used == true_used(cache)
    read_back(cache, version(store, "v4/a"), body)
    assert store.requests["get"] == 1


def test_a_target_cached_another_way_during_the_copy_is_no_reuse(tmp_path: Path) -> None:
    """An upload of the same version adopted while the copy waited: the copy is dropped,
    its room given back, and nothing is counted as reused."""
    store = MemoryStore()
    cache, body = v3_v4_same(tmp_path, store)
    src, dst = version(store, "v3/a"), version(store, "v4/a")
    upload = tmp_path / "upload"
    upload.write_bytes(body)
    crcs = {i: zlib.crc32(body[i * BS : (i + 1) * BS]) for i in range(3)}

    async def body_() -> None:
        limiter = cache.integrity.copies.limiter
        holders = [object() for _ in range(int(limiter.total_tokens))]
        for holder in holders:  # every copy slot taken: the copy waits, claimed
            await limiter.acquire_on_behalf_of(holder)
        copied: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def copy() -> None:
                copied.append(await reuse.copy_verified(cache, src, dst))

            nursery.start_soon(copy)
            await wait_all_tasks_blocked()
            assert await cache.adopt(dst, upload, crcs)
            for holder in holders:
                limiter.release_on_behalf_of(holder)
        assert copied == [False]

    run_with(cache, body_)
    assert cache.stats["reused_objects"] == 0
    assert cache.ledger.used == true_used(cache)
    place = cache.object_path(dst.oid)
    assert list(place.parent.glob(f"{place.name}.reuse-*")) == []
    read_back(cache, dst, body)


# ---- through a real mount, GETs counted at the S3 server ----------------------------


def test_prefetch_of_v4_through_the_mount_reuses_v3(bucket: Bucket, mounter: Mounter) -> None:
    rng = random.Random(12)
    v3 = {f"v3/page-{i:03d}.png": rng.randbytes(rng.randint(20_000, 200_000)) for i in range(20)}
    v3["v3/archive/big.tar"] = rng.randbytes(3 * 1024 * 1024 + 5)
    v4 = {k.replace("v3/", "v4/", 1): b for k, b in v3.items()}
    v4["v4/page-007.png"] = b"changed" + v4["v4/page-007.png"]
    for key, body in {**v3, **v4}.items():
        bucket.put(key, body)
    mount = mounter(bucket.name)
    assert run_cli("prefetch", "v3", "--mount", str(mount.path)).returncode == 0
    source = next(
        p
        for p in (mount.cache_dir / "v1" / "objects").glob("*/*/*")
        if p.read_bytes() == v3["v3/page-003.png"]
    )
    with source.open("r+b") as f:  # a flipped byte in v3's cached page: never copied
        f.seek(100)
        f.write(bytes([v3["v3/page-003.png"][100] ^ 0xFF]))
    bucket.server.reset()
    dry = run_cli("prefetch", "v4", "--mount", str(mount.path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    changed = human_bytes(len(v4["v4/page-007.png"]))
    assert f"{changed} to download ({len(v4) - 1} objects (" in dry.stdout
    assert "can be reused from the cache, 0 GETs;" in dry.stdout
    assert bucket.server.counts()["get"] == 0
    result = run_cli("prefetch", "v4", "--mount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert f"{len(v4) - 2} objects" in result.stdout
    assert "reused from the cache, 0 GETs" in result.stdout
    gets = {r.path.rsplit("/", 1)[-1] for r in bucket.server.gets()}
    assert gets == {"page-007.png", "page-003.png"}  # what changed, and the corrupt source
    assert status(mount)["cache"]["reused_objects"] == len(v4) - 2
    bucket.server.reset()
    for key, body in v4.items():
        assert (mount.path / key).read_bytes() == body
    assert bucket.server.counts()["get"] == 0

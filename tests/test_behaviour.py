"""Filesystem behaviour, written once, run on the core and through a real mount."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from s3cachefs.base.config import MountConfig
from s3cachefs.base.values import parse_target
from tests.conftest import Bucket, Mounter
from tests.sessions import CoreSession, MountSession, Session

MIB = 1024 * 1024
OpenFs = Callable[..., Session]


@pytest.fixture(params=["core", "mount"])
def open_fs(
    request: pytest.FixtureRequest, bucket: Bucket, tmp_path: Path, mounter: Mounter
) -> Iterator[OpenFs]:
    sessions: list[Session] = []

    def open_(prefix: str = "", ttl: str = "60") -> Session:
        session: Session
        if request.param == "core":
            session = CoreSession(
                MountConfig(
                    bucket=bucket.name,
                    prefix=parse_target(f"{bucket.name}/{prefix}")[1],
                    mountpoint=tmp_path / "unused",
                    cache_dir=tmp_path / "cache",
                    endpoint_url=bucket.server.endpoint_url,
                    metadata_ttl=float(ttl),
                    min_free=0,
                )
            )
        else:
            target = bucket.name + ("/" + prefix if prefix else "")
            mount = mounter(target, "--metadata-ttl", ttl, "--min-free", "0")
            session = MountSession(mount.path)
        sessions.append(session)
        return session

    yield open_
    for session in sessions:
        session.close()


def test_tree_listing_and_attributes(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("a.txt", b"hello")
    bucket.put("docs/b.bin", b"x" * 3000)
    bucket.put("docs/deep/c.png", b"")
    fs = open_fs()
    assert fs.listdir("") == ["a.txt", "docs"]
    assert fs.listdir("docs") == ["b.bin", "deep"]
    assert fs.listdir("docs/deep") == ["c.png"]
    a = fs.stat("a.txt")
    assert (a.is_dir, a.size, a.mode) == (False, 5, 0o444)
    assert a.mtime_ns > 0
    d = fs.stat("docs")
    assert (d.is_dir, d.mode) == (True, 0o555)
    assert fs.stat("docs/deep/c.png").size == 0
    assert fs.read("docs/deep/c.png") == b""
    with pytest.raises(FileNotFoundError):
        fs.stat("missing.txt")
    with pytest.raises(FileNotFoundError):
        fs.listdir("docs/nope")


def test_reads_are_byte_exact_across_blocks(bucket: Bucket, open_fs: OpenFs) -> None:
    rng = random.Random(7)
    small = rng.randbytes(30_000)
    big = rng.randbytes(3 * MIB + 12_345)  # four blocks, the last one partial
    bucket.put("small.png", small)
    bucket.put("big.tar", big)
    fs = open_fs()
    assert fs.read("small.png") == small
    assert fs.read("big.tar") == big
    for _ in range(40):  # pread at random offsets, including across block boundaries
        offset = rng.randrange(len(big))
        length = rng.randrange(1, 2 * MIB)
        assert fs.read("big.tar", offset, length) == big[offset : offset + length]
    assert fs.read("big.tar", MIB - 10, 20) == big[MIB - 10 : MIB + 10]
    assert fs.read("big.tar", len(big) - 5, 100) == big[-5:]
    assert fs.read("big.tar", len(big) + 10, 100) == b""


def test_directory_with_more_than_1000_entries(bucket: Bucket, open_fs: OpenFs) -> None:
    names = [f"img-{i:05d}.png" for i in range(1100)]
    for name in names:
        bucket.put(f"many/{name}", name.encode())
    fs = open_fs()
    assert fs.listdir("many") == names
    assert fs.read("many/img-01099.png") == b"img-01099.png"
    lists = [r for r in bucket.server.log if r.op == "list"]
    assert len(lists) >= 2  # paginated: ListObjectsV2 returns at most 1000 keys a page


def test_prefix_mount_shows_only_the_prefix(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("dataset-v3/train/1.png", b"one")
    bucket.put("dataset-v2/train/1.png", b"old")
    bucket.put("top.txt", b"top")
    fs = open_fs(prefix="dataset-v3")
    assert fs.listdir("") == ["train"]
    assert fs.read("train/1.png") == b"one"


def test_file_and_prefix_of_the_same_name_directory_wins(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("clash", b"i am a file")
    bucket.put("clash/inside.txt", b"inside")
    fs = open_fs()
    assert fs.listdir("") == ["clash"]
    assert fs.stat("clash").is_dir
    assert fs.read("clash/inside.txt") == b"inside"


def test_keys_that_are_not_file_names_are_skipped(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("ok/good.txt", b"good")
    bucket.put("ok/", b"")  # a directory marker object
    bucket.put("ok//empty-segment.txt", b"bad")
    bucket.put("ok/./dot.txt", b"bad")
    bucket.put("ok/../escape.txt", b"bad")
    bucket.put("../outside.txt", b"bad")
    bucket.put("/etc/passwd", b"bad")  # an "absolute" key: its first segment is empty
    bucket.put("ok/" + "n" * 256, b"bad")
    bucket.put("ok/" + "n" * 255, b"longest allowed")
    fs = open_fs()
    assert fs.listdir("") == ["ok"]
    assert fs.listdir("ok") == sorted(["good.txt", "n" * 255])
    assert fs.read("ok/" + "n" * 255) == b"longest allowed"


def test_negative_lookup_is_cached_within_ttl(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("d/present.txt", b"1")
    fs = open_fs()
    assert fs.listdir("d") == ["present.txt"]
    with pytest.raises(FileNotFoundError):
        fs.stat("d/later.txt")
    bucket.put("d/later.txt", b"2")
    with pytest.raises(FileNotFoundError):  # still within the 60 s TTL
        fs.stat("d/later.txt")


def test_new_objects_appear_after_ttl(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("d/present.txt", b"1")
    fs = open_fs(ttl="0")
    assert fs.listdir("d") == ["present.txt"]
    bucket.put("d/later.txt", b"2")
    assert fs.listdir("d") == ["later.txt", "present.txt"]
    assert fs.read("d/later.txt") == b"2"


def test_object_replaced_under_an_open_reader_is_stale(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("v.bin", b"a" * (2 * MIB))
    fs = open_fs(ttl="0")
    assert fs.read("v.bin", 0, 10) == b"a" * 10
    bucket.put("v.bin", b"b" * (2 * MIB))
    # The old version's block 1 was never cached: fetching it now must not mix versions.
    try:
        data = fs.read("v.bin", 0, 2 * MIB)
    except OSError as exc:
        assert exc.errno == errno.ESTALE
    else:
        assert data in (b"a" * (2 * MIB), b"b" * (2 * MIB))
    assert fs.read("v.bin", MIB, 10) == b"b" * 10  # a new open sees the new version

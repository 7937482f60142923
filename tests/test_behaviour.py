"""Filesystem behaviour, written once, run on the core and through a real mount.

Reads, listings and attributes; then write-through (README, "Writable
mounts"): what a writable mount allows, what it refuses and with which errno.
Mounts here never kernel-serve pinned datasets: the core cannot, and a
read-only bind would answer EROFS in the daemon's place.
"""

from __future__ import annotations

import errno
import itertools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from s3cachefs.base.config import MountConfig
from s3cachefs.base.values import parse_size, parse_target
from s3cachefs.testing.sessions import CoreSession, MountSession, Session, write_file
from tests.conftest import Bucket, Mounter
from tests.test_writes import s3_bytes, s3_has

MIB = 1024 * 1024
OpenFs = Callable[..., Session]


@pytest.fixture(params=["core", "mount"])
def open_fs(
    request: pytest.FixtureRequest, bucket: Bucket, tmp_path: Path, mounter: Mounter
) -> Iterator[OpenFs]:
    sessions: list[Session] = []
    numbers = itertools.count()

    def open_(
        prefix: str = "",
        ttl: str = "60",
        *,
        writable: bool = False,
        allow_overwrite: bool = False,
        allow_delete: bool = False,
        cache_size: str = "10G",
    ) -> Session:
        n = next(numbers)
        session: Session
        if request.param == "core":
            session = CoreSession(
                MountConfig(
                    bucket=bucket.name,
                    prefix=parse_target(f"{bucket.name}/{prefix}")[1],
                    mountpoint=tmp_path / "unused",
                    cache_dir=tmp_path / f"cache{n}",
                    endpoint_url=bucket.server.endpoint_url,
                    metadata_ttl=float(ttl),
                    min_free=0,
                    cache_size=parse_size(cache_size),
                    writable=writable,
                    allow_overwrite=allow_overwrite,
                    allow_delete=allow_delete,
                )
            )
        else:
            target = bucket.name + ("/" + prefix if prefix else "")
            flags = ["--metadata-ttl", ttl, "--min-free", "0", "--cache-size", cache_size]
            flags.append("--no-kernel-serve-pinned")
            flags += ["--writable"] if writable else []
            flags += ["--allow-overwrite"] if allow_overwrite else []
            flags += ["--allow-delete"] if allow_delete else []
            mount = mounter(target, *flags, name=f"mnt{n}", cache_dir=tmp_path / f"cache{n}")
            session = MountSession(mount.path)
        sessions.append(session)
        return session

    yield open_
    for session in sessions:
        session.close()


def errno_of(change: Callable[[], object]) -> int:
    with pytest.raises(OSError) as refused:
        change()
    assert refused.value.errno is not None
    return refused.value.errno


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
    bucket.put_many({f"many/{name}": name.encode() for name in names})
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


def test_statfs_is_the_cache_in_blocks(open_fs: OpenFs) -> None:
    fs = open_fs(cache_size="64M")
    st = fs.statfs()
    assert (st.block_size, st.blocks, st.name_max) == (MIB, 64, 255)
    assert 0 < st.free_blocks <= st.blocks
    assert (st.files, st.free_files) == (0, 0)  # S3 has no inode limit


# ---- writes (README, "Writable mounts") ------------------------------------


def test_a_written_file_is_in_s3_and_reads_back_with_zero_gets(
    bucket: Bucket, open_fs: OpenFs
) -> None:
    fs = open_fs(writable=True)
    big, small = random.Random(3).randbytes(3 * MIB + 12_345), b'{"text": "invoice 42"}\n'
    fs.mkdir("results")
    write_file(fs, "results/big.bin", big)
    write_file(fs, "results/page-1.json", small)
    write_file(fs, "results/empty.txt", b"")
    assert s3_has(bucket, "results/")  # mkdir made the directory a marker object
    assert s3_bytes(bucket, "results/big.bin") == big
    assert s3_bytes(bucket, "results/page-1.json") == small
    assert s3_bytes(bucket, "results/empty.txt") == b""
    assert fs.listdir("results") == ["big.bin", "empty.txt", "page-1.json"]
    bucket.server.reset()
    assert fs.read("results/big.bin") == big
    assert fs.read("results/page-1.json") == small
    assert bucket.server.gets() == []  # written data entered the cache under its new ETag
    written = fs.stat("results/big.bin")
    assert (written.is_dir, written.size, written.mode) == (False, len(big), 0o644)
    assert fs.stat("results").mode == fs.stat("").mode == 0o755


def test_fsync_makes_the_data_durable_before_close(bucket: Bucket, open_fs: OpenFs) -> None:
    fs = open_fs(writable=True)
    fh = fs.create("out.txt")
    fs.write(fh, 0, b"first part\n")
    fs.fsync(fh)
    assert s3_bytes(bucket, "out.txt") == b"first part\n"
    fs.write(fh, 0, b"FIRST")  # a write back within the file being written is fine
    fs.close_file(fh)
    assert s3_bytes(bucket, "out.txt") == b"FIRST part\n"
    assert fs.read("out.txt") == b"FIRST part\n"


def test_a_read_only_mount_refuses_every_change_with_erofs(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("d/a.txt", b"a")
    bucket.put("e/", b"")
    fs = open_fs()
    for change in (
        lambda: fs.create("new.txt"),
        lambda: fs.create("d/new.txt"),
        lambda: fs.open_write("d/a.txt", truncate=True),
        lambda: fs.mkdir("sub"),
        lambda: fs.unlink("d/a.txt"),
        lambda: fs.rmdir("e"),
        lambda: fs.rename("d/a.txt", "d/b.txt"),
    ):
        assert errno_of(change) == errno.EROFS
    assert (fs.stat("d/a.txt").mode, fs.stat("d").mode, fs.stat("").mode) == (0o444, 0o555, 0o555)
    assert fs.listdir("") == ["d", "e"]
    assert s3_bytes(bucket, "d/a.txt") == b"a"


def test_overwrite_delete_and_rename_are_refused_without_their_flags(
    bucket: Bucket, open_fs: OpenFs
) -> None:
    bucket.put("data/a.txt", b"original")
    bucket.put("data/keep/b.txt", b"b")
    bucket.put("data/empty/", b"")
    fs = open_fs(writable=True)
    assert errno_of(lambda: fs.open_write("data/a.txt", truncate=True)) == errno.EPERM
    assert errno_of(lambda: fs.unlink("data/a.txt")) == errno.EPERM
    assert errno_of(lambda: fs.rmdir("data/empty")) == errno.EPERM
    # S3 cannot rename atomically: EXDEV makes `mv` copy, then delete.
    assert errno_of(lambda: fs.rename("data/a.txt", "data/c.txt")) == errno.EXDEV
    assert errno_of(lambda: fs.mkdir("data/keep")) == errno.EEXIST
    assert errno_of(lambda: fs.create("data/a.txt")) == errno.EEXIST
    assert s3_bytes(bucket, "data/a.txt") == b"original"
    assert fs.read("data/a.txt") == b"original"
    assert fs.stat("data/a.txt").mode == 0o644  # writable mount; the flags decide the rest
    assert fs.listdir("data") == ["a.txt", "empty", "keep"]


def test_overwrite_and_delete_with_their_flags(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("data/a.txt", b"original")
    bucket.put("data/keep/b.txt", b"b")
    fs = open_fs(writable=True, allow_overwrite=True, allow_delete=True)
    fh = fs.open_write("data/a.txt", truncate=True)
    fs.write(fh, 0, b"replaced")
    fs.close_file(fh)
    assert s3_bytes(bucket, "data/a.txt") == b"replaced"
    assert fs.read("data/a.txt") == b"replaced"
    # Objects are replaced whole: rewriting part of one is refused.
    assert errno_of(lambda: fs.open_write("data/a.txt", truncate=False)) == errno.EOPNOTSUPP
    fs.unlink("data/a.txt")
    assert not s3_has(bucket, "data/a.txt")
    with pytest.raises(FileNotFoundError):
        fs.stat("data/a.txt")
    assert errno_of(lambda: fs.rmdir("data/keep")) == errno.ENOTEMPTY
    fs.unlink("data/keep/b.txt")
    fs.mkdir("new")
    assert s3_has(bucket, "new/")
    fs.rmdir("new")
    assert not s3_has(bucket, "new/")
    assert fs.listdir("") == ["data"]


def test_a_pinned_dataset_is_never_writable(bucket: Bucket, open_fs: OpenFs) -> None:
    bucket.put("ds/x.bin", b"x" * 1000)
    bucket.put("ds/sub/y.bin", b"y")
    fs = open_fs(writable=True, allow_overwrite=True, allow_delete=True)
    fs.pin("ds")
    for change in (
        lambda: fs.create("ds/new.txt"),
        lambda: fs.open_write("ds/x.bin", truncate=True),
        lambda: fs.unlink("ds/x.bin"),
        lambda: fs.mkdir("ds/other"),
        lambda: fs.rmdir("ds/sub"),
    ):
        assert errno_of(change) == errno.EROFS
    assert (fs.stat("ds").mode, fs.stat("ds/x.bin").mode, fs.stat("ds/sub").mode) == (
        0o555,
        0o444,
        0o555,
    )
    assert s3_bytes(bucket, "ds/x.bin") == b"x" * 1000
    assert not s3_has(bucket, "ds/new.txt")
    write_file(fs, "outside.txt", b"yes")  # the rest of the mount is writable
    assert s3_bytes(bucket, "outside.txt") == b"yes"
    assert fs.stat("outside.txt").mode == 0o644

"""A first prefetch's tree linked while it downloads (`datasets.kernelprestage`): what the
links made then become is exactly the tree built from the manifest's layout at the end."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import trio
import trio.testing

from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.datasets import binds, kernelprestage, kerneltrees
from s3cachefs.store.types import ObjectInfo
from tests.conftest import Bucket, Mounter, make_store, s3cachefs_cmd
from tests.faultproxy import FaultProxy
from tests.test_bulk import BS, engine_cache, md5_check, put_object, run_engine, until
from tests.test_prefetch import MIB


def cache_file(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.write_bytes(data)
    return path


def snapshot(tree: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path below ``tree``: (mode, size, mtime, inode); 0 for what a directory or an
    empty file (a file of its own in either tree) has no equal of."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            st = os.lstat(Path(dirpath) / name)
            rel = os.path.relpath(Path(dirpath) / name, tree)
            ino = 0 if stat.S_ISDIR(st.st_mode) or not st.st_size else st.st_ino
            mtime = 0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            out[rel] = (st.st_mode, st.st_size, mtime, ino)
    return out


def test_a_tree_linked_while_downloading_ends_as_the_layout_built_from_nothing(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    a = cache_file(cache, "a", b"aaaa")
    b = cache_file(cache, "b", b"bb")
    c = cache_file(cache, "c", b"c")
    d = cache_file(cache, "d", b"ddd")
    wrong = cache_file(cache, "wrong", b"ww")
    entries = [
        binds.TreeEntry("x/a.bin", a, 4, 1_000_000_000),  # linked meanwhile: kept
        binds.TreeEntry("x/y/b.bin", b, 2, 2_000_000_000),  # linked to another file: relinked
        binds.TreeEntry("c.bin", c, 1, 3_000_000_000),  # never linked: made at the end
        binds.TreeEntry("empty", None, 0, 4_000_000_000),  # an empty object: made at the end
        binds.TreeEntry("z", d, 3, 5_000_000_000),  # linked under a name now a directory
    ]
    dirs = frozenset({"marker"})  # a `dir/` key with no file of its own
    tree = tmp_path / "trees" / "id"
    tree.parent.mkdir()
    pre = kerneltrees.pre_path(tree)
    kerneltrees.prelink(pre, [entries[0], entries[4]])
    kerneltrees.prelink(pre, [binds.TreeEntry("x/y/b.bin", wrong, 2, 2_000_000_000)])
    kerneltrees.prelink(pre, [binds.TreeEntry("gone/old.bin", d, 3, 5_000_000_000)])
    # a key that had a file named "z" listed, then "z/inner" in a later page: "z" is a
    # directory in the layout, and the file hidden (as in the FUSE view)
    entries = [e for e in entries if e.rel != "z"] + [binds.TreeEntry("z/inner", d, 3, 5 * 10**9)]
    kept = os.lstat(pre / "x" / "a.bin").st_ino
    layout = kerneltrees.Layout(entries, dirs, [None] * len(entries), frozenset())

    staged = kerneltrees.stage(tree, layout)
    assert staged.fresh and not pre.exists()
    built = kerneltrees.next_path(tree)
    assert binds.tree_matches(built, entries, dirs)
    assert os.lstat(built / "x" / "a.bin").st_ino == kept == a.stat().st_ino

    reference = tmp_path / "reference"
    binds.build_tree(reference, entries, dirs)
    assert snapshot(built) == snapshot(reference)
    assert stat.S_IMODE(built.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_a_pre_tree_is_removed_with_its_tree(tmp_path: Path) -> None:
    source = cache_file(tmp_path, "f", b"f")
    tree = tmp_path / "trees" / "id"
    tree.parent.mkdir()
    kerneltrees.prelink(kerneltrees.pre_path(tree), [binds.TreeEntry("f", source, 1, 0)])
    kerneltrees.remove(tree)
    assert not kerneltrees.pre_path(tree).exists()
    assert source.stat().st_nlink == 1


def test_files_pinned_are_linked_in_batches_and_none_while_the_tree_is_made(
    tmp_path: Path,
) -> None:
    """`PreStages`: what a prefetch pins is linked by its own task; ``flushed`` links what
    is pending first and holds back the task while the caller makes the tree."""
    import trio
    import trio.testing

    from s3cachefs.cache.blocks import ObjectVersion
    from s3cachefs.cache.bulkriders import Rider
    from s3cachefs.datasets.kernelprestage import PreStages
    from s3cachefs.store.types import ObjectInfo

    class Bulk:
        def __init__(self) -> None:
            self.riders: list[Rider] = []

    class Cache:
        bulk = Bulk()

        def object_path(self, oid: str) -> Path:
            return tmp_path / "cache" / oid

    (tmp_path / "cache").mkdir()
    tree = tmp_path / "trees" / "id"
    tree.parent.mkdir()
    stages = PreStages(Cache())  # type: ignore[arg-type]
    pinned = stages.on_pin(tree, "ds/")

    def pin(key: str, data: bytes) -> None:
        info = ObjectInfo(key, len(data), "etag", 7)
        version = ObjectVersion("b", key, "etag", len(data))
        if data:
            (tmp_path / "cache" / version.oid).write_bytes(data)
        pinned(info, version)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stages.run)
            await trio.testing.wait_all_tasks_blocked()
            assert Cache.bulk.riders == [stages]
            pin("ds/a/1", b"one")
            pin("ds/empty", b"")  # no cache file: made when the tree is completed
            pre = kerneltrees.pre_path(tree)
            await stages.flush()  # after the batch the task may be linking
            assert (pre / "a" / "1").read_bytes() == b"one"
            assert not (pre / "empty").exists()
            async with stages.flushed(tree):
                pin("ds/b", b"two")  # pinned while the tree is made: not linked now
                assert not stages.wants() and stages.ride() is None  # nor by a bulk commit
                await trio.sleep(0.2)  # the task is waiting for the lock the caller holds
                assert not (pre / "b").exists()
            await stages.flush()
            assert (pre / "b").read_bytes() == b"two"
            # A bulk commit's thread call takes what is pending (`cache.bulkriders.Rider`); the
            # tree is not made meanwhile (the lock), and the task links nothing more.
            pin("ds/c", b"three")
            assert stages.wants()
            ride = stages.ride()
            assert ride is not None and not stages.pending
            work, then = ride
            made = trio.Event()

            async def make() -> None:
                async with stages.flushed(tree):
                    made.set()

            nursery.start_soon(make)
            await trio.sleep(0.2)
            assert not made.is_set()
            await trio.to_thread.run_sync(work)
            then()
            assert (pre / "c").read_bytes() == b"three"
            await made.wait()
            await stages.drop(tree)
            assert not pre.exists()
            nursery.cancel_scope.cancel()
        assert Cache.bulk.riders == []

    trio.run(main)


def test_a_tree_is_made_while_a_bulk_commit_waits_on_the_index(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leftover of review finding 6: the links riding on a bulk commit took the tree lock
    when the commit was asked for them, before its rows, so a tree made meanwhile
    (`PreStages.flushed`, a prefetch's end) waited on the commit's index (its lock timeout
    is 30 s). The rides are asked once the rows are in: the tree is made while the commit
    waits, and the pending links still ride on that commit, after its rows."""
    monkeypatch.setattr(kernelprestage, "LINGER", 3600.0)  # only a commit links here
    store = make_store(bucket, tmp_path)
    first, first_data = put_object(bucket, store, "ds/a", BS + 7)
    second, second_data = put_object(bucket, store, "ds/b", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    stages = kernelprestage.PreStages(cache)
    trees = tmp_path / "trees"
    trees.mkdir()
    made_tree, linked_tree = trees / "made", trees / "linked"
    in_index, release = threading.Event(), threading.Event()
    index_written = cache.bulk.disk.index_written

    def held(rows: list[tuple[object, ...]]) -> list[bool]:  # the commit's thread call
        if rows[0][0] == second:
            in_index.set()
            release.wait(60)
        return index_written(rows)  # type: ignore[arg-type]

    monkeypatch.setattr(cache.bulk.disk, "index_written", held)

    async def fetch_second() -> None:
        done = await cache.bulk.fetch(second, range(2), md5_check(second_data))
        assert done is not None and done.matches

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stages.run)
            assert await cache.bulk.fetch(first, range(2), md5_check(first_data)) is not None
            info = ObjectInfo("ds/a", len(first_data), first.etag, 7)
            stages.on_pin(linked_tree, "ds/")(info, first)  # to link on the next commit
            made = trio.Event()

            async def make() -> None:
                async with stages.flushed(made_tree):  # nothing of its own to link
                    made.set()

            try:
                nursery.start_soon(fetch_second)
                assert await trio.to_thread.run_sync(in_index.wait, 60)
                nursery.start_soon(make)
                await trio.testing.wait_all_tasks_blocked()
                assert made.is_set(), "the tree waited on a bulk commit's index"
                assert stages.pending, "taken before the commit's rows were in"
            finally:
                release.set()
            pre = kerneltrees.pre_path(linked_tree)
            await until(lambda: (pre / "a").exists() and not stages.pending)
            assert (pre / "a").stat().st_ino == cache.object_path(first.oid).stat().st_ino
            assert cache.missing_blocks(second) == []
            nursery.cancel_scope.cancel()

    run_engine(cache, body)
    cache.close()


class PagedProxy(FaultProxy):
    """Whole listings of ``ds/`` in pages of three keys; each page after the first is held
    until ``gate`` opens."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.gate = threading.Event()

    def _listing(self, req: BaseHTTPRequestHandler) -> tuple[bool, str]:
        listing, path = super()._listing(req)
        url = urlsplit(path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        if not listing or not query.get("prefix", "").startswith("ds/") or query.get("delimiter"):
            return listing, path
        if "continuation-token" in query:
            self.gate.wait(60)
        query["max-keys"] = "3"
        return True, url._replace(query=urlencode(query)).geturl()


def linked_ahead(cache_dir: Path) -> list[Path]:
    """The files of every ``trees/<id>.pre`` below ``cache_dir``."""
    return [p for pre in cache_dir.rglob("trees/*.pre") for p in pre.rglob("*") if p.is_file()]


def test_a_first_prefetch_refused_after_pinning_leaves_no_pre_tree(
    bucket: Bucket, mounter: Mounter, s3_server: LocalS3
) -> None:
    """Review of W1's tail, M2: a first prefetch refused on a later listing page (the
    dataset does not fit) after objects of the first were pinned and linked into its
    ``.pre`` left that tree behind, and its hard links kept the cache files the cache
    then evicts on disk, outside its accounting. The prefetch's end drops it, however
    it ended."""
    rng = random.Random(7)
    files = {f"ds/a/{i}": rng.randbytes(50_000) for i in range(6)}
    files["ds/z/huge"] = rng.randbytes(8 * MIB)  # on a later page: does not fit
    bucket.put_many(files)
    proxy = PagedProxy(s3_server.endpoint_url)
    proxy.start()
    job: subprocess.Popen[str] | None = None
    try:
        mount = mounter(bucket.name, "--min-free", "0", "--cache-size", "4M", server=proxy)
        job = subprocess.Popen(
            s3cachefs_cmd("prefetch", "ds", "--mount", str(mount.path)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not linked_ahead(mount.cache_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert linked_ahead(mount.cache_dir), "nothing was linked while the listing was held"
        proxy.gate.set()
        _, stderr = job.communicate(timeout=120)
        assert job.returncode == 2 and "does not fit" in stderr, stderr
        assert not list(mount.cache_dir.rglob("trees/*.pre"))
    finally:
        proxy.gate.set()
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        proxy.stop()

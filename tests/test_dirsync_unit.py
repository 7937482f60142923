"""`datasets.dirsync` over the project's in-memory store: what a real server cannot be
made to do on cue (an object replaced or deleted between the listing and its GET)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from s3cachefs.base.errors import ConfigError
from s3cachefs.datasets import dirmanifest
from s3cachefs.datasets.dirfetch import FetchItem, FetchResult, ObjectFetcher, ThreadFetcher
from s3cachefs.datasets.dirresult import SyncOptions
from s3cachefs.datasets.dirsync import DirSync
from s3cachefs.datasets.pins import Shard
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo, ObjectStore
from s3cachefs.testing.memorystore import MemoryStore


class ChangingStore(MemoryStore):
    """Lists, then replaces one object and deletes another before any GET."""

    def list_tree(self, prefix: str) -> Iterator[list[ObjectInfo]]:
        yield from super().list_tree(prefix)
        if self.change:
            self.put("ds/a.bin", b"the new version, longer than the old one")
            self.delete("ds/b.bin")
            self.change = False

    change = True


def fetcher(store: ObjectStore, planner: Callable[[ObjectInfo], Check]) -> ObjectFetcher:
    return ThreadFetcher(store, 2, planner)


def test_an_object_replaced_after_the_listing_is_fetched_at_its_new_version(
    tmp_path: Path,
) -> None:
    store = ChangingStore()
    store.put("ds/a.bin", b"old")
    store.put("ds/b.bin", b"gone soon")
    store.put("ds/c.bin", b"stays")
    options = SyncOptions(store.bucket, "ds/", tmp_path / "dest")

    first = DirSync(options, store, fetcher).run()
    assert (tmp_path / "dest" / "a.bin").read_bytes() == b"the new version, longer than the old one"
    assert (tmp_path / "dest" / "c.bin").read_bytes() == b"stays"
    assert first.failed == {"ds/b.bin": "deleted in S3 during the sync (run it again)"}
    assert not first.complete and not (tmp_path / "dest" / "b.bin").exists()

    store.requests.clear()
    second = DirSync(options, store, fetcher).run()
    assert second.complete and second.fetched == 0
    assert store.requests["get"] == 0


class KillSelf:
    """A fetcher whose process is killed (SIGKILL) as soon as the fetches start."""

    bytes_received = 0

    def fetch(self, items: Sequence[FetchItem], **_: object) -> Iterator[FetchResult | None]:
        os.kill(os.getpid(), signal.SIGKILL)
        yield None


def killed_run(options: SyncOptions, store: MemoryStore) -> None:
    """A DirSync run in a forked child, killed with SIGKILL once it starts fetching."""
    pid = os.fork()
    if pid == 0:
        try:
            DirSync(options, store, lambda s, p: KillSelf()).run()
        finally:
            os._exit(1)  # never back into pytest
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_delete_after_a_killed_run_still_deletes_what_s3_deleted(tmp_path: Path) -> None:
    """A run killed (-9) after its first manifest save still has, recorded as kept, the
    files S3 no longer lists: a later ``--delete`` run deletes them (review 13/16)."""
    store = MemoryStore()
    for name in ("a", "b", "c"):
        store.put(f"ds/{name}.bin", name.encode() * 100)
    dest = tmp_path / "dest"
    options = SyncOptions(store.bucket, "ds/", dest)
    assert DirSync(options, store, fetcher).run().complete

    store.delete("ds/b.bin")  # deleted in S3
    store.put("ds/d.bin", b"new object")  # something to fetch: the kill lands mid-run
    killed_run(options, store)

    final = DirSync(SyncOptions(store.bucket, "ds/", dest, delete=True), store, fetcher).run()
    assert final.complete
    assert "b.bin" in final.deleted
    assert not (dest / "b.bin").exists(), "a --delete sync left a file S3 deleted"


def test_delete_never_removes_a_file_outside_dest_through_a_symlink(tmp_path: Path) -> None:
    """A directory of DEST that is a symlink leads outside DEST: ``--delete`` keeps the file
    there (one warning), never removes it (review 13/16)."""
    store = MemoryStore()
    store.put("ds/sub/f.bin", b"synced")
    store.put("ds/keep.bin", b"stays")
    dest = tmp_path / "dest"
    assert DirSync(SyncOptions(store.bucket, "ds/", dest), store, fetcher).run().complete

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.bin").write_bytes(b"not the sync's: someone else's file")
    (dest / "sub" / "f.bin").unlink()
    (dest / "sub").rmdir()
    (dest / "sub").symlink_to(outside)  # e.g. a directory moved to a bigger disk

    store.delete("ds/sub/f.bin")
    DirSync(SyncOptions(store.bucket, "ds/", dest, delete=True), store, fetcher).run()
    assert (outside / "f.bin").exists(), "--delete removed a file outside DEST"


def test_sync_never_writes_outside_dest_through_a_symlink(tmp_path: Path, caplog: Any) -> None:
    """An object whose directory in DEST is a symlink leading out of DEST is refused (failed,
    one warning naming it): nothing is written there, nor recorded as present."""
    store = MemoryStore()
    store.put("ds/sub/f.bin", b"synced")
    dest = tmp_path / "dest"
    assert DirSync(SyncOptions(store.bucket, "ds/", dest), store, fetcher).run().complete
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub" / "f.bin").rename(outside / "f.bin")  # same size and mtime as synced
    (dest / "sub").rmdir()
    (dest / "sub").symlink_to(outside)
    store.put("ds/sub/new/g.bin", b"new object")

    result = DirSync(SyncOptions(store.bucket, "ds/", dest), store, fetcher).run()
    assert not result.complete
    assert set(result.failed) == {"ds/sub/f.bin", "ds/sub/new/g.bin"}
    assert sorted(p.name for p in outside.iterdir()) == ["f.bin"]
    refused = [r.getMessage() for r in caplog.records if "sync refused" in r.getMessage()]
    assert len(refused) == 2, refused
    # The file the sync wrote stays recorded (it is only out of reach), never forgotten.
    manifest = dirmanifest.load(dest)
    assert manifest is not None and "sub/f.bin" in manifest.objects


def test_a_dataset_with_no_objects_is_refused_as_prefetch_refuses_it(tmp_path: Path) -> None:
    """A prefix with no objects (a typo) is refused "holds no objects", dry run or not, as
    `prefetch` refuses it; never "complete and verified" (review 13/16). A shard that holds
    none of a dataset's objects is refused too (as prefetch), naming the shard."""
    store = MemoryStore()
    store.put("dataset-v3/a.bin", b"x")
    for dry_run in (False, True):
        typo = SyncOptions(store.bucket, "dataset-v3-typo/", tmp_path / "dest", dry_run=dry_run)
        with pytest.raises(ConfigError, match=r"^s3://.*/dataset-v3-typo/ holds no objects$"):
            DirSync(typo, store, fetcher).run()
    empty = next(Shard(i, 2) for i in range(2) if not Shard(i, 2).holds("dataset-v3/a.bin"))
    options = SyncOptions(store.bucket, "dataset-v3/", tmp_path / "shard", shard=empty)
    with pytest.raises(ConfigError, match=f"holds no objects in shard {empty}$"):
        DirSync(options, store, fetcher).run()
    assert not (tmp_path / "dest").exists() and not (tmp_path / "shard").exists()


def test_a_killed_shard_run_still_records_the_other_shards_files(tmp_path: Path) -> None:
    """Switching DEST to a shard, killed (-9) mid-run: the files of the other shards the
    last run wrote stay recorded (kept), so `--delete` and `evict` still know them."""
    store = MemoryStore()
    for i in range(8):
        store.put(f"ds/{i}.bin", bytes([i]) * 100)
    dest = tmp_path / "dest"
    assert DirSync(SyncOptions(store.bucket, "ds/", dest), store, fetcher).run().complete
    store.put("ds/new.bin", b"new object")  # something to fetch: the kill lands mid-run
    killed_run(SyncOptions(store.bucket, "ds/", dest, shard=Shard(0, 2)), store)
    manifest = dirmanifest.load(dest)
    assert manifest is not None
    assert {*manifest.objects, *manifest.kept} == {f"{i}.bin" for i in range(8)}

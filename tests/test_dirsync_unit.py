"""`datasets.dirsync` over the project's in-memory store: what a real server cannot be
made to do on cue (an object replaced or deleted between the listing and its GET)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from s3cachefs.datasets.dirfetch import ObjectFetcher, ThreadFetcher
from s3cachefs.datasets.dirresult import SyncOptions
from s3cachefs.datasets.dirsync import DirSync
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

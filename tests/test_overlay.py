"""Read-only overlays of a verified tree over a FUSE directory (`datasets.overlay`), driven
directly on real mounts: a shard served by the kernel, the rest of the dataset through FUSE.
The daemons here do not kernel-serve (``--no-kernel-serve-pinned``): the tests mount their
own overlays (the daemon's are tested in test_kernelshards.py).

"Served by the kernel" is shown by what the daemon did not see: its FUSE open
and read counters and the S3 server's GETs stay still while the tree's files
are read; the other files are read through FUSE, byte-exact.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.ledger import Ledger
from s3cachefs.datasets import binds, kernelopaque, kerneltrees, overlay
from s3cachefs.datasets.pins import Manifest, PinStore
from s3cachefs.store.types import Listing, ObjectInfo
from tests.conftest import Bucket, Mount, Mounter, drop_page_cache, read_at, status
from tests.test_prefetch import fill, prefetch


def fuse_reads(mount: Mount) -> tuple[int, int]:
    counts = status(mount)["fuse_requests"]
    return counts.get("open", 0), counts.get("read", 0)


def manifest_of(mount: Mount, bucket: Bucket, shard: str | None) -> Manifest:
    pins = PinStore(mount.cache_dir / "v1", bucket.name, Ledger(1 << 40))
    pins.load()
    [found] = [m for m in pins.manifests.values() if m.shard == shard and m.complete]
    return found


def build_tree(mount: Mount, manifests: list[Manifest], tree: Path, strip: str) -> set[str]:
    """A tree of hard links to the cache files of these manifests' objects, keys without
    ``strip``; returns the keys it holds. (The daemon's own layout is `KernelServe.layout`.)"""
    entries = []
    for manifest in manifests:
        for info in manifest.objects.values():
            oid = ObjectVersion(manifest.bucket, info.key, info.etag, info.size).oid
            source = mount.cache_dir / "v1" / "objects" / oid[:2] / oid[2:4] / oid
            assert source.stat().st_size == info.size  # complete in the cache
            entries.append(binds.TreeEntry(info.key[len(strip) :], source, info.size, 0))
    binds.build_tree(tree, entries)
    return {strip + e.rel for e in entries}


def walk(root: Path) -> dict[str, bytes]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


@pytest.fixture
def overlays_cleaned(tmp_path: Path) -> Iterator[None]:
    """At teardown, before the FUSE mounts go: our overlays a failed test left, topmost first."""
    yield
    for _ in range(4):
        left = [
            o
            for o in overlay.overlays()
            if o.source == overlay.SOURCE and o.mount_point.startswith(f"{tmp_path}/")
        ]
        for found in reversed(left):
            subprocess.run(["umount", "-l", found.mount_point], capture_output=True, check=False)


def test_a_shard_is_read_from_the_tree_and_the_rest_of_the_dataset_through_fuse(
    bucket: Bucket, mounter: Mounter, tmp_path: Path, overlays_cleaned: None
) -> None:
    files = fill(bucket, count=40)
    mount = mounter(bucket.name, "--min-free", "0", "--no-kernel-serve-pinned")
    keys = tmp_path / "keys"
    result = prefetch(mount, "dataset-v3", "--shard", "0/2", "--list-out", str(keys))
    assert result.returncode == 0, result.stderr
    shard = set(keys.read_text().split())
    assert 0 < len(shard) < len(files)
    tree = tmp_path / "cache" / "overlay-tree"  # on the cache's file system: hard links
    assert build_tree(mount, [manifest_of(mount, bucket, "0/2")], tree, "dataset-v3/") == shard
    target = mount.path / "dataset-v3"
    below = overlay.open_below(target)
    try:
        mount_id = overlay.mount(tree, below, target)
        top = binds.stack_at(target)[-1]
        assert (top.id, top.fstype) == (mount_id, "overlay")
        [ours] = overlay.leftovers(tmp_path / "cache", mount.path)
        assert ours.id == mount_id and ours.layers[0] == str(tree)

        # The merged listing shows every key of the dataset, byte-exact.
        assert walk(target) == {k.removeprefix("dataset-v3/"): v for k, v in files.items()}

        # Page cache dropped: the shard's files are read with no FUSE open or read, no GET.
        drop_page_cache()
        before, gets = fuse_reads(mount), len(bucket.server.gets())
        for key in sorted(shard):
            assert (mount.path / key).read_bytes() == files[key]
        assert fuse_reads(mount) == before
        assert len(bucket.server.gets()) == gets
        assert len({(mount.path / k).stat().st_dev for k in files}) == 1  # xino=auto

        # A file outside the shard: lazily, through FUSE.
        outside = sorted(set(files) - shard)[0]
        assert (mount.path / outside).read_bytes() == files[outside]
        assert fuse_reads(mount)[0] > before[0]

        # Read-only, and no copy-up: every write fails, nothing changes in the tree.
        for key in (sorted(shard)[0], outside):
            with pytest.raises(OSError) as caught:
                os.open(mount.path / key, os.O_RDWR)
            assert caught.value.errno == errno.EROFS
        with pytest.raises(OSError) as caught:
            (target / "new-file").write_bytes(b"x")
        assert caught.value.errno == errno.EROFS

        assert overlay.unmount(target, mount_id) == "unmounted"
        assert binds.stack_at(target) == []
    finally:
        os.close(below)


def test_a_new_tree_is_swapped_in_beneath_and_open_readers_keep_reading(
    bucket: Bucket, mounter: Mounter, tmp_path: Path, overlays_cleaned: None
) -> None:
    files = fill(bucket, count=30)
    mount = mounter(bucket.name, "--min-free", "0", "--no-kernel-serve-pinned")
    for shard in ("0/2", "1/2"):
        assert prefetch(mount, "dataset-v3", "--shard", shard).returncode == 0
    first = tmp_path / "cache" / "tree-1"
    second = tmp_path / "cache" / "tree-2"
    half = build_tree(mount, [manifest_of(mount, bucket, "0/2")], first, "dataset-v3/")
    both = [manifest_of(mount, bucket, s) for s in ("0/2", "1/2")]
    build_tree(mount, both, second, "dataset-v3/")
    target = mount.path / "dataset-v3"
    below = overlay.open_below(target)
    try:
        old = overlay.mount(first, below, target)
        inside = sorted(half)[0]
        outside = sorted(set(files) - half)[0]
        assert (mount.path / outside).read_bytes() == files[outside]  # looked up through FUSE
        with (mount.path / inside).open("rb") as reader:
            new, outcome = overlay.swap(second, below, target, old)
            assert outcome == "detached"  # busy: this reader holds a file of the old overlay
            assert reader.read() == files[inside]
        assert [(e.id, e.fstype) for e in binds.stack_at(target)] == [(new, "overlay")]

        # The name that went through FUSE in the old overlay comes from the new tree.
        drop_page_cache()
        before = fuse_reads(mount)
        assert walk(target) == {k.removeprefix("dataset-v3/"): v for k, v in files.items()}
        assert fuse_reads(mount) == before  # every file is in the second tree
        # A directory an overlay covers gives no handle on FUSE: the first one is kept.
        with pytest.raises(OSError):
            overlay.open_below(target)
        assert overlay.unmount(target, new) == "unmounted"
    finally:
        os.close(below)


def test_an_overlay_over_the_mount_root_and_what_kill_9_leaves(
    bucket: Bucket, mounter: Mounter, tmp_path: Path, overlays_cleaned: None
) -> None:
    files = fill(bucket, count=20)
    mount = mounter(f"{bucket.name}/dataset-v3", "--min-free", "0", "--no-kernel-serve-pinned")
    # The top-level directories as datasets of their own (`prefetch .`: test_kernelshards.py).
    for name in ("train", "val", "archive"):
        assert prefetch(mount, name).returncode == 0
    pins = PinStore(mount.cache_dir / "v1", bucket.name, Ledger(1 << 40))
    pins.load()
    tree = tmp_path / "cache" / "root-tree"
    build_tree(mount, list(pins.manifests.values()), tree, "dataset-v3/")
    below = overlay.open_below(mount.path)
    try:
        mount_id = overlay.mount(tree, below, mount.path)
        drop_page_cache()
        before = fuse_reads(mount)
        assert walk(mount.path) == {k.removeprefix("dataset-v3/"): v for k, v in files.items()}
        assert fuse_reads(mount) == before

        mount.kill9()
        mounter.mounts.remove(mount)  # reaped; the daemon started below cleans its mount
        # Tree files still read while FUSE's cached entries are valid, then ENOTCONN (the
        # merged lookups need the dead daemon); never other bytes.
        key = sorted(files)[0]
        assert read_at(mount.path / key.removeprefix("dataset-v3/"), 0, 10) in (
            files[key][:10],
            errno.ENOTCONN,
        )
        os.statvfs(mount.path)  # answered by the overlay: the stale-mount check cannot see it
        [left] = overlay.leftovers(tmp_path / "cache", mount.path)
        assert left.id == mount_id
        assert overlay.unmount(mount.path, mount_id) == "unmounted"  # by path: FUSE not crossed
        assert [e.fstype for e in binds.stack_at(mount.path)] == ["fuse.s3cachefs"]
    finally:
        os.close(below)
    again = mounter(f"{bucket.name}/dataset-v3", "--min-free", "0", name="mnt")
    assert walk(again.path) == {k.removeprefix("dataset-v3/"): v for k, v in files.items()}


def test_leftovers_are_only_our_overlays_with_our_trees(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (see README, Tests)")
    trees, low1, low2, target, other = (
        tmp_path / n for n in ("trees", "low1", "low2", "target", "other")
    )
    for path in (trees / "t1", low1, low2, target, other):
        path.mkdir(parents=True)
    (trees / "t1" / "a").write_bytes(b"tree")
    (low1 / "b").write_bytes(b"lower")
    below = overlay.open_below(target)
    try:
        ours = overlay.mount(trees / "t1", below, target)
        try:
            assert sorted(os.listdir(target)) == ["a"]  # the target was empty below
            subprocess.run(
                ["mount", "-t", "overlay", "theirs", "-o", f"ro,lowerdir={low1}:{low2}", other],
                check=True,
            )
            try:
                assert sorted(os.listdir(other)) == ["b"]
                assert [o.id for o in overlay.leftovers(trees, tmp_path)] == [ours]
                assert overlay.leftovers(tmp_path / "elsewhere", tmp_path) == []
            finally:
                subprocess.run(["umount", other], check=True)
        finally:
            assert overlay.unmount(target, ours) == "unmounted"
    finally:
        os.close(below)
    assert binds.mounts_below(tmp_path) == []


def test_opaque_directories_are_those_holding_every_name_the_fuse_view_lists(
    tmp_path: Path,
) -> None:
    def listed(*names: str) -> Listing:
        objects = [ObjectInfo(f"ds/{n}", 1, "e", 0) for n in names if not n.endswith("/")]
        return Listing(objects, [f"ds/{n}" for n in names if n.endswith("/")])

    files = ["a/1", "a/b/2", "c/3", "d/e/4", "f/g/5", "top"]
    listings: dict[str, Listing | None] = {
        "a": listed("1", "b/"),
        "a/b": listed("2"),
        "c": listed("3", "9"),  # a key the tree lacks (another shard's): merged
        "d": listed("e/"),
        "d/e": None,  # not answered from the pin store (S3 lists it): merged, and so is d
        "f": listed("g", "g/"),  # a key hidden by the directory of the same name
        "f/g": listed("5"),
        "h": listed(),  # a directory marker with nothing in it
    }
    opaque = kernelopaque.opaque_dirs(files, listings)
    assert opaque == {"a", "a/b", "f", "f/g", "h"}

    if os.geteuid() != 0:
        pytest.fail("this test needs root (see README, Tests)")
    tree = tmp_path / "tree"
    for rel in listings:
        (tree / rel).mkdir(parents=True, exist_ok=True)
    assert kernelopaque.marks(tree) == frozenset()
    assert kernelopaque.mark(tree, opaque) is None
    assert kernelopaque.marks(tree) == opaque


# A tree of three empty files whose two directories are marked (built from no cache file).
STAGE = """
import json, sys
from pathlib import Path
from s3cachefs.datasets import binds, kerneltrees
entries = [binds.TreeEntry(rel, None, 0, 0) for rel in ("a/1", "a/b/2", "top")]
layout = kerneltrees.Layout(entries, frozenset(), [None] * 3, frozenset(), frozenset({"a", "a/b"}))
tree = Path(sys.argv[1])
staged = kerneltrees.stage(tree, layout)
if staged.fresh:
    kerneltrees.promote(tree)
    assert kerneltrees.synced(tree) is None  # unsealed: not current for a later start
    kerneltrees.sync(tree.parent)
    kerneltrees.seal(tree, staged.record)
again = kerneltrees.stage(tree, layout)
print(json.dumps([staged.fresh, staged.record.why, again.fresh]))
"""


def stage(tree: Path, *wrapper: str) -> list[Any]:
    """Stage (and promote) the tree of `STAGE` in a child process run through ``wrapper``."""
    run = [*wrapper, sys.executable, "-c", STAGE, str(tree)]
    result = subprocess.run(run, capture_output=True, text=True, check=True)
    return list(json.loads(result.stdout))


def test_a_tree_records_its_marks_and_is_not_rebuilt_where_they_cannot_be_held(
    tmp_path: Path,
) -> None:
    """Review 13 L6/H1: the marks a tree was built with are recorded in its ``.synced``
    record, which a later start compares (no probe, no walk of the tree). A daemon that
    may not set trusted xattrs (no CAP_SYS_ADMIN: EPERM) records that the tree holds no
    marks: it counts as current, never rebuilt in a loop. A record the daemon cannot read
    (a directory in its place) makes the tree not current, without raising."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (see README, Tests)")
    marked = tmp_path / "marked" / "id"
    assert stage(marked) == [True, "", False]
    assert kerneltrees.synced(marked) == kerneltrees.Synced(frozenset({"a", "a/b"}))
    assert kernelopaque.marks(marked) == frozenset({"a", "a/b"})

    unmarked = tmp_path / "unmarked" / "id"
    no_admin = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]
    fresh, why, again = stage(unmarked, *no_admin)
    assert (fresh, again) == (True, False) and "Operation not permitted" in why
    assert kerneltrees.synced(unmarked) == kerneltrees.Synced(None, why)
    assert kernelopaque.marks(unmarked) == frozenset()
    assert stage(unmarked) == [False, why, False]  # with the right: still current

    kerneltrees.synced_path(marked).write_bytes(b"")  # as written before marks were recorded
    assert stage(marked) == [True, "", False]  # built again, once
    synced = kerneltrees.synced_path(marked)
    synced.unlink()
    synced.mkdir()  # unreadable as a record: not current, and no exception
    entries = [binds.TreeEntry(rel, None, 0, 0) for rel in ("a/1", "a/b/2", "top")]
    layout = kerneltrees.Layout(entries, frozenset(), [None] * 3, frozenset(), frozenset())
    assert kerneltrees.current(marked, layout) is None

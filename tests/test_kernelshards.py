"""Kernel serving by overlays (issue 13): a shard, shards merged, a dataset at the mount root.

Real mounts, real S3 server. "Served by the kernel" is what the daemon and S3
did not see: FUSE open/read counters and the server's request log stay still
while the tree's files are read; every other file of the dataset is listed
from the shard's manifest and read lazily through FUSE.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Any

from s3cachefs.datasets import binds, kernelopaque, overlay
from s3cachefs.datasets.pins import Shard
from tests.conftest import Bucket, Mounter, drop_page_cache, read_at, run_cli, status
from tests.test_kernelserve import fuse_reads, ino, wait_for
from tests.test_prefetch import fill, prefetch


def shard_status(mount: Any, shard: str | None) -> dict[str, Any]:
    [found] = [d for d in status(mount)["datasets"] if d["shard"] == shard]
    return dict(found)


def listing(root: Path) -> dict[str, int]:
    """``ls -lR``: every file below ``root`` and its size (a stat each)."""
    found = {}
    for dirpath, _, names in os.walk(root, onerror=_raise):
        for name in names:
            path = Path(dirpath) / name
            found[path.relative_to(root).as_posix()] = path.stat().st_size
    return found


def _raise(exc: OSError) -> None:
    raise exc


def open_errno(path: Path, flags: int) -> int:
    try:
        os.close(os.open(path, flags, 0o644))
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_a_shard_is_kernel_served_and_the_rest_of_the_dataset_listed_and_read_lazily(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    files = fill(bucket, count=40)
    mount = mounter(bucket.name, "--min-free", "0")
    keys = tmp_path / "keys"
    result = prefetch(mount, "dataset-v3", "--shard", "0/2", "--list-out", str(keys))
    assert result.returncode == 0, result.stderr
    shard = set(keys.read_text().split())
    assert 0 < len(shard) < len(files)
    wait_for(lambda: shard_status(mount, "0/2")["kernel_served"], "the shard's overlay")
    info = shard_status(mount, "0/2")
    target = mount.path / "dataset-v3"
    assert info["kernel_mount"] == "overlay" and info["bind"] == str(target)
    assert binds.stack_at(target)[-1].fstype == "overlay"

    # ls -lR shows every key of the dataset; no S3 request, none while the shard is read.
    drop_page_cache()
    bucket.server.reset()
    before = fuse_reads(mount)
    expected = {k.removeprefix("dataset-v3/"): len(v) for k, v in files.items()}
    assert listing(target) == expected
    for key in sorted(shard):
        assert (mount.path / key).read_bytes() == files[key]
    assert fuse_reads(mount) == before  # not one open or read reached the daemon
    assert sum(bucket.server.counts().values()) == 0, bucket.server.counts()
    tree = Path(info["tree"])
    key = sorted(shard)[0]
    assert ino(mount.path / key) == (tree / key.removeprefix("dataset-v3/")).stat().st_ino

    # A file of another shard: stat from the manifest, bytes lazily through FUSE.
    outside = sorted(set(files) - shard)[0]
    assert (mount.path / outside).stat().st_size == len(files[outside])
    assert sum(bucket.server.counts().values()) == 0
    assert (mount.path / outside).read_bytes() == files[outside]
    assert fuse_reads(mount)[0] > before[0]
    assert bucket.server.gets(outside)  # fetched on demand

    # Read-only through the overlay: no write reaches either layer.
    for name in (key, outside, "dataset-v3/new-file"):
        assert open_errno(mount.path / name, os.O_RDWR | os.O_CREAT) == errno.EROFS

    # The other shard: one tree of both, swapped in; every file kernel-served.
    assert prefetch(mount, "dataset-v3", "--shard", "1/2").returncode == 0
    wait_for(lambda: shard_status(mount, "1/2")["kernel_served"], "the merged tree")
    both = {d["tree"] for d in status(mount)["datasets"]}
    assert both == {str(tree)}  # the shards share one tree
    drop_page_cache()
    bucket.server.reset()
    before = fuse_reads(mount)
    for key, body in files.items():
        assert (mount.path / key).read_bytes() == body
    assert fuse_reads(mount) == before
    assert sum(bucket.server.counts().values()) == 0
    assert len(binds.stack_at(target)) == 1  # the old overlay is gone


def test_a_shard_marks_only_its_complete_directories_and_a_new_key_unmarks_one(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Opaque marks (`datasets.kernelopaque`) on a shard's tree: only a directory whose
    every key is the shard's. A key S3 gains there in another shard is listed by the
    shard's next prefetch: its directory is unmarked (a new tree), and the key shows
    through the overlay and reads lazily through FUSE."""
    shard = Shard(0, 2)
    files = fill(bucket, count=30)
    solo = {k: b"solo" * 300 for k in (f"dataset-v3/solo/f-{i}" for i in range(40))}
    solo = {k: v for k, v in solo.items() if shard.holds(k)}
    bucket.put_many(solo)
    files.update(solo)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3", "--shard", "0/2").returncode == 0
    wait_for(lambda: shard_status(mount, "0/2")["kernel_served"], "the shard's overlay")
    tree = Path(shard_status(mount, "0/2")["tree"])
    complete = {
        d
        for d in ("train", "val", "archive", "solo")
        if all(shard.holds(k) for k in files if k.startswith(f"dataset-v3/{d}/"))
    }
    assert "solo" in complete and "train" not in complete
    assert kernelopaque.marks(tree) == frozenset(complete)
    target = mount.path / "dataset-v3"
    expected = {k.removeprefix("dataset-v3/"): len(v) for k, v in files.items()}
    assert listing(target) == expected

    new = next(
        f"dataset-v3/solo/g-{i}" for i in range(100) if not shard.holds(f"dataset-v3/solo/g-{i}")
    )
    bucket.put(new, b"the other shard's" * 100)
    assert prefetch(mount, "dataset-v3", "--shard", "0/2").returncode == 0
    wait_for((mount.path / new).exists, "the new key")
    expected[new.removeprefix("dataset-v3/")] = len(b"the other shard's" * 100)
    assert listing(target) == expected
    assert (mount.path / new).read_bytes() == b"the other shard's" * 100  # through FUSE
    swapped = Path(shard_status(mount, "0/2")["tree"])
    assert kernelopaque.marks(swapped) == frozenset(complete - {"solo"})


def test_a_changed_object_in_s3_is_never_mixed_in(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket, count=30)
    mount = mounter(bucket.name, "--min-free", "0", "--metadata-ttl", "1")
    assert prefetch(mount, "dataset-v3", "--shard", "0/2").returncode == 0
    wait_for(lambda: shard_status(mount, "0/2")["kernel_served"], "the shard's overlay")
    manifest_keys = {k for k in files if (mount.path / k).exists()}
    assert manifest_keys == set(files)
    tree = Path(shard_status(mount, "0/2")["tree"])
    inside = {
        f"dataset-v3/{p.relative_to(tree).as_posix()}" for p in tree.rglob("*") if p.is_file()
    }
    outside = sorted(set(files) - inside)[0]
    for key in (sorted(inside)[0], outside):
        bucket.put(key, b"a new version " * 100)
    drop_page_cache()
    # The shard's file: the pinned version. The other: its listed version, or ESTALE (S3
    # refused that version); never bytes of the new one mixed in.
    key = sorted(inside)[0]
    assert (mount.path / key).read_bytes() == files[key]
    got = read_at(mount.path / outside, 0, len(files[outside]))
    assert got in (files[outside], errno.ESTALE), got


def test_a_dataset_at_the_mount_root_is_kernel_served_and_survives_kill_9(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=20)
    whole = mounter(bucket.name, "--min-free", "0", name="whole")
    refused = prefetch(whole, str(whole.path))
    assert refused.returncode != 0
    assert "the whole bucket is no dataset" in refused.stderr
    assert whole.stop() == 0

    mount = mounter(f"{bucket.name}/dataset-v3", "--min-free", "0", cache_dir=whole.cache_dir)
    result = prefetch(mount, str(mount.path))  # `prefetch .` from inside the mount, too
    assert result.returncode == 0, result.stderr
    wait_for(lambda: shard_status(mount, None)["kernel_served"], "the root overlay")
    assert shard_status(mount, None)["dataset"] == "."
    assert binds.stack_at(mount.path)[-1].fstype == "overlay"
    drop_page_cache()
    bucket.server.reset()
    before = fuse_reads(mount)
    expected = {k.removeprefix("dataset-v3/"): v for k, v in files.items()}
    for rel, body in expected.items():
        assert (mount.path / rel).read_bytes() == body
    assert fuse_reads(mount) == before
    assert sum(bucket.server.counts().values()) == 0

    mount.kill9()  # the overlay on the mountpoint stays, over a dead FUSE mount
    mounter.mounts.remove(mount)
    ours = [  # this test's: other tests may run on the machine meanwhile
        o.mount_point
        for o in overlay.overlays()
        if o.source == overlay.SOURCE and o.mount_point.startswith(f"{mount.path.parent}/")
    ]
    assert ours == [str(mount.path)]
    again = mounter(
        f"{bucket.name}/dataset-v3", "--min-free", "0", name="mnt", cache_dir=whole.cache_dir
    )
    log = again.log_text()
    assert "1 overlays of a dead daemon left on it; unmounting them" in log
    assert "stale mount" in log and "Traceback" not in log
    wait_for(lambda: shard_status(again, None)["kernel_served"], "the root overlay again")
    assert [e.fstype for e in binds.mounts_below(again.path)] == ["fuse.s3cachefs", "overlay"]
    for rel, body in expected.items():
        assert (again.path / rel).read_bytes() == body
    assert run_cli("unmount", str(again.path)).returncode == 0
    assert binds.mounts_below(again.path) == []


def test_unmount_after_kill_9_with_a_mount_root_overlay(bucket: Bucket, mounter: Mounter) -> None:
    """After kill -9 of a daemon whose dataset at the mount root was kernel-served, our
    overlay stays on the mountpoint and answers statvfs from its tree layer: `unmount`
    must still see the stale mount under it and remove both (review 13/16)."""
    fill(bucket, count=6)
    mount = mounter(f"{bucket.name}/dataset-v3", "--min-free", "0")
    assert prefetch(mount, str(mount.path)).returncode == 0
    wait_for(lambda: shard_status(mount, None)["kernel_served"], "the root overlay")
    mount.kill9()
    mounter.mounts.remove(mount)
    try:
        result = run_cli("unmount", str(mount.path))
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert result.stdout == (
            f"cleaned stale mount {mount.path} and the 1 kernel-serve overlays its daemon"
            " left on it\n"
        )
        assert binds.mounts_below(mount.path) == []  # the overlay and the FUSE mount
    finally:
        for _ in range(4):  # the overlay, then the dead FUSE mount under it
            subprocess.run(["umount", "-l", str(mount.path)], check=False, capture_output=True)


def handles_on(pid: int, mount_id: int) -> int:
    """How many files process ``pid`` holds open on mount ``mount_id`` (O_PATH too)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:  # closed meanwhile
            continue
        count += f"mnt_id:\t{mount_id}" in info.splitlines()
    return count


def test_a_failed_overlay_mount_leaves_no_handle_on_the_fuse_mount(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    """The O_PATH handle on the FUSE directory taken for an overlay is closed when the
    overlay mount fails (review 13/16): left open, it keeps the FUSE mount busy and
    `s3cachefs unmount` (not lazy) fails. It fails here because the cache dir lies on an
    overlay of an overlay (a container's disk in a container): one more overlay is past
    the kernel's stacking depth."""
    layers = tmp_path / "layers"
    for name in ("l1", "u1", "w1", "a", "u2", "w2", "b"):
        (layers / name).mkdir(parents=True)
    stacked = [
        (f"lowerdir={layers}/l1,upperdir={layers}/u1,workdir={layers}/w1", layers / "a"),
        (f"lowerdir={layers}/a,upperdir={layers}/u2,workdir={layers}/w2", layers / "b"),
    ]
    for options, where in stacked:
        subprocess.run(["mount", "-t", "overlay", "-o", options, "none", str(where)], check=True)
    try:
        fill(bucket, count=6)
        mount = mounter(bucket.name, "--min-free", "0", cache_dir=layers / "b" / "cache")
        assert prefetch(mount, "dataset-v3").returncode == 0
        wait_for(
            lambda: "mount failed" in (shard_status(mount, None)["kernel_note"] or ""),
            "the overlay mount to fail",
        )
        assert "fsconfig None: Invalid argument" in mount.log_text()  # the overlay refused
        [fuse] = binds.stack_at(mount.path)
        assert handles_on(mount.proc.pid, fuse.id) == 0
        result = run_cli("unmount", str(mount.path))
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert binds.mounts_below(mount.path) == []
        assert mount.proc.wait(timeout=30) == 0
    finally:
        for started in mounter.mounts:
            started.stop()  # before the cache dir's file system goes
        for _, where in reversed(stacked):
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def test_an_overlay_covered_at_evict_leaves_no_handle_on_the_fuse_mount(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Evict finds another mount on top of the dataset's overlay and leaves the overlay
    alone; the daemon's handle on the FUSE directory still goes (review 13/16). Once
    the admin removed both mounts, `s3cachefs unmount` (not lazy) succeeds."""
    fill(bucket, count=6)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    wait_for(lambda: shard_status(mount, None)["kernel_served"], "the overlay")
    target = mount.path / "dataset-v3"
    [fuse] = binds.stack_at(mount.path)
    assert handles_on(mount.proc.pid, fuse.id) == 1  # the overlay's handle: what is counted
    subprocess.run(["mount", "-t", "tmpfs", "cover", str(target)], check=True)
    try:
        assert run_cli("evict", "dataset-v3", "--mount", str(mount.path)).returncode == 0
        assert "has another mount on top; left alone" in mount.log_text()
        assert handles_on(mount.proc.pid, fuse.id) == 0
    finally:
        for _ in ("tmpfs", "overlay"):
            subprocess.run(["umount", str(target)], check=False, capture_output=True)
    result = run_cli("unmount", str(mount.path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert binds.mounts_below(mount.path) == []


def test_without_overlays_only_whole_datasets_below_the_root_are_bound() -> None:
    """The fallback on kernels without overlays: a bind replaces the directory, so a shard
    (it would hide the rest of the dataset) and the mount root stay on FUSE."""
    from s3cachefs.datasets.kernelpolicy import refusal
    from s3cachefs.datasets.pins import Manifest

    def why(manifest: Manifest, *others: Manifest, overlays: bool) -> str | None:
        return refusal(
            manifest, [manifest, *others], enabled=True, bucket="b", mount_prefix="pre/",
            damage=None, overlays=overlays,
        )  # fmt: skip

    whole = Manifest("b", "pre/ds/", None, complete=True)
    shard = Manifest("b", "pre/ds/", "0/2", complete=True)
    root = Manifest("b", "pre/", None, complete=True)
    for manifest in (whole, shard, root):
        assert why(manifest, overlays=True) is None
    assert why(whole, overlays=False) is None
    assert "a shard is part of a dataset" in (why(shard, overlays=False) or "")
    assert "the dataset is the mount root" in (why(root, overlays=False) or "")
    inner = Manifest("b", "pre/ds/x/", "0/2", complete=True)
    assert "nested with dataset" in (why(whole, inner, overlays=True) or "")
    assert why(whole, inner, overlays=False) is None  # a shard is never bound: no nesting


def test_a_new_manifest_makes_the_kernel_forget_only_the_names_that_changed(
    tmp_path: Path,
) -> None:
    """A kernel-serve overlay holds the FUSE entries below it as its lower layer: an entry
    forgotten needlessly is ESTALE through the overlay. So a re-prefetch forgets only names
    whose inode changes; an evict still forgets them all (test_versions.py)."""
    import trio

    from s3cachefs.datasets.pins import Manifest, PinStore
    from s3cachefs.fs.core import FsCore
    from s3cachefs.store.types import ObjectInfo
    from s3cachefs.testing.memorystore import MemoryStore
    from tests.test_blockcache import make_cache, run_with
    from tests.test_versions import TTL, Clock, lookup

    store = MemoryStore()
    etags = {k: store.put(f"ds/{k}", k.encode() * 10) for k in ("a.bin", "b.bin")}
    cache = make_cache(tmp_path, store)
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()

    def pin(changed: str | None) -> None:
        manifest = Manifest(store.bucket, "ds/", None, complete=True)
        for key, etag in etags.items():
            size = 20 if key == changed else 10 * len(key)
            manifest.objects[f"ds/{key}"] = ObjectInfo(
                f"ds/{key}", size, etag + (key == changed) * "x", 1
            )
        manifest.dirs.add("ds/sub/")
        pins.save(manifest)

    pin(None)
    core = FsCore(
        store, cache, prefix="", metadata_ttl=TTL, s3_limiter=trio.CapacityLimiter(8),
        pins=pins, clock=Clock(),
    )  # fmt: skip
    invalidated: list[Any] = []
    core.on_invalidate(invalidated.extend)

    async def body() -> None:
        ds = await lookup(core, "ds")
        first = {n: await core.lookup(ds.ino, n) for n in ("a.bin", "b.bin", "sub")}
        pin("b.bin")  # a re-prefetch: b.bin changed, a.bin and sub/ did not
        core.pins_changed()
        assert invalidated == [(ds.ino, "b.bin")]
        again = {n: await core.lookup(ds.ino, n) for n in ("a.bin", "b.bin", "sub")}
        for name in ("a.bin", "sub"):
            assert again[name] is first[name]  # the same inode: the kernel's entry stays good
        assert again["b.bin"] is not first["b.bin"]

    run_with(cache, body)


def test_a_damaged_shard_leaves_the_tree_and_the_other_shard_is_mounted_again(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    from tests.test_kernelserve import flip_byte

    files = fill(bucket, count=30)
    mount = mounter(bucket.name, "--min-free", "0", "--verify-interval", "1")
    keys = tmp_path / "keys"
    assert prefetch(mount, "dataset-v3", "--shard", "0/2", "--list-out", str(keys)).returncode == 0
    assert prefetch(mount, "dataset-v3", "--shard", "1/2").returncode == 0
    wait_for(lambda: all(shard_status(mount, s)["kernel_served"] for s in ("0/2", "1/2")), "both")
    tree = Path(shard_status(mount, "0/2")["tree"])
    victim = sorted(k for k in keys.read_text().split() if len(files[k]) > 10)[0]
    flip_byte(tree / victim.removeprefix("dataset-v3/"), 5)
    wait_for(lambda: not shard_status(mount, "0/2")["kernel_served"], "the check to unmount")
    assert shard_status(mount, "0/2")["kernel_check"]["damaged"] == [victim]
    wait_for(lambda: shard_status(mount, "1/2")["kernel_served"], "the other shard again")
    drop_page_cache()
    for key, body in files.items():  # the damaged file through FUSE (fetched again)
        assert (mount.path / key).read_bytes() == body
    assert status(mount)["cache"]["corrupt_blocks"] >= 1

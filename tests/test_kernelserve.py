"""Kernel-served pinned datasets: a read-only bind of a tree of hard links over the dataset.

Real mounts, real S3 server. "Served by the kernel" is shown by what the
daemon did not see: its FUSE open and read counters stay still while a reader
reads the whole dataset, and /proc/self/mountinfo shows the bind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.datasets import kernelopaque, kerneltrees, overlay
from s3cachefs.datasets.binds import MountEntry, mountinfo, mounts_below, stack_at
from tests.conftest import Bucket, Mount, Mounter, drop_page_cache, mount_cli, run_cli, status
from tests.test_prefetch import MIB, check_tree, fill, prefetch


def dataset(mount: Mount, name: str = "dataset-v3") -> dict[str, Any]:
    [found] = [d for d in status(mount)["datasets"] if d["dataset"] == name]
    return dict(found)


def fuse_reads(mount: Mount) -> tuple[int, int]:
    counts = status(mount)["fuse_requests"]
    return counts.get("open", 0), counts.get("read", 0)


def bind_on(path: Path) -> MountEntry | None:
    """The visible mount on ``path`` if it is a kernel-serve tree's: our overlay whose top
    layer is the tree (or, on a kernel without overlays, a bind of the tree)."""
    stack = stack_at(path)
    if not stack:
        return None
    top = stack[-1]
    layers = {o.id: o.layers for o in overlay.overlays() if o.source == overlay.SOURCE}
    if top.id in layers:
        return top if "/v1/trees/" in layers[top.id][0] else None
    return top if "/v1/trees/" in top.root else None


def ino(path: Path) -> int:
    """The inode number of the file ``path`` leads to, on its own file system: through an
    overlay (xino=auto) the top bits carry the layer (README, "Kernel-served")."""
    return path.stat().st_ino % (1 << 62)


def tree_of(entry: MountEntry) -> str:
    """The tree a kernel-serve mount serves (an overlay's top layer, or a bind's root)."""
    found = [o.layers[0] for o in overlay.overlays() if o.id == entry.id]
    return found[0] if found else entry.root


def wait_bound(mount: Mount, name: str = "dataset-v3", timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = dataset(mount, name)
        if found["kernel_served"] or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def kernel_served(bucket: Bucket, mounter: Mounter) -> tuple[dict[str, bytes], Mount, Path]:
    """A filled bucket, mounted, with dataset-v3 prefetched: its files, the mount, its tree."""
    files = fill(bucket)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    return files, mount, Path(dataset(mount)["tree"])


def test_prefetched_dataset_is_read_by_the_kernel_not_the_daemon(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=30)
    mount = mounter(bucket.name, "--min-free", "0")
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    target = mount.path / "dataset-v3"
    entry = bind_on(target)
    assert entry is not None, mountinfo()
    info = dataset(mount)
    assert info["kernel_served"] and info["bind"] == str(target)
    tree = Path(info["tree"])
    assert tree == mount.cache_dir / "v1" / "trees" / tree.name
    assert tree_of(entry).endswith(f"/v1/trees/{tree.name}")
    assert info["kernel_mount"] == entry.fstype == "overlay"
    modes = [p.stat().st_mode & 0o777 for p in (tree, tree.parent, mount.cache_dir)]
    assert modes == [0o755, 0o700, 0o700]  # the tree is reachable only through the bind
    before = fuse_reads(mount)
    bucket.server.reset()
    drop_page_cache()
    check_tree(mount, files)
    assert fuse_reads(mount) == before  # not one open or read reached the daemon
    assert bucket.server.counts()["get"] == 0
    big = target / "archive" / "big.tar"
    assert big.stat().st_mode & 0o777 == 0o444
    assert ino(big) == (tree / "archive" / "big.tar").stat().st_ino
    with pytest.raises(OSError, match="Read-only"):
        (target / "new.txt").write_bytes(b"x")
    human = run_cli("status", str(mount.path)).stdout
    assert f"kernel-served (overlay on {target})" in human


def fuse_counts(mount: Mount) -> dict[str, int]:
    return dict(status(mount)["fuse_requests"])


def walk_stat(root: Path) -> dict[str, int]:
    """W4: ``os.walk`` and a ``stat`` of every entry; each file's size."""
    found = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            st = os.stat(os.path.join(dirpath, name))
            if name in names:
                found[os.path.relpath(os.path.join(dirpath, name), root)] = st.st_size
    return found


def test_a_walk_of_a_kernel_served_dataset_asks_fuse_only_about_its_own_directory(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Issue 13's overlay merged every directory of the tree with the FUSE directory, so a
    walk with the page cache dropped asked the daemon about each one (W4 fell to 0.44x).
    The tree's directories hold every name the FUSE view lists: marked opaque, the
    overlay never asks FUSE about them."""
    files = fill(bucket, count=30)
    deep = {"dataset-v3/train/deep/er/page.png": b"deep" * 1000}
    bucket.put_many(deep)
    files.update(deep)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    wait_for(lambda: dataset(mount)["kernel_served"], "the dataset's overlay")
    target = mount.path / "dataset-v3"
    drop_page_cache()
    bucket.server.reset()
    before = fuse_counts(mount)
    assert walk_stat(target) == {k.removeprefix("dataset-v3/"): len(v) for k, v in files.items()}
    after = fuse_counts(mount)
    asked = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
    # Only the dataset's own directory is merged (overlayfs ignores a mark on a layer's root).
    assert asked.get("opendir", 0) <= 1 and asked.get("lookup", 0) == 0, asked
    assert sum(bucket.server.counts().values()) == 0
    tree = Path(dataset(mount)["tree"])
    dirs = {"train", "val", "archive", "train/deep", "train/deep/er"}
    assert kernelopaque.marks(tree) == frozenset(dirs)
    assert dataset(mount)["opaque_dirs"] == len(dirs)  # status --json shows the marks


def rebuild_failed(mount: Mount) -> bool:
    """The daemon logged a failed mount (or build) of a dataset's tree."""
    return any(
        "kernel-serve dataset=" in line and " failed: " in line
        for line in mount.log_text().splitlines()
    )


def test_a_tree_that_cannot_be_rebuilt_at_start_leaves_the_dataset_to_fuse(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Review 13 H1: a tree synced before its marks were recorded (the first start after
    an upgrade) on a cache whose trees/ cannot be written (EROFS, ENOSPC; here immutable:
    EPERM) raised out of the check that the tree is current and took the whole mount down,
    at every start. It is not current: its rebuild fails like any failed mount, the FUSE
    view serves the dataset, and status says why."""
    files, mount, tree = kernel_served(bucket, mounter)
    assert mount.stop() == 0
    for rel in kernelopaque.marks(tree) or ():  # as built before the marks
        os.removexattr(tree / rel, kernelopaque.OPAQUE)
    kerneltrees.synced_path(tree).write_bytes(b"")  # as recorded before the marks
    subprocess.run(["chattr", "+i", str(tree.parent)], check=True)
    try:
        again = mounter(bucket.name, "--min-free", "0", name="mnt")
        wait_for(lambda: rebuild_failed(again), "the rebuild to fail")
        found = dataset(again)
        assert not found["kernel_served"] and "mount failed" in found["kernel_note"]
        check_tree(again, files)  # through FUSE
        assert again.proc.poll() is None
    finally:
        subprocess.run(["chattr", "-i", str(tree.parent)], check=True)


def test_a_failed_rebuild_leaves_no_marked_tree_hiding_a_new_key(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Review 13 M1: a re-prefetch found a new key in a directory the mounted tree marks
    opaque, and the rebuild failed: the old overlay stayed, hiding the key the FUSE view
    lists, and status said all was well. Now the dataset is unmounted (the FUSE view
    answers) and status shows the failure."""
    _, mount, tree = kernel_served(bucket, mounter)
    assert "train" in (kernelopaque.marks(tree) or ())
    new = "dataset-v3/train/new-key"
    bucket.put(new, b"new" * 100)
    kerneltrees.next_path(tree).write_bytes(b"")  # staging fails: not a directory
    assert prefetch(mount, "dataset-v3").returncode == 0
    wait_for(lambda: rebuild_failed(mount), "the rebuild to fail")
    assert "new-key" in os.listdir(mount.path / "dataset-v3" / "train")
    assert (mount.path / new).read_bytes() == b"new" * 100
    found = dataset(mount)
    assert not found["kernel_served"] and "mount failed" in found["kernel_note"]
    assert bind_on(mount.path / "dataset-v3") is None


def test_rebuild_swaps_atomically_and_open_readers_keep_old_bytes(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=30)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    old_files = dict(files)
    old_tree = Path(dataset(mount)["tree"])
    changed = sorted(files)[0]
    held = (mount.path / changed).open("rb")  # through the bind: the old inode
    files[changed] = b"new content " * 1000
    bucket.put(changed, files[changed])
    files["dataset-v3/val/new.png"] = b"brand new"
    bucket.put("dataset-v3/val/new.png", files["dataset-v3/val/new.png"])
    before = fuse_reads(mount)

    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # a reader walking the dataset all through the swap
        while not stop.is_set():
            listing = {
                str(Path(d, n).relative_to(mount.path))
                for d, _, names in os.walk(mount.path / "dataset-v3")
                for n in names
            }
            if listing == set(old_files):
                seen.append("old")
            elif listing == set(files):
                seen.append("new")
            else:
                seen.append(f"MIXED {sorted(listing ^ set(files))[:3]}")
            body = (mount.path / changed).read_bytes()
            if body not in (old_files[changed], files[changed]):
                seen.append("WRONG BYTES")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = prefetch(mount, "dataset-v3")
        time.sleep(0.3)
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert not [s for s in seen if s not in ("old", "new")], seen
    assert seen[-1] == "new"
    check_tree(mount, files)
    assert held.read() == old_files[changed]  # the old inode outlives its tree
    held.close()
    assert fuse_reads(mount) == before
    info = dataset(mount)
    assert info["kernel_served"] and Path(info["tree"]) == old_tree  # same place, new tree
    assert len(stack_at(mount.path / "dataset-v3")) == 1  # the old bind is gone
    assert "(swapped)" in mount.log_text()
    assert not list(old_tree.parent.glob("*.next"))
    # The replaced tree is set aside whole (a reader may still walk the old mount), and
    # goes at the next swap or at unmount.
    assert [p.name for p in old_tree.parent.glob("*.old")] == [f"{old_tree.name}.old"]
    assert mount.stop() == 0
    again = mounter(bucket.name, "--min-free", "0", name="mnt2", cache_dir=mount.cache_dir)
    assert wait_bound(again)["kernel_served"]
    assert not list(old_tree.parent.glob("*.old"))


def test_evict_unbinds_before_freeing_and_fuse_serves_again(
    bucket: Bucket, mounter: Mounter
) -> None:
    files, mount, tree = kernel_served(bucket, mounter)
    reader = (mount.path / "dataset-v3" / "archive" / "big.tar").open("rb")
    assert run_cli("evict", "dataset-v3", "--mount", str(mount.path)).returncode == 0
    assert bind_on(mount.path / "dataset-v3") is None
    assert not tree.exists()
    assert reader.read() == files["dataset-v3/archive/big.tar"]  # busy: detached lazily
    reader.close()
    log = mount.log_text()
    assert log.index("kernel-serve unbound") < log.index("evict dataset=")
    assert status(mount)["datasets"] == []
    before = fuse_reads(mount)
    check_tree(mount, files)  # the FUSE path, from S3 again
    assert fuse_reads(mount)[1] > before[1]


def test_sigterm_unbinds_then_restart_rebinds_and_kill9_leaks_nothing(
    bucket: Bucket, mounter: Mounter
) -> None:
    files, mount, tree = kernel_served(bucket, mounter)
    inode = tree.stat().st_ino  # a rebuilt tree is a new directory (its files are the same)
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(timeout=30) == 0
    assert mounts_below(mount.path) == []
    assert "kernel-serve unbound" in mount.log_text()

    again = mounter(bucket.name, "--min-free", "0", name="mnt")  # same mountpoint
    assert wait_bound(again)["kernel_served"]
    assert tree.stat().st_ino == inode  # the tree matched: reused, not rebuilt
    assert not kerneltrees.old_path(tree).exists()  # a rebuild sets the old tree aside
    check_tree(again, files)

    again.kill9()  # the stale FUSE mount keeps the bind stacked on it
    assert len(mounts_below(again.path)) == 2
    third = mounter(bucket.name, "--min-free", "0", name="mnt")
    assert "stale mount" in third.log_text()
    assert wait_bound(third)["kernel_served"]
    assert len(mounts_below(third.path)) == 2  # one FUSE mount, one bind: nothing leaked
    bucket.server.reset()
    before = fuse_reads(third)
    check_tree(third, files)
    assert fuse_reads(third) == before and bucket.server.counts()["get"] == 0


def test_a_tree_is_sealed_after_its_mount_and_an_unsealed_one_is_built_again(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Issue 12: a prefetch's reply no longer waits for the ``syncfs`` of its tree (the
    flush of everything it wrote): the tree is mounted first, then synced and sealed (its
    ``.synced`` record). A daemon killed before the seal leaves a tree with no record: the
    next start builds it again from the checked cache files and serves the same bytes."""
    files, mount, tree = kernel_served(bucket, mounter)
    assert not kerneltrees.pre_path(tree).exists()  # linked while it downloaded, then used
    wait_for(lambda: kerneltrees.synced(tree) is not None, "the tree's record")
    inode = tree.stat().st_ino
    mount.kill9()
    kerneltrees.synced_path(tree).unlink()  # as a kill before the seal leaves it
    again = mounter(bucket.name, "--min-free", "0", name="mnt")  # same mountpoint
    assert wait_bound(again)["kernel_served"]
    assert tree.stat().st_ino != inode  # built again, not trusted
    check_tree(again, files)
    wait_for(lambda: kerneltrees.synced(tree) is not None, "the rebuilt tree's record")


def test_a_tree_that_no_longer_matches_is_rebuilt_at_start(
    bucket: Bucket, mounter: Mounter
) -> None:
    files, mount, tree = kernel_served(bucket, mounter)
    assert mount.stop() == 0
    victim = tree / "archive" / "big.tar"
    victim.unlink()
    victim.write_bytes(b"not a link to the cache file")
    os.chmod(victim, 0o444)
    again = mounter(bucket.name, "--min-free", "0", name="mnt2")
    assert wait_bound(again)["kernel_served"]
    check_tree(again, files)
    assert victim.stat().st_nlink == 2  # a link to the cache file again


def test_verify_repairs_a_kernel_served_file_through_a_new_inode(
    bucket: Bucket, mounter: Mounter
) -> None:
    files, mount, tree = kernel_served(bucket, mounter)
    served = mount.path / "dataset-v3" / "archive" / "big.tar"
    old_inode = ino(served)
    objects = [p for p in (mount.cache_dir / "v1" / "objects").rglob("*") if p.is_file()]
    [victim] = [p for p in objects if p.stat().st_ino == old_inode]
    with victim.open("r+b") as f:  # the same inode the bind serves
        f.seek(2 * 1024 * 1024 + 3)
        f.write(b"\x00garbage\x00")
    assert served.read_bytes() != files["dataset-v3/archive/big.tar"]
    result = run_cli("verify", "dataset-v3", "--mount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert "1 repaired" in result.stdout
    drop_page_cache()
    assert served.read_bytes() == files["dataset-v3/archive/big.tar"]
    assert ino(served) != old_inode  # a new file, never rewritten in place
    assert ino(served) == victim.stat().st_ino == (tree / "archive/big.tar").stat().st_ino
    assert dataset(mount)["kernel_served"]
    check_tree(mount, files)


def test_kernel_served_data_survives_s3_going_away(
    bucket: Bucket, mounter: Mounter, s3_server: LocalS3
) -> None:
    files = fill(bucket)
    own = LocalS3(latency=0.0).start()
    try:
        mount = mounter(bucket.name, "--min-free", "0", server=own)
        assert prefetch(mount, "dataset-v3").returncode == 0
        own.stop()
        drop_page_cache()
        check_tree(mount, files)
        assert dataset(mount)["kernel_served"]
    finally:
        own.stop()


def test_off_switch_and_nested_datasets_are_served_through_fuse(
    bucket: Bucket, mounter: Mounter
) -> None:
    """Shards and a dataset at the mount root are kernel-served (test_kernelshards.py);
    the off switch and datasets nested in one another keep the FUSE path."""
    files = fill(bucket, count=6)
    mount = mounter(bucket.name, "--min-free", "0", "--no-kernel-serve-pinned")
    assert prefetch(mount, "dataset-v3").returncode == 0
    info = dataset(mount)
    assert not info["kernel_served"] and "off" in info["kernel_note"]
    assert bind_on(mount.path / "dataset-v3") is None
    assert mount.stop() == 0

    # A mount on one would cover the other: once both are pinned, both go through FUSE.
    nested = mounter(bucket.name, "--min-free", "0", name="mnt2", cache_dir=mount.cache_dir)
    assert wait_bound(nested)["kernel_served"]
    assert prefetch(nested, "dataset-v3/train").returncode == 0
    for name in ("dataset-v3", "dataset-v3/train"):
        found = dataset(nested, name)
        assert not found["kernel_served"] and "nested with dataset" in found["kernel_note"]
    assert [e.mount_point for e in mounts_below(nested.path)] == [str(nested.path)]
    check_tree(nested, files)


def test_setting_comes_from_flag_file_and_environment(tmp_path: Path) -> None:
    import argparse

    from s3cachefs.cli.settings import add_mount_options, mount_config, resolve

    parser = argparse.ArgumentParser()
    add_mount_options(parser)
    args = ["bucket", str(tmp_path)]
    assert mount_config(resolve(parser.parse_args(args), {})).kernel_serve_pinned
    off = parser.parse_args([*args, "--no-kernel-serve-pinned"])
    assert not mount_config(resolve(off, {})).kernel_serve_pinned
    env = {"S3CACHEFS_KERNEL_SERVE_PINNED": "false"}
    assert not mount_config(resolve(parser.parse_args(args), env)).kernel_serve_pinned
    on = parser.parse_args([*args, "--kernel-serve-pinned"])
    assert mount_config(resolve(on, env)).kernel_serve_pinned
    conf = tmp_path / "c.toml"
    conf.write_text("kernel-serve-pinned = false\n")
    from_file = parser.parse_args([*args, "--config", str(conf)])
    assert not mount_config(resolve(from_file, {})).kernel_serve_pinned


def test_unmount_command_removes_the_binds_first(bucket: Bucket, mounter: Mounter) -> None:
    fill(bucket, count=4)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    assert bind_on(mount.path / "dataset-v3") is not None
    result = run_cli("unmount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert mounts_below(mount.path) == []
    assert mount.proc.wait(timeout=30) == 0


# ---- checks of kernel-served files (a byte flipped on disk) --------------------------


def flip_byte(path: Path, offset: int) -> None:
    """One byte of a file changed in place, as a bad disk or a stray write would."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def listen_for_status(mount: Mount) -> socket.socket:
    """Receive the daemon's later STATUS= lines on its notify socket, as systemd would."""
    path = mount.log.with_suffix(".notify")
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_byte_flipped_on_disk_is_found_by_the_scheduled_check_and_fuse_serves_it(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket)
    port = free_port()
    mount = mounter(
        bucket.name, "--min-free", "0", "--verify-interval", "1", "--metrics-address",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    assert prefetch(mount, "dataset-v3").returncode == 0
    info = wait_bound(mount)
    assert info["kernel_served"]
    wait_for(lambda: dataset(mount)["kernel_check"] is not None, "the first scheduled check")
    assert dataset(mount)["kernel_check"]["ok"]
    status_lines = listen_for_status(mount)
    try:
        key = "dataset-v3/archive/big.tar"
        flip_byte(Path(info["tree"]) / "archive" / "big.tar", 2 * MIB + 3)
        wait_for(lambda: not dataset(mount)["kernel_served"], "the check to unbind")
        found = dataset(mount)
        check = found["kernel_check"]
        assert (check["ok"], check["trigger"], check["damaged"]) == (False, "scheduled", [key])
        assert "s3cachefs verify dataset-v3" in found["kernel_note"]
        assert bind_on(mount.path / "dataset-v3") is None
        log = mount.log_text()
        assert (
            "WARNING s3cachefs.datasets.kernelcheck: kernel-serve check dataset=dataset-v3/" in log
        )
        assert "dataset=dataset-v3/ trigger=scheduled files=13" in log
        assert "damaged=1 e.g. key=dataset-v3/archive/big.tar" in log
        human = run_cli("status", str(mount.path)).stdout
        assert "1 DAMAGED (e.g. dataset-v3/archive/big.tar)" in human
        samples = scrape(port)
        name = (("dataset", "dataset-v3"),)
        assert samples[("s3cachefs_dataset_kernel_served", name)] == 0
        assert samples[("s3cachefs_kernel_check_damaged_files", name)] == 1
        assert samples[("s3cachefs_kernel_checks_total", (("result", "damaged"),))] == 1
        assert samples[("s3cachefs_kernel_checks_total", (("result", "intact"),))] >= 1
        wait_for(lambda: b"kernel check FAILED" in _received(status_lines), "STATUS= line")
    finally:
        status_lines.close()
    # The FUSE path serves the dataset, and fetches the damaged block again.
    before = fuse_reads(mount)
    drop_page_cache()
    check_tree(mount, files)
    assert fuse_reads(mount)[1] > before[1]
    assert status(mount)["cache"]["corrupt_blocks"] >= 1
    # `verify` repairs and binds again; every byte through the bind is right.
    result = run_cli("verify", "dataset-v3", "--mount", str(mount.path))
    assert result.returncode == 0, result.stderr
    again = wait_bound(mount)
    assert again["kernel_served"] and again["kernel_check"]["ok"]
    drop_page_cache()
    check_tree(mount, files)
    assert bind_on(mount.path / "dataset-v3") is not None


def _received(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(TimeoutError):
        while True:
            data += sock.recv(4096)
    return data


def test_a_file_damaged_while_no_daemon_ran_is_checked_before_binding(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket)
    other = fill(bucket, prefix="other-ds", count=4)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    assert prefetch(mount, "other-ds").returncode == 0
    tree = Path(dataset(mount)["tree"])
    assert mount.stop() == 0
    flip_byte(tree / "archive" / "big.tar", 5)  # the daemon is down: nothing sees it
    again = mounter(bucket.name, "--min-free", "0", name="mnt2", cache_dir=mount.cache_dir)
    wait_for(lambda: dataset(again)["kernel_check"] is not None, "the check at start")
    assert wait_bound(again, "other-ds")["kernel_served"]
    damaged = dataset(again)
    assert not damaged["kernel_served"], damaged
    assert damaged["kernel_check"]["trigger"] == "start"
    assert damaged["kernel_check"]["damaged"] == ["dataset-v3/archive/big.tar"]
    assert dataset(again, "other-ds")["kernel_check"]["ok"]
    assert bind_on(again.path / "dataset-v3") is None
    log = again.log_text()
    check = log.index("kernel-serve check dataset=other-ds/ trigger=start")
    assert check < log.index("kernel-serve bound dataset=other-ds/")  # checked, then bound
    assert "kernel-serve bound dataset=dataset-v3/" not in log
    drop_page_cache()
    check_tree(again, files)  # through FUSE: the bad block fetched again
    check_tree(again, other, prefix="other-ds")


def test_verify_interval_setting(bucket: Bucket, tmp_path: Path) -> None:
    import argparse

    from s3cachefs.cli.settings import add_mount_options, mount_config, resolve

    parser = argparse.ArgumentParser()
    add_mount_options(parser)
    base = ["bucket", str(tmp_path)]

    def interval(*flags: str, env: dict[str, str] | None = None) -> float | None:
        return mount_config(resolve(parser.parse_args([*base, *flags]), env or {})).verify_interval

    assert interval() == 24 * 3600
    assert interval("--verify-interval", "90m") == 5400
    assert interval("--verify-interval", "2d") == 2 * 86400
    assert interval("--verify-interval", "off") is None
    assert interval("--verify-interval", "0") is None
    assert interval(env={"S3CACHEFS_VERIFY_INTERVAL": "30s"}) == 30
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = mount_cli(bucket, mnt, tmp_path / "cache", "--verify-interval", "soon")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "s3cachefs: --verify-interval: bad interval 'soon': use e.g. 24h, 30m, 90s, 2d, or off"
    )


# ---- the same tree through FUSE and through the kernel ------------------------------------


def find(root: Path) -> list[str]:
    result = subprocess.run(
        ["find", str(root), "-mindepth", "1", "-printf", "%y %P\n"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(result.stdout.splitlines())


def test_fuse_view_and_kernel_served_tree_are_the_same_tree(
    bucket: Bucket, mounter: Mounter
) -> None:
    keys = {
        "keys/f.txt": b"f",
        "keys/sub/g.txt": b"g" * 5000,
        "keys/dots/..": b"not a name",  # a skipped segment: "dots" stays, empty
        "keys/trail/": b"",  # a directory marker
        "keys/a//b": b"empty segment",
        "keys/x": b"hidden by the directory x/",
        "keys/x/": b"",
    }
    for key, body in keys.items():
        bucket.put(key, body)
    expected = ["d a", "d dots", "d sub", "d trail", "d x", "f f.txt", "f sub/g.txt"]
    mount = mounter(bucket.name, "--min-free", "0")
    assert find(mount.path / "keys") == expected  # FUSE, listed from S3
    result = prefetch(mount, "keys")
    assert result.returncode == 0, result.stderr
    assert wait_bound(mount, "keys")["kernel_served"]
    assert bind_on(mount.path / "keys") is not None
    assert find(mount.path / "keys") == expected  # the kernel, from the tree
    assert "skipped 2 keys that are not valid file names" in mount.log_text()
    assert mount.stop() == 0
    fuse = mounter(bucket.name, "--no-kernel-serve-pinned", name="mnt2", cache_dir=mount.cache_dir)
    bucket.server.reset()
    assert find(fuse.path / "keys") == expected  # FUSE, from the manifest
    assert bucket.server.counts()["list"] == 1  # the root only: the dataset is the manifest's


# ---- binds and holds around `s3cachefs unmount`; the check before the first bind ------


def ask(mount: Mount, op: str) -> None:
    """One control request to the daemon, as `s3cachefs unmount` sends it."""
    from s3cachefs.daemon.client import request
    from s3cachefs.daemon.runtime import read_record

    record = read_record(mount.path)
    assert record is not None
    assert [r["event"] for r in request(record, {"op": op})][-1] == "done"


def test_evict_after_a_busy_unmount_frees_the_bytes_and_nothing_binds_while_unmounting(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=6)
    bucket.put("top.txt", b"through FUSE")
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    total = sum(len(b) for k, b in files.items() if k.startswith("dataset-v3/"))
    assert status(mount)["cache"]["pinned_bytes"] == total
    with (mount.path / "top.txt").open("rb"):  # busy: the unmount fails, the daemon rebinds
        assert run_cli("unmount", str(mount.path)).returncode == 2
    assert wait_bound(mount)["kernel_served"]
    assert status(mount)["cache"]["pinned_bytes"] == total  # one hold, not two
    # Between `unbind` and the unmount, a prefetch that finishes binds nothing.
    ask(mount, "unbind")
    assert prefetch(mount, "dataset-v3").returncode == 0
    assert bind_on(mount.path / "dataset-v3") is None
    assert dataset(mount)["kernel_note"] == "unmounting"
    ask(mount, "rebind")
    assert wait_bound(mount)["kernel_served"]
    used = status(mount)["cache"]["used_bytes"]
    result = run_cli("evict", "dataset-v3", "--mount", str(mount.path))
    assert result.returncode == 0, result.stderr
    after = status(mount)["cache"]
    assert after["pinned_bytes"] == 0
    assert used - after["used_bytes"] >= total  # freed, not kept by a hold left behind


def test_a_prefetch_at_start_does_not_bind_before_the_start_check(
    bucket: Bucket, mounter: Mounter
) -> None:
    """The boot flow: daemon starts, a prefetch oneshot runs at once and accepts the
    (complete) dataset in seconds. Its refresh must not bind what the start check,
    still running, has not read back; the damage the check finds keeps it on FUSE."""
    files = fill(bucket)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    tree = Path(dataset(mount)["tree"])
    assert mount.stop() == 0
    flip_byte(tree / "archive" / "big.tar", 5)  # the daemon is down: nothing sees it
    again = mounter(bucket.name, "--min-free", "0", name="mnt2", cache_dir=mount.cache_dir)
    assert prefetch(again, "dataset-v3").returncode == 0  # a new manifest, saved at once
    wait_for(lambda: dataset(again)["kernel_check"] is not None, "the check at start")
    found = dataset(again)
    assert not found["kernel_served"] and found["kernel_check"]["trigger"] == "start"
    assert found["kernel_check"]["damaged"] == ["dataset-v3/archive/big.tar"]
    assert "kernel-serve bound dataset=dataset-v3/" not in again.log_text()
    drop_page_cache()
    check_tree(again, files)  # through FUSE: the bad block fetched again


# ---- in process: what a refresh may bind, and what a check unbinds ------------------------


def in_process(tmp_path: Path, body: Callable[[Any, Any, Any], Awaitable[None]]) -> None:
    """A `KernelServe` over a real block cache and pin store (S3 in memory, no mount):
    one complete, pinned object ``ds/a.bin`` of three and a bit blocks."""
    import trio

    from s3cachefs.cache.blocks import ObjectVersion
    from s3cachefs.datasets.kernelserve import KernelServe
    from s3cachefs.datasets.pins import Manifest, PinStore
    from s3cachefs.store.types import ObjectInfo
    from s3cachefs.testing.memorystore import MemoryStore
    from tests.test_blockcache import BS, make_cache

    store = MemoryStore("mem")
    data = os.urandom(3 * BS + 5)
    etag = store.put("ds/a.bin", data)
    cache = make_cache(tmp_path / "cache", store)
    pins = PinStore(cache.root, "mem", cache.ledger)
    pins.load()
    manifest = Manifest("mem", "ds/", None, complete=True)
    manifest.objects["ds/a.bin"] = ObjectInfo("ds/a.bin", len(data), etag, 1)
    pins.save(manifest)
    kernel = KernelServe(
        mountpoint=tmp_path / "mnt",
        mount_prefix="",
        bucket="mem",
        cache=cache,
        pins=pins,
        enabled=True,
    )
    version = ObjectVersion("mem", "ds/a.bin", etag, len(data))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            assert await cache.read(version, 0, len(data)) == data
            await cache.drain()
            assert not cache.missing_blocks(version)
            await body(kernel, manifest, version)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_refresh_does_not_bind_a_dataset_no_check_has_read_back(tmp_path: Path) -> None:
    async def body(kernel: Any, manifest: Any, version: Any) -> None:
        await kernel.refresh(manifest.id)  # e.g. a prefetch ending while the start check runs
        assert kernel.binds == {}
        note = kernel.notes[manifest.id]
        assert note.startswith("its files are checked before it is bound"), note
        assert not (kernel.trees / f"{manifest.id}.next").exists()  # nothing was staged
        result = await kernel.checks.check(manifest, "start")
        assert result is not None and result.ok
        assert manifest.id in kernel.checked

    in_process(tmp_path, body)


def test_a_check_that_finds_damage_unbinds_the_bind_live_at_its_end(tmp_path: Path) -> None:
    """The check at start began with no bind; a bind made meanwhile (any way) is the one
    it unbinds, and its pin-store hold goes with it."""
    from s3cachefs.datasets import binds
    from s3cachefs.datasets.kerneltrees import Bind

    async def body(kernel: Any, manifest: Any, version: Any) -> None:
        flip_byte(kernel.cache.object_path(version.oid), 5)
        layout = await kernel.layout(manifest)
        tree = kernel.trees / manifest.id
        kernel.trees.mkdir(mode=0o700)
        binds.build_tree(tree, layout.entries, layout.dirs)
        bind = Bind(manifest.id, kernel.mountpoint / "ds", tree, -1, "kernel:x:1", layout.oids)
        for oid in layout.oids:
            kernel.pins.hold(bind.owner, oid)
        kernel.binds[manifest.id] = bind
        result = await kernel.checks.check(manifest, "start")
        assert result is not None and result.damaged == ("ds/a.bin",)
        assert kernel.binds == {} and not tree.exists()
        assert bind.owner not in kernel.pins._held
        assert manifest.id not in kernel.checked
        assert "s3cachefs verify ds" in kernel.notes[manifest.id]
        assert kernel.cache.missing_blocks(version) == [0]  # the bad block dropped
        await kernel.refresh(manifest.id)
        assert kernel.binds == {}  # damaged: not bound again until `verify`

    in_process(tmp_path, body)


def test_a_scan_whose_tree_went_away_ends_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from s3cachefs.datasets.treecheck import FileCheck, Stopped, scan

    caplog.set_level(logging.INFO, logger="s3cachefs")
    tree = tmp_path / "trees" / "gone"
    files = [FileCheck(f"ds/{i}", tree / str(i), 10, {0: 0}) for i in range(50)]
    with pytest.raises(Stopped):
        scan(files, 4096, None, tree)
    assert [r.levelname for r in caplog.records if r.name.endswith("treecheck")] == ["INFO"]
    tree.mkdir(parents=True)  # the tree is there, a file is not: that is damage
    assert scan(files[:2], 4096, None, tree) == ["ds/0", "ds/1"]
    assert "cannot open" in caplog.text


async def bound_unsealed(kernel: Any, manifest: Any) -> tuple[Path, Any]:
    """The dataset's tree built and "bound" (no mount in process), promoted and not sealed."""
    from s3cachefs.datasets import binds
    from s3cachefs.datasets.kerneltrees import Bind, Synced

    layout = await kernel.layout(manifest)
    tree = kernel.trees / kernel.group_id(manifest.prefix)
    kernel.trees.mkdir(mode=0o700)
    binds.build_tree(tree, layout.entries, layout.dirs)
    bind = Bind(tree.name, kernel.mountpoint / "ds", tree, -1, "kernel:x:1", layout.oids)
    for oid in layout.oids:
        kernel.pins.hold(bind.owner, oid)
    kernel.binds[manifest.id] = bind
    kernel.checked.add(manifest.id)
    kernel.seals.add(tree, Synced(frozenset()))
    return tree, bind


def test_a_failed_sync_unbinds_the_trees_it_would_have_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of W1's tail, M1: a tree is mounted before its ``syncfs``; a sync that
    failed was only logged, and the tree stayed mounted for good (what it links may not
    be on disk). Now each tree of that batch is unbound, the FUSE view serves, status says
    why, and its files are read back before it is bound again."""

    def sync_fails(trees: Path) -> None:
        raise OSError(5, "Input/output error")

    async def body(kernel: Any, manifest: Any, version: Any) -> None:
        tree, bind = await bound_unsealed(kernel, manifest)
        monkeypatch.setattr(kerneltrees, "sync", sync_fails)
        await kernel.seals.now()
        assert kernel.binds == {} and not tree.exists() and kerneltrees.synced(tree) is None
        assert bind.owner not in kernel.pins._held and not kernel.seals.unsealed
        assert manifest.id not in kernel.checked  # checked again before a new bind
        found = (await kernel.describe())[manifest.id]
        assert not found["kernel_served"]
        assert "syncfs of its tree failed" in found["kernel_note"], found
        await kernel.refresh(manifest.id)
        assert kernel.binds == {}
        assert kernel.notes[manifest.id].startswith("its files are checked before it is bound")

    in_process(tmp_path, body)


def test_a_record_not_written_is_kept_and_sealed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of W1's tail, L2: a failed write of a tree's ``.synced`` record dropped the
    tree from those to seal (never recorded: built again at every start). It stays
    unsealed (current for this daemon) and the seal is tried again."""
    import trio

    seal = kerneltrees.seal
    calls: list[Path] = []
    sealed: list[trio.Event] = []

    def seal_fails_once(tree: Path, record: kerneltrees.Synced) -> None:
        calls.append(tree)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        seal(tree, record)
        trio.from_thread.run_sync(sealed[0].set)

    async def body(kernel: Any, manifest: Any, version: Any) -> None:
        monkeypatch.setattr(kerneltrees, "seal", seal_fails_once)
        kernel.seals.retry = 0.01
        sealed.append(trio.Event())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.seals.run)
            tree, _ = await bound_unsealed(kernel, manifest)
            with trio.fail_after(60):
                await sealed[0].wait()
            async with kernel.lock:  # the pass that sealed it is over
                assert kerneltrees.synced(tree) is not None
            assert calls == [tree, tree] and not kernel.seals.unsealed
            assert kernel.binds[manifest.id].tree == tree
            nursery.cancel_scope.cancel()

    in_process(tmp_path, body)


def test_stop_does_not_wait_for_a_sync_beyond_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of W1's tail, L1: stop sealed the trees with a ``syncfs`` in a thread that a
    cancel could not abandon: a slow flush held the stop past STOP_TIMEOUT. Now the sync is
    abandoned at the budget; the tree stays unsealed (built again at start)."""
    import threading

    from s3cachefs.datasets import kernelserve

    flushing = threading.Event()
    release = threading.Event()
    flushed = threading.Event()

    def slow_sync(trees: Path) -> None:
        flushing.set()
        release.wait(90)
        flushed.set()

    async def body(kernel: Any, manifest: Any, version: Any) -> None:
        tree, _ = await bound_unsealed(kernel, manifest)
        del kernel.binds[manifest.id]  # detached (no mount in process)
        monkeypatch.setattr(kerneltrees, "sync", slow_sync)
        monkeypatch.setattr(kernelserve, "STOP_TIMEOUT", 0.2)
        try:
            await kernel.stop(final=True)  # before: returned once the sync did
            assert flushing.is_set() and not flushed.is_set()
            assert kerneltrees.synced(tree) is None and tree in kernel.seals.unsealed
        finally:
            release.set()

    in_process(tmp_path, body)

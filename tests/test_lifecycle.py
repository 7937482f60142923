"""The daemon's life: other mount namespaces, a new daemon on the same path, starting offline.

Real mounts, real S3 server. Another mount namespace is a process started
with ``unshare -m`` holding a copy of the mount (its cwd inside it), as a
container runtime does; the test starts it and kills it by PID.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3cachefs.daemon.mountpoint import mount_at
from s3cachefs.daemon.runtime import read_record
from tests.conftest import Bucket, Mounter, drop_page_cache, mount_cli, run_cli, status
from tests.faultproxy import FaultProxy
from tests.test_kernelserve import wait_bound, wait_for
from tests.test_prefetch import check_tree, fill, prefetch

pytestmark = pytest.mark.exclusive  # see the marker in pyproject.toml


class Holder:
    """A process in a mount namespace of its own (its cwd inside ``path``, if given).

    ``--propagation slave``: its copies receive the unmounts of shared mounts here.
    """

    def __init__(self, path: Path | None) -> None:
        inside = f'cd "{path}" && ' if path is not None else ""
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "slave", "sh", "-c", f"{inside}exec sleep 300"],
            stdin=subprocess.DEVNULL,
        )
        own = os.readlink("/proc/self/ns/mnt")

        def entered() -> bool:
            try:
                theirs = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
                comm = Path(f"/proc/{self.proc.pid}/comm").read_text().strip()
            except OSError:
                return False
            return theirs != own and comm == "sleep"

        wait_for(entered, "the other namespace")
        self.namespace = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")

    def read(self, path: Path) -> bytes:
        """Read a file as the other namespace sees it."""
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "cat", str(path)],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.kill()


# ---- row 9: unmount while another mount namespace holds the mount -----------------------


def test_unmount_says_another_namespace_holds_the_mount(
    bucket: Bucket, mounter: Mounter, holders: list[Holder]
) -> None:
    bucket.put("f.txt", b"data")
    mount = mounter(bucket.name)
    holder = Holder(mount.path)
    holders.append(holder)

    refused = run_cli("unmount", str(mount.path))
    assert refused.returncode == 5, refused
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"s3cachefs: refused: {mount.path} is still mounted in ")
    assert holder.namespace in line and f"{holder.proc.pid} sleep" in line
    assert f"daemon pid {mount.proc.pid} keeps serving it" in line and "--lazy" in line
    assert os.path.ismount(mount.path)  # refused: nothing changed
    assert (mount.path / "f.txt").read_bytes() == b"data"

    lazy = run_cli("unmount", str(mount.path), "--lazy")
    assert lazy.returncode == 0, lazy.stderr
    assert lazy.stdout.startswith(
        f"unmounted {mount.path} here; still mounted in {holder.namespace}"
    )
    assert mount_at(mount.path) is None
    assert mount.proc.poll() is None  # the daemon serves the other namespace
    assert holder.read(mount.path / "f.txt") == b"data"

    holder.kill()  # the last copy goes: the daemon ends on its own
    assert mount.proc.wait(timeout=30) == 0


def test_unmount_with_no_other_holder_still_says_unmounted(
    bucket: Bucket, mounter: Mounter
) -> None:
    bucket.put("f.txt", b"data")
    mount = mounter(bucket.name)
    result = run_cli("unmount", str(mount.path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"unmounted {mount.path}\n", "")
    assert mount.proc.wait(timeout=30) == 0


def test_copies_that_receive_our_unmount_do_not_hold_the_mount(
    bucket: Bucket, mounter: Mounter, holders: list[Holder], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"  # its mounts are shared, as systemd makes "/": copies follow
    shared.mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    subprocess.run(["mount", "--make-shared", str(shared)], check=True)
    try:
        _copies_follow(bucket, mounter, holders)
    finally:
        for mount in mounter.mounts:
            mount.stop()
        subprocess.run(["umount", "-l", str(shared)], check=False)


def _copies_follow(bucket: Bucket, mounter: Mounter, holders: list[Holder]) -> None:
    bucket.put("f.txt", b"data")
    mount = mounter(bucket.name, name="shared/mnt")
    mine = mount_at(mount.path)
    assert mine is not None and any(t.startswith("shared:") for t in mine.tags)
    busy = Holder(mount.path)  # a slave copy, with its cwd in it
    holders.append(busy)
    refused = run_cli("unmount", str(mount.path))
    assert refused.returncode == 5, refused
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"s3cachefs: cannot unmount, busy: {mount.path} is still mounted in ")
    assert f"{busy.proc.pid} sleep" in line
    assert mount_at(mount.path) == mine
    busy.kill()

    idle = Holder(None)  # a slave copy nobody uses: our unmount takes it along
    holders.append(idle)
    result = run_cli("unmount", str(mount.path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"unmounted {mount.path}\n", "")
    assert mount.proc.wait(timeout=30) == 0  # the connection ended: no copy is left anywhere


def test_a_busy_unmount_fails_in_one_line_and_the_datasets_stay_kernel_served(
    bucket: Bucket, mounter: Mounter
) -> None:
    fill(bucket, count=2)
    bucket.put("top.txt", b"through FUSE")
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    with (mount.path / "top.txt").open("rb"):  # an open file on the FUSE mount itself
        result = run_cli("unmount", str(mount.path))
        assert result.returncode == 2
        assert result.stderr == (
            f"s3cachefs: cannot unmount {mount.path}: Device or resource busy "
            "(files are open in it; --lazy detaches it now)\n"
        )
        assert wait_bound(mount)["kernel_served"]  # unbound for the attempt, bound again
        assert mount.log_text().count("kernel-serve bound dataset=dataset-v3/") == 2
    assert run_cli("unmount", str(mount.path)).returncode == 0
    assert mount.proc.wait(timeout=30) == 0


# ---- row 14: an old daemon and a new mount on the same path ------------------------------


def test_an_old_daemon_leaves_a_new_daemons_mount_alone(
    bucket: Bucket, mounter: Mounter, holders: list[Holder], tmp_path: Path
) -> None:
    files = fill(bucket, count=4)
    bucket.put("top.txt", b"through FUSE")
    old = mounter(bucket.name, "--min-free", "0")
    assert prefetch(old, "dataset-v3").returncode == 0  # binds on the old mount too
    holder = Holder(old.path)
    holders.append(holder)
    assert run_cli("unmount", str(old.path), "--lazy").returncode == 0
    assert old.proc.poll() is None
    assert holder.read(old.path / "top.txt") == b"through FUSE"  # the old daemon serves it

    new = mounter(bucket.name, "--min-free", "0", name="mnt", cache_dir=tmp_path / "cache2")
    assert new.path == old.path
    mine = mount_at(new.path)
    assert mine is not None
    record = read_record(new.path)
    assert record is not None and (record.pid, record.device) == (new.proc.pid, mine.device)

    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(timeout=30) == 0
    assert mount_at(new.path) == mine  # the new mount is still there, the same one
    assert read_record(new.path) == record  # and its record
    assert Path(record.socket).exists()
    assert status(new)["pid"] == new.proc.pid
    check_tree(new, files)  # served by the new daemon
    assert f"mountpoint={old.path} gone" in old.log_text()
    assert new.proc.poll() is None
    # The old daemon's copy in the other namespace is dead now, not the new daemon's mount.
    with pytest.raises(subprocess.CalledProcessError) as info:
        holder.read(old.path / "top.txt")
    assert b"Transport endpoint is not connected" in info.value.stderr


# ---- row 13: starting while S3 is unreachable -------------------------------------------


@pytest.mark.parametrize("serve", ["--kernel-serve-pinned", "--no-kernel-serve-pinned"])
def test_the_daemon_starts_offline_and_serves_what_is_pinned(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy, serve: str
) -> None:
    files = fill(bucket)
    bucket.put("other/x.bin", b"not pinned")
    first = mounter(bucket.name, "--min-free", "0", serve, server=proxy)
    assert prefetch(first, "dataset-v3").returncode == 0
    assert first.stop() == 0

    proxy.down = True  # the node reboots during an outage
    mount = mounter(
        bucket.name,
        "--min-free",
        "0",
        "--metadata-ttl",
        "1",
        serve,
        name="mnt2",
        cache_dir=first.cache_dir,
        server=proxy,
    )
    warnings = [line for line in mount.log_text().splitlines() if "S3 unreachable at start" in line]
    assert len(warnings) == 1 and " WARNING " in f" {warnings[0]}", warnings
    assert "serving 1 pinned datasets from the cache (dataset-v3)" in warnings[0]
    if serve == "--kernel-serve-pinned":
        assert wait_bound(mount)["kernel_served"]
    drop_page_cache()
    check_tree(mount, files)
    assert sorted(os.listdir(mount.path / "dataset-v3")) == ["archive", "train", "val"]
    assert status(mount)["s3"]["reachable"] is False
    human = run_cli("status", str(mount.path)).stdout
    assert "S3 UNREACHABLE since" in human
    with pytest.raises(OSError) as info:
        (mount.path / "other" / "x.bin").read_bytes()
    assert info.value.errno in (errno.ENOENT, errno.EIO)

    proxy.down = False  # S3 is back: everything else is reachable, no restart

    def back() -> bool:
        try:
            return (mount.path / "other" / "x.bin").read_bytes() == b"not pinned"
        except OSError:
            return False

    wait_for(back, "S3 to be reached again", timeout=90)
    wait_for(lambda: status(mount)["s3"]["reachable"], "the start-up check to succeed")
    assert "S3 reachable again after" in mount.log_text()
    assert mount.proc.poll() is None


def test_mount_says_when_it_started_offline(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy, tmp_path: Path
) -> None:
    fill(bucket, count=2)
    first = mounter(bucket.name, "--min-free", "0", server=proxy)
    assert prefetch(first, "dataset-v3").returncode == 0
    assert first.stop() == 0
    proxy.down = True
    result = mount_cli(bucket, first.path, first.cache_dir, endpoint=proxy.endpoint_url)
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"mounted s3://{bucket.name}/ at {first.path}")
        [line] = result.stderr.splitlines()
        assert line.startswith("s3cachefs: warning: S3 unreachable (")
        assert line.endswith("); serving pinned datasets")
    finally:
        assert run_cli("unmount", str(first.path)).returncode == 0


def test_offline_with_nothing_pinned_is_refused_with_one_line(
    bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proxy.down = True
    result = mount_cli(bucket, mnt, tmp_path / "cache", endpoint=proxy.endpoint_url)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"s3cachefs: cannot reach {proxy.endpoint_url}: ")
    assert line.endswith("(and no complete pinned dataset to serve)")
    assert mount_at(mnt) is None


def test_a_bucket_gone_is_refused_even_with_its_dataset_pinned(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    files = fill(bucket, count=2)
    first = mounter(bucket.name, "--min-free", "0")
    assert prefetch(first, "dataset-v3").returncode == 0
    assert first.stop() == 0
    for key in files:
        bucket.delete(key)
    bucket.client.delete_bucket(Bucket=bucket.name)
    result = mount_cli(bucket, first.path, first.cache_dir)
    assert result.returncode == 3
    assert result.stderr == f"s3cachefs: s3://{bucket.name}: no such bucket\n"
    assert mount_at(first.path) is None


# ---- issue 14: an empty bind-mounted directory is a mountpoint ----------------------------


def test_an_empty_bind_mounted_directory_is_a_usable_mountpoint(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    bucket.put("f.txt", b"data")
    source = Path(tempfile.mkdtemp(dir="/dev/shm"))  # another file system, as docker -v gives
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(mnt)], check=True)
    try:
        below = mount_at(mnt)
        assert below is not None and below.fstype == "tmpfs"
        mount = mounter(bucket.name)
        assert mount.path == mnt
        assert (mnt / "f.txt").read_bytes() == b"data"
        on_top = mount_at(mnt)
        assert on_top is not None and on_top.fstype == "fuse.s3cachefs"
        again = mount_cli(bucket, mnt, tmp_path / "cache2")  # a FUSE mount is refused
        assert again.returncode == 2
        assert (
            again.stderr
            == f"s3cachefs: mountpoint {mnt} is already a FUSE mount (fuse.s3cachefs)\n"
        )
        assert run_cli("unmount", str(mnt)).returncode == 0
        assert mount.proc.wait(timeout=30) == 0
        assert mount_at(mnt) == below  # the bind under it is left as it was
        again = run_cli("unmount", str(mnt))  # and `unmount` does not take it
        assert (again.returncode, again.stderr) == (
            2,
            f"s3cachefs: {mnt} is not an s3cachefs mount (tmpfs)\n",
        )
        assert mount_at(mnt) == below
        (source / "someone-elses-file").write_text("x")
        busy = mount_cli(bucket, mnt, tmp_path / "cache")
        assert (busy.returncode, busy.stderr) == (2, f"s3cachefs: mountpoint {mnt} is not empty\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["rm", "-rf", str(source)], check=False)

"""Mountpoint checks and unmounting: stale mounts of a dead daemon, and only our own mount.

A daemon acts only on the mount it made. Another mount namespace may keep a
copy of it alive after it left this one, and a new daemon may then mount on
the same path: the old daemon's stop must leave that new mount alone. So the
daemon records its mount (id and device, from /proc/self/mountinfo) when it
mounts, and at stop unmounts the path only if that mount is still what the
path leads to (`binds.unmount_exact`: through a handle on it, no race with a
mount made meanwhile).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
from pathlib import Path

from s3cachefs.base.errors import ConfigError
from s3cachefs.datasets import binds, overlay
from s3cachefs.datasets.binds import MountEntry

log = logging.getLogger(__name__)


def fusermount() -> str:
    path = shutil.which("fusermount3") or shutil.which("fusermount")
    if path is None:
        raise ConfigError("fusermount3 not found: install the fuse3 package")
    return path


def is_stale(path: Path) -> bool:
    """True for a FUSE mount whose daemon is gone ("Transport endpoint is not connected"),
    also under the overlays that daemon left on it (`dead_overlays`)."""
    try:
        os.statvfs(path)  # not stat(): the kernel may answer that from cached attributes
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return bool(dead_overlays(path))


def dead_overlays(path: Path) -> list[overlay.Overlay]:
    """The overlays a dead daemon left on the mountpoint itself (it kernel-served a dataset
    at the mount root) over its own FUSE mount, bottom first; [] unless every mount on that
    FUSE mount is one.

    Such an overlay answers ``statvfs`` from its tree layer, so the dead FUSE
    mount under it looks alive. Ours for sure: source ``s3cachefs``, stacked
    right on an s3cachefs FUSE mount, its top layer a tree of a cache dir
    (``CACHE/v1/trees/ID``) whose lock no daemon holds (so the daemon that
    mounted it, and its FUSE mount, are dead).
    """
    stack = binds.stack_at(Path(os.path.realpath(path)))
    fuse = [i for i, e in enumerate(stack) if e.fstype == "fuse.s3cachefs"]
    if not fuse or fuse[-1] == len(stack) - 1:
        return []
    ours = {o.id: o for o in overlay.overlays() if o.source == overlay.SOURCE and o.layers}
    found = [ours.get(e.id) for e in stack[fuse[-1] + 1 :]]
    left = [o for o in found if o is not None]
    if len(left) != len(found):
        return []  # someone else's mount is on it: not ours to remove
    caches = {_cache_dir_of(Path(o.layers[0])) for o in left}
    if None in caches or not all(c is not None and _cache_dir_free(c) for c in caches):
        return []
    return left


def _cache_dir_of(tree: Path) -> Path | None:
    """The cache dir of a kernel-serve tree (``CACHE/v1/trees/ID``), None if it is none."""
    trees = tree.parent
    if trees.name != "trees" or trees.parent.name != "v1":
        return None
    return trees.parent.parent


def remove_stale(path: Path) -> int:
    """Unmount the stale mount on ``path`` (`is_stale`), and first the overlays its dead
    daemon left on it; returns how many overlays went. ConfigError if one cannot go.

    Only those mounts, by id: never one made on the path meanwhile. Lazily: that
    also detaches the binds and overlays of kernel-served datasets below.
    """
    left = dead_overlays(path)
    for found in reversed(left):
        try:
            outcome = binds.unmount_exact(Path(found.mount_point), found.id, lazy=True)
        except OSError as exc:
            outcome = exc.strerror or str(exc)
        if outcome != "detached":
            raise ConfigError(f"cannot unmount the overlay left on {path}: {outcome}")
    stale = mount_at(os.path.realpath(path))
    if stale is not None and stale.fstype.startswith("fuse"):
        unmount(Path(stale.mount_point), lazy=True, mount=stale)
    else:
        unmount(path, lazy=True)
    return len(left)


def mount_at(path: Path | str) -> MountEntry | None:
    """The mount a lookup of ``path`` sees (the top of its stack), from mountinfo.

    ``path`` must be canonical (as the kernel prints it: no symlinks); read from
    mountinfo, not stat(): the daemon must not send itself FUSE requests.
    """
    stack = binds.stack_at(Path(os.path.abspath(path)))
    return stack[-1] if stack else None


def fuse_mount_at(path: Path | str) -> MountEntry | None:
    """`mount_at`, looking under our overlay of a dataset at the mount root (kernel-served):
    the mount `unmount` acts on once the daemon has removed that overlay."""
    stack = binds.stack_at(Path(os.path.abspath(path)))
    ours = {o.id for o in overlay.overlays() if o.source == overlay.SOURCE}
    while len(stack) > 1 and stack[-1].id in ours:
        stack.pop()
    return stack[-1] if stack else None


def unmount(path: Path, *, lazy: bool = False, mount: MountEntry | None = None) -> None:
    """Unmount ``path``; ConfigError with the reason if that fails.

    With ``mount`` (and root), exactly that mount: a mount made on the path
    after it was looked at is never the one removed. Otherwise fusermount3.
    """
    if mount is not None and os.geteuid() == 0:
        try:
            outcome = binds.unmount_exact(path, mount.id, device=mount.device, lazy=lazy)
        except OSError as exc:
            busy = (
                " (files are open in it; --lazy detaches it now)"
                if exc.errno == errno.EBUSY
                else ""
            )
            raise ConfigError(f"cannot unmount {path}: {exc.strerror}{busy}") from None
        if outcome == "covered":
            raise ConfigError(f"cannot unmount {path}: another mount is on it now")
        return
    args = [fusermount(), "-u", *(["-z"] if lazy else []), str(path)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise ConfigError(f"cannot unmount {path}: {reason}")


def release_own_mount(own: MountEntry) -> str:
    """At stop: unmount the mount this daemon made, only if the path still leads to it.

    Returns "unmounted", "detached", "gone" (no longer in this namespace:
    someone unmounted it) or "covered" (the path now leads to another mount,
    e.g. a new daemon's: left alone).
    """
    path = Path(own.mount_point)
    # By id *and* device: a mount id freed when ours left this namespace is given to the
    # next mount, maybe a new daemon's on this very path; our device lives as long as we do.
    if (own.id, own.device) not in {(e.id, e.device) for e in binds.mountinfo()}:
        return "gone"
    top = mount_at(path)
    if top is None or (top.id, top.device) != (own.id, own.device):
        return "covered"
    if os.geteuid() != 0:  # fusermount3 goes by path: the check above is all we can do
        unmount(path, lazy=True)
        return "detached"
    return binds.unmount_exact(path, own.id, device=own.device, lazy=True)


def remove_leftover_overlays(path: Path, cache_dir: Path) -> None:
    """Unmount the overlays of kernel-served datasets a dead daemon of this cache dir left
    on the mountpoint itself (a dataset at the mount root), topmost first.

    Needed before the stale-mount check: an overlay on the mountpoint itself
    answers ``statvfs``, so the dead FUSE mount under it would not be seen.
    (Overlays on directories below go with the stale mount's lazy unmount.)
    Dead for sure: the cache dir's lock is free (a live daemon holds it), and
    only overlays whose tree is in this cache dir are touched. One WARNING line
    for what cannot be unmounted; the checks below then refuse the mountpoint.
    """
    trees = cache_dir / "v1" / "trees"
    canonical = os.path.realpath(path)
    left = [o for o in overlay.leftovers(trees, Path(canonical)) if o.mount_point == canonical]
    if not left or not _cache_dir_free(cache_dir):
        return
    log.warning(
        "mountpoint=%s: %d overlays of a dead daemon left on it; unmounting them", path, len(left)
    )
    for found in reversed(left):
        try:
            binds.unmount_exact(Path(found.mount_point), found.id, lazy=True)
        except OSError as exc:
            log.warning(
                "mountpoint=%s: cannot unmount the overlay left on %s: %s",
                path,
                found.mount_point,
                exc.strerror or exc,
            )


def _cache_dir_free(cache_dir: Path) -> bool:
    """No daemon holds the cache dir's lock (`cache.layout`)."""
    try:
        fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock
    return True


def check_mountpoint(path: Path, cache_dir: Path | None = None) -> None:
    """A usable mountpoint is an existing, empty directory with no FUSE mount on it.

    An empty directory that is a mount point of another kind is fine:
    ``docker run -v /mnt/datasets:/mnt/datasets:rshared`` makes one (a bind).
    A stale mount left by a crashed daemon is cleaned first (so a restart
    under systemd just works); only that mount, never one made meanwhile. With
    ``cache_dir``, the overlays that daemon left go first.
    """
    if cache_dir is not None and os.geteuid() == 0:
        remove_leftover_overlays(path, cache_dir)
    if is_stale(path):
        log.warning("mountpoint=%s is a stale mount of a dead daemon; unmounting it", path)
        remove_stale(path)
    if not path.exists():
        raise ConfigError(f"mountpoint {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"mountpoint {path} is not a directory")
    top = mount_at(os.path.realpath(path))
    if top is not None and top.fstype.startswith("fuse"):
        raise ConfigError(f"mountpoint {path} is already a FUSE mount ({top.fstype})")
    try:
        with os.scandir(path) as entries:
            if next(entries, None) is not None:
                raise ConfigError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise ConfigError(f"mountpoint {path} is not readable") from None
    except OSError as exc:  # e.g. ENOTCONN under a mount this daemon could not remove
        raise ConfigError(f"mountpoint {path} is not usable: {exc.strerror or exc}") from None


def set_kernel_readahead(mount: MountEntry | None, kib: int) -> bool:
    """Let the kernel read ahead ``kib`` KiB on this mount, so FUSE reads are up to 1 MiB.

    The default (128 KiB) splits every sequential read into 128 KiB requests,
    each a round trip through the daemon; 1024 KiB measured 1.85x the warm
    sequential throughput here (README, "Kernel caching"). Best effort: needs
    a writable /sys (root, or a container with it).
    """
    if mount is None:
        return False
    try:
        Path(f"/sys/class/bdi/{mount.device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.debug("cannot set read_ahead_kb for %s: %s", mount.mount_point, exc.strerror)
        return False
    return True

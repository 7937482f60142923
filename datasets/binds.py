"""Mount plumbing for kernel-served datasets: read-only binds, mountinfo, trees of links.

Blocking functions only (the caller runs them in threads); `datasets.kernelserve`
decides what to bind when.

A bind is made with the new mount API where the kernel has it: ``open_tree``
clones the tree detached, ``mount_setattr`` makes the clone read-only and
*private* before anyone can see it (a clone of a directory on a shared root
file system would otherwise join the root's peer group, and a mount later
stacked on it would propagate onto the cache dir itself), and ``move_mount``
attaches it. ``MOVE_MOUNT_BENEATH`` (Linux 6.5) attaches a new tree *under*
the bind already there, so that detaching the old one reveals the new one:
readers see the old complete tree, then the new complete tree, never a gap.
Kernels without it get detach-then-attach; in between, the FUSE view answers
(the same, correct bytes, through the daemon).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

# Syscall numbers of the new mount API: the same on every architecture but alpha.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_BENEATH = 0x200
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class BeneathUnsupported(OSError):
    """The kernel cannot attach a mount beneath another (before Linux 6.5)."""


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


# ---- mountinfo -------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    id: int
    parent: int
    root: str  # the path of the mount's root inside its file system
    mount_point: str
    device: str = ""  # "major:minor" of the file system: one per FUSE connection
    fstype: str = ""  # "fuse.s3cachefs", "ext4", ...
    tags: tuple[str, ...] = ()  # propagation: "shared:N", "master:N", ...


def _unescape(field: str) -> str:
    raw = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
    return raw.encode("latin-1").decode("utf-8", "surrogateescape")


def mountinfo(pid: int | str = "self") -> list[MountEntry]:
    """The mounts that process ``pid`` sees (its mount namespace); OSError if it is gone."""
    entries = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text("latin-1").splitlines():
        fields = line.split()
        sep = fields.index("-", 6)
        entries.append(
            MountEntry(
                int(fields[0]),
                int(fields[1]),
                _unescape(fields[3]),
                _unescape(fields[4]),
                device=fields[2],
                fstype=fields[sep + 1],
                tags=tuple(fields[6:sep]),
            )
        )
    return entries


def stack_at(target: Path) -> list[MountEntry]:
    """The mounts on ``target``, bottom first; the last one is what a path lookup sees."""
    here = [e for e in mountinfo() if e.mount_point == str(target)]
    ids = {e.id for e in here}
    stack = [e for e in here if e.parent not in ids][:1]
    while stack:
        above = [e for e in here if e.parent == stack[-1].id]
        if not above:
            break
        stack.append(above[0])
    return stack


def mounts_below(path: Path) -> list[MountEntry]:
    """Mounts on ``path`` or anywhere under it (tests: nothing may be left behind)."""
    prefix = str(path).rstrip("/") + "/"
    return [
        e for e in mountinfo() if e.mount_point == str(path) or e.mount_point.startswith(prefix)
    ]


# ---- binds -------------------------------------------------------------------


def target_ready(target: Path, replacing: bool) -> bool:
    """The dataset's directory exists in the FUSE view (a lookup the daemon answers
    from the manifest) and nothing but our own bind (``replacing``) is mounted on it."""
    if not replacing and stack_at(target):
        return False
    os.listdir(target)  # also puts the manifest's listing in: long kernel timeouts
    return os.path.isdir(target)


def attach_ro(tree: Path, target: Path, *, beneath: bool = False) -> int:
    """Bind ``tree`` read-only (nosuid, nodev, private) on ``target``; returns its mount id.

    With ``beneath``, under the mount already on ``target`` (BeneathUnsupported
    if the kernel cannot).
    """
    try:
        fd = _check(
            _libc.syscall(
                _SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(tree), _OPEN_TREE_CLONE | os.O_CLOEXEC
            )
        )
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        if beneath:
            raise BeneathUnsupported(errno.ENOSYS, "no new mount API") from None
        return _attach_classic(tree, target)
    try:
        attr = _MountAttr(
            _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, _MS_PRIVATE, 0
        )
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)
            )
        )
        flags = _MOVE_MOUNT_F_EMPTY_PATH | (_MOVE_MOUNT_BENEATH if beneath else 0)
        try:
            _check(_libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(target), flags))
        except OSError as exc:
            if beneath and exc.errno == errno.EINVAL:
                raise BeneathUnsupported(exc.errno, exc.strerror) from None
            raise
    finally:
        os.close(fd)
    stack = stack_at(target)
    return stack[-2].id if beneath else stack[-1].id


def _attach_classic(tree: Path, target: Path) -> int:
    """mount(2): bind, then remount read-only, then private (kernels before 5.2)."""
    none = ctypes.c_char_p(None)
    _check(_libc.mount(os.fsencode(tree), os.fsencode(target), none, _MS_BIND, none))
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    _check(_libc.mount(none, os.fsencode(target), none, flags, none))
    _check(_libc.mount(none, os.fsencode(target), none, _MS_PRIVATE, none))
    return stack_at(target)[-1].id


def detach(target: Path, mount_id: int) -> str:
    """Unmount the mount ``mount_id`` on ``target`` if it is the visible one.

    Returns "unmounted", "detached" (lazily: it was busy), "gone" (not there any
    more) or "covered" (something else was mounted on top: left alone).
    """
    stack = stack_at(target)
    if mount_id not in {e.id for e in stack}:
        return "gone"
    if stack[-1].id != mount_id:
        return "covered"
    try:
        return unmount_exact(target, mount_id)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    return unmount_exact(target, mount_id, lazy=True)


def unmount_exact(
    target: Path, mount_id: int, *, device: str | None = None, lazy: bool = False
) -> str:
    """Unmount the mount ``mount_id`` if ``target`` leads to it, never another one.

    The path is opened ``O_PATH`` (no request reaches a FUSE file system) and
    the handle's mount id compared (with ``device`` too: mount ids are reused
    once freed, a live file system's device is not). ``lazy``: ``umount2`` is
    given the handle's ``/proc/self/fd`` path, so a mount made on ``target``
    since the check is never the one detached. Not lazy, the handle would keep
    the mount busy: it is closed and the path unmounted (``OSError`` EBUSY if
    files are open in it); the check just before makes another mount there
    unlikely, not impossible. Returns "unmounted", "detached" or "covered"
    (the path leads to another mount: left alone).
    """
    fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        held = fd_mount_id(fd)  # the handle pins that mount: its id cannot be reused now
        if held != mount_id:
            return "covered"
        if device is not None and device not in {e.device for e in mountinfo() if e.id == held}:
            return "covered"
        if lazy:
            _check(_libc.umount2(os.fsencode(f"/proc/self/fd/{fd}"), _MNT_DETACH))
            return "detached"
    finally:
        os.close(fd)
    _check(_libc.umount2(os.fsencode(target), _UMOUNT_NOFOLLOW))
    return "unmounted"


def fd_mount_id(fd: int) -> int | None:
    """The id of the mount an open file is on (``mnt_id`` in /proc/self/fdinfo)."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "mnt_id":
            return int(value)
    return None


def syncfs(path: Path) -> None:
    """Flush the file system that holds ``path``: what a tree links is on disk before binding."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _check(_libc.syncfs(fd))
    finally:
        os.close(fd)


# ---- trees of hard links ---------------------------------------------------------


@dataclass(frozen=True)
class TreeEntry:
    rel: str  # path of the file relative to the dataset's directory
    source: Path | None  # the complete cache file; None for an empty object (no file cached)
    size: int
    mtime_ns: int


def build_tree(
    dest: Path,
    entries: list[TreeEntry],
    dirs: frozenset[str] = frozenset(),
    *,
    dir_mode: int = 0o755,
) -> None:
    """Make ``dest`` a tree of hard links to the cache files: dirs ``dir_mode``, files 0444.

    ``dirs`` are directories the tree has even with no file in them (what the
    FUSE view shows for a ``dir/`` marker key, or above a key it skips).
    """
    if dest.exists():
        shutil.rmtree(dest)
    # 0755 inside the 0700 cache dir: reachable only through the bind.
    dest.mkdir(mode=dir_mode)
    os.chmod(dest, dir_mode)
    for rel in sorted(tree_dirs(entries, dirs)):
        directory = dest / rel
        directory.mkdir(mode=dir_mode)
        os.chmod(directory, dir_mode)
    for entry in entries:
        place(dest / entry.rel, entry)


def place(path: Path, entry: TreeEntry) -> None:
    """One file of a tree: an empty 0444 file, or a hard link to its cache file."""
    if entry.source is None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
        os.chmod(path, 0o444)
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
        return
    # The link shares the cache file's inode: its mode and mtime are the cache file's.
    os.chmod(entry.source, 0o444)
    os.utime(entry.source, ns=(entry.mtime_ns, entry.mtime_ns))
    os.link(entry.source, path)


def tree_dirs(entries: list[TreeEntry], dirs: frozenset[str]) -> set[str]:
    """Every directory of the tree below its root: ``dirs``, and above every file and dir."""
    out: set[str] = set()
    for rel in [*(e.rel for e in entries), *(d + "/x" for d in dirs)]:
        parts = rel.split("/")
        out.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    return out


def tree_matches(dest: Path, entries: list[TreeEntry], dirs: frozenset[str] = frozenset()) -> bool:
    """Whether ``dest`` holds exactly these files (each a 0444 link to its cache file) and dirs."""
    found: set[str] = set()
    found_dirs: set[str] = set()
    try:
        for dirpath, dirnames, filenames in os.walk(dest, onerror=_raise):
            rel_dir = os.path.relpath(dirpath, dest)
            found.update(os.path.normpath(os.path.join(rel_dir, f)) for f in filenames)
            found_dirs.update(os.path.normpath(os.path.join(rel_dir, d)) for d in dirnames)
        if found != {e.rel for e in entries} or found_dirs != tree_dirs(entries, dirs):
            return False
        for entry in entries:
            st = os.lstat(dest / entry.rel)
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                return False
            if stat.S_IMODE(st.st_mode) != 0o444:
                return False
            if entry.source is not None:
                src = os.stat(entry.source)
                if (src.st_ino, src.st_dev) != (st.st_ino, st.st_dev):
                    return False
    except OSError:
        return False
    return True


def _raise(exc: OSError) -> None:
    raise exc


def remove_tree(path: Path) -> None:
    """Unlink a tree's links (open readers keep their inodes); rename first, so it is atomic."""
    if not path.exists():
        return
    aside = path.with_name(path.name + ".old")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    shutil.rmtree(aside)

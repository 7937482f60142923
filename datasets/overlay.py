"""Read-only overlays: a verified tree of hard links over a FUSE directory, the rest through FUSE.

A bind of a tree (`datasets.binds`) replaces the whole directory, so it can
serve only a complete dataset. An overlay ``ro, lowerdir=TREE:FUSEDIR``
mounted on FUSEDIR serves every file the tree has from the cache disk (the
kernel, no daemon on the path) and looks every other name up in the FUSE
directory below; directory listings are merged. So a shard, a dataset at the
mount root and files complete in the cache can all be kernel-served, while
``ls`` still shows the whole dataset and the other files read lazily.

Measured on Linux 6.18 against a real mount (bench/README.md, "Overlays"):
- Read-only with no upper layer: every write is EROFS and no copy-up can happen.
- A lower layer must not change while mounted: a file added to a mounted tree
  is seen only by names no one has looked up yet, and a tree removed while
  mounted lists its directories as *empty*. So a tree is never changed once
  mounted: a new tree gets a new overlay, attached *beneath* the old one
  (``MOVE_MOUNT_BENEATH``), and the old one is detached (`swap`), as binds do.
- The FUSE layer is named by an ``O_PATH`` handle taken before the first
  overlay covers the directory (`open_below`): by path, a second overlay would
  stack on the first one instead of on FUSE.
- ``xino=auto``: every file shows the overlay's ``st_dev``, with its inode
  number tagged by layer (a tree file keeps the cache file's number: stable
  across swaps); without it each layer shows a device of its own.
- The overlay's source is ``s3cachefs`` (`SOURCE`): a restarted daemon finds
  the overlays a dead one left (`leftovers`).

Blocking functions only: the caller runs them in worker threads (a lookup of
the FUSE directory is answered by this daemon's trio thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from s3cachefs.datasets import binds

SOURCE = "s3cachefs"  # the overlay's source in mountinfo: how ours are told from others

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

# Syscall numbers of the new mount API: the same on every architecture but alpha.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_AT_FDCWD = -100
_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_SET_FD = 5
_FSCONFIG_CMD_CREATE = 6
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_BENEATH = 0x200


class OverlayUnsupported(OSError):
    """This kernel cannot make the overlay (no fsopen, no overlayfs, or no MOVE_MOUNT_BENEATH)."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unavailable() -> str | None:
    """Why overlays cannot serve datasets on this kernel, or None.

    Needs overlayfs, the new mount API with ``lowerdir+`` (Linux 6.8) and
    ``MOVE_MOUNT_BENEATH`` (6.5) for swaps.
    """
    release = os.uname().release
    found = re.match(r"(\d+)\.(\d+)", release)
    if found is None or (int(found[1]), int(found[2])) < (6, 8):
        return f"Linux {release} is older than 6.8 (overlay lowerdir+, MOVE_MOUNT_BENEATH)"
    fs = _libc.syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    if fs < 0:
        return f"no overlayfs ({os.strerror(ctypes.get_errno())})"
    os.close(fs)
    return None


def open_below(path: Path) -> int:
    """An ``O_PATH`` handle on the FUSE directory an overlay will cover (close it when done).

    Taken before the first overlay is mounted on ``path``: the handle names the
    FUSE directory itself, whatever is mounted on it later.
    """
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if binds.stack_at(path) and _fstype(fd) == "overlay":
        os.close(fd)
        raise OSError(errno.EBUSY, f"{path} is covered by an overlay already")
    return fd


def _fstype(fd: int) -> str:
    mount_id = binds.fd_mount_id(fd)
    return next((e.fstype for e in binds.mountinfo() if e.id == mount_id), "")


def make(tree: Path | Sequence[Path], below: int) -> int:
    """A detached read-only overlay of ``tree`` (or of several trees, the top one first)
    over the directory ``below`` is; its mount fd."""
    layers = [tree] if isinstance(tree, Path) else list(tree)
    try:
        fs = _check(_libc.syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC), "fsopen overlay")
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.ENODEV):
            raise OverlayUnsupported(exc.errno, str(exc)) from None
        raise
    try:
        _config(fs, _FSCONFIG_SET_STRING, b"source", SOURCE.encode())
        for layer in layers:
            tree_fd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _lower(fs, tree_fd, layer)
            finally:
                os.close(tree_fd)
        _lower(fs, below, Path(f"/proc/self/fd/{below}"))
        _config(fs, _FSCONFIG_SET_FLAG, b"ro")
        try:  # one st_dev for the whole overlay; a kernel without it still serves
            _config(fs, _FSCONFIG_SET_STRING, b"xino", b"auto")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        _config(fs, _FSCONFIG_CMD_CREATE, None)
        attrs = _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
        return _check(_libc.syscall(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, attrs), "fsmount")
    finally:
        os.close(fs)


def _config(fs: int, cmd: int, key: bytes | None, value: bytes | None = None, aux: int = 0) -> None:
    _check(_libc.syscall(_SYS_FSCONFIG, fs, cmd, key, value, aux), f"fsconfig {key!r}")


def _lower(fs: int, fd: int, path: Path) -> None:
    """Append a lower layer, the top one first: by handle (Linux 6.13), else by path (6.8)."""
    try:
        _config(fs, _FSCONFIG_SET_FD, b"lowerdir+", None, fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _config(fs, _FSCONFIG_SET_STRING, b"lowerdir+", os.fsencode(path))


def attach(mount_fd: int, target: Path, *, beneath: bool = False) -> int:
    """Attach a detached mount on ``target`` (under the mount there, with ``beneath``);
    closes ``mount_fd``; returns the new mount's id."""
    try:
        mount_id = binds.fd_mount_id(mount_fd)
        flags = _MOVE_MOUNT_F_EMPTY_PATH | (_MOVE_MOUNT_BENEATH if beneath else 0)
        try:
            _check(
                _libc.syscall(
                    _SYS_MOVE_MOUNT, mount_fd, b"", _AT_FDCWD, os.fsencode(target), flags
                ),
                "move_mount",
            )
        except OSError as exc:
            if beneath and exc.errno == errno.EINVAL:
                raise OverlayUnsupported(exc.errno, str(exc)) from None
            raise
    finally:
        os.close(mount_fd)
    if mount_id is None:
        raise OSError(errno.EIO, "no mount id for the new overlay")
    return mount_id


def mount(tree: Path | Sequence[Path], below: int, target: Path) -> int:
    """Mount the overlay of ``tree`` over ``below`` on ``target`` (nothing of ours there yet)."""
    return attach(make(tree, below), target)


def swap(tree: Path | Sequence[Path], below: int, target: Path, previous: int) -> tuple[int, str]:
    """Replace overlay ``previous`` on ``target`` by one of ``tree``: attached beneath it, then
    ``previous`` detached (lazily if busy; its open files keep reading). Readers see the old
    overlay, then the new one, never the bare FUSE directory. Returns the new id and what
    became of the old one (`binds.detach`)."""
    mount_id = attach(make(tree, below), target, beneath=True)
    return mount_id, binds.detach(target, previous)


def unmount(target: Path, mount_id: int) -> str:
    """Unmount our overlay ``mount_id`` from ``target`` if it is the visible mount there."""
    return binds.detach(target, mount_id)


@dataclass(frozen=True)
class Overlay:
    """An overlay found in mountinfo, with its layers, the top one first."""

    id: int
    parent: int
    mount_point: str
    source: str
    layers: tuple[str, ...]


def _unescape(field: str) -> str:
    raw = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
    return raw.encode("latin-1").decode("utf-8", "surrogateescape")


def overlays(pid: int | str = "self") -> list[Overlay]:
    """Every overlay in the mount namespace of ``pid``, from mountinfo."""
    found = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text("latin-1").splitlines():
        fields = line.split()
        sep = fields.index("-", 6)
        if fields[sep + 1] != "overlay":
            continue
        options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        layers: list[str] = []
        for option in options:
            name, _, value = option.partition("=")
            if name == "lowerdir+":
                layers.append(_unescape(value))
            elif name == "lowerdir":
                layers.extend(_unescape(value).split(":"))
        found.append(
            Overlay(
                int(fields[0]),
                int(fields[1]),
                _unescape(fields[4]),
                fields[sep + 2],
                tuple(layers),
            )
        )
    return found


def leftovers(trees: Path, under: Path) -> list[Overlay]:
    """Our overlays on ``under`` or below it whose tree lies in ``trees``, topmost last:
    what a daemon that died left (a restart unmounts them before it mounts FUSE)."""
    prefix = str(under).rstrip("/") + "/"
    tree_prefix = str(trees).rstrip("/") + "/"
    return [
        o
        for o in overlays()
        if o.source == SOURCE
        and (o.mount_point == str(under) or o.mount_point.startswith(prefix))
        and o.layers
        and o.layers[0].startswith(tree_prefix)
    ]

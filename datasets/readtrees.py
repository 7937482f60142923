"""The trees of files cached by reading (`datasets.readserve`): ``CACHE/v1/trees/read-N``.

Each is a tree of hard links to cache files, built whole and synced before it
is mounted as one layer of the root overlay, never changed after. A daemon's
read trees live as long as its overlay: at start no overlay of a dead daemon is
left (`daemon.mountpoint` removes them before the FUSE mount), so they all go,
and the objects linked in them (``read-N.oids``) are freed whole: the holds
died with that daemon, and eviction must never punch a file still open.

Blocking functions (the caller runs them in worker threads), but `live` and `free_left`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets import binds, overlay

PREFIX = "read-"
OIDS = ".oids"


def is_read_tree(path: Path) -> bool:
    return path.name.startswith(PREFIX) and not path.name.endswith(OIDS)


def oids_file(tree: Path) -> Path:
    """The cache objects linked in ``tree``, one a line: beside it, never in a layer."""
    return tree.with_name(tree.name + OIDS)


def sweep(trees: Path) -> set[str]:
    """Remove every read tree a daemon before this one left; the objects linked in them
    (to be freed whole: a reader of a lazily detached overlay may still have one open)."""
    trees.mkdir(mode=0o700, parents=True, exist_ok=True)
    linked: set[str] = set()
    for path in trees.iterdir():
        if path.name.startswith(PREFIX) and path.name.endswith(OIDS):
            linked.update(path.read_text().split())
    for path in trees.iterdir():
        if is_read_tree(path):
            shutil.rmtree(path, ignore_errors=True)
    for path in trees.iterdir():
        if path.name.startswith(PREFIX):
            path.unlink(missing_ok=True)
    return linked


async def free_left(cache: BlockCache) -> None:
    """`sweep`, then free the objects linked there whole. Before the FUSE loop answers,
    whether or not this daemon serves reads: a read first would cache an object again into
    the inode this then frees, and that file would never reach the overlay."""
    left = await trio.to_thread.run_sync(sweep, cache.root / "trees")
    await cache.free(left - cache.pinned)


def build(tree: Path, entries: list[binds.TreeEntry], oids: set[str], *, allow_other: bool) -> None:
    """Build ``tree`` (a layer; may be empty of files), note its ``oids``, sync to disk.

    overlayfs reaches every layer, FUSE's too, with the mounter's (root's)
    creds, so FUSE's "only the mounting user" rule never applies under it; the
    overlay's dirs take their modes from the top layer: 0700 (root only, as
    FUSE without allow_other) unless ``allow_other``."""
    tree.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    oids_file(tree).write_text("".join(f"{oid}\n" for oid in sorted(oids)))
    binds.build_tree(tree, entries, dir_mode=0o755 if allow_other else 0o700)
    binds.syncfs(tree.parent)


def strip(trees: list[Path]) -> None:
    """Unlink the files of retired ``trees``, keep their directories: a lazily detached
    overlay still walked finds no file there (lookups fall through to FUSE) and lists
    each directory merged with FUSE's, never an empty one."""
    for tree in trees:
        for dirpath, _, filenames in os.walk(tree):
            for name in filenames:
                Path(dirpath, name).unlink(missing_ok=True)
        oids_file(tree).unlink(missing_ok=True)


def remove(trees: list[Path]) -> None:
    for tree in trees:
        shutil.rmtree(tree, ignore_errors=True)
        oids_file(tree).unlink(missing_ok=True)


def attach(mountpoint: Path, below: int, layers: list[Path]) -> int:
    """Mount the overlay of ``layers`` over FUSE (``below``) on ``mountpoint``: refused
    where anything but FUSE is on top."""
    stack = binds.stack_at(mountpoint)
    if stack and not stack[-1].fstype.startswith("fuse"):
        raise OSError(f"{mountpoint}: another mount is on it")
    return overlay.mount(layers, below, mountpoint)


async def live(mount_id: int) -> bool:
    """Whether mount ``mount_id`` is still mounted (someone may have unmounted it)."""
    entries = await trio.to_thread.run_sync(binds.mountinfo)
    return any(e.id == mount_id for e in entries)


def detach_ours(mountpoint: Path, trees: Path) -> None:
    """Detach (lazily if busy) every overlay on ``mountpoint`` whose layers are ``trees``'
    read trees, top first, whatever this daemon's records say (a swap was in flight)."""
    for found in reversed(overlay.overlays()):
        ours = any(Path(layer).parent == trees for layer in found.layers)
        if found.mount_point == str(mountpoint) and ours:
            binds.detach(mountpoint, found.id)

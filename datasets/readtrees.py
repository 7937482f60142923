"""The trees of files cached by reading (`datasets.readserve`): ``CACHE/v1/trees/read-N``.

Each is a tree of hard links to cache files, built whole and synced before it
is mounted as one layer of the root overlay, never changed after. A daemon's
read trees live as long as its overlay: at start no overlay of a dead daemon is
left (`daemon.mountpoint` removes them before the FUSE mount), so they all go.

Blocking functions only (the caller runs them in worker threads).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from s3cachefs.datasets import binds

PREFIX = "read-"


def is_read_tree(path: Path) -> bool:
    return path.name.startswith(PREFIX)


def sweep(trees: Path) -> None:
    """Every read tree a daemon before this one left."""
    trees.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in trees.iterdir():
        if is_read_tree(path):
            shutil.rmtree(path, ignore_errors=True)


def build(tree: Path, entries: list[binds.TreeEntry]) -> None:
    """Build ``tree`` (a layer; may be empty of files) and sync it to disk."""
    tree.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    binds.build_tree(tree, entries)
    binds.syncfs(tree.parent)


def remove(trees: list[Path]) -> None:
    for tree in trees:
        shutil.rmtree(tree, ignore_errors=True)

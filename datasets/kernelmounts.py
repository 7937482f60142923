"""How a kernel-served dataset is mounted: an overlay of its tree over the FUSE directory,
or, where overlays cannot be made, a bind of the tree over it.

- ``overlay`` (Linux >= 6.8, `datasets.overlay`): ``ro, lowerdir=TREE:FUSEDIR``
  on the dataset's directory (the mountpoint itself for a dataset at the mount
  root). Files of the tree are served by the kernel; every other name falls
  through to FUSE, listings are merged. So shards and a dataset at the mount
  root are kernel-served too, while ``ls`` shows the whole dataset.
- ``bind`` (the fallback, `datasets.binds`): the tree replaces the directory,
  so only a complete, unsharded dataset below the mount root may be bound.

Both swap a new tree in *beneath* the old mount, then detach the old one. The
FUSE directory under an overlay is held by an ``O_PATH`` handle taken before
the first overlay on it (`overlay.open_below`), closed when the last overlay
there is gone, or its mount failed (an open handle would keep the FUSE mount
busy at unmount): `keep_only`.

Blocking functions only; `datasets.kernelserve` calls them in worker threads,
one at a time (under its lock).
"""

from __future__ import annotations

import os
from pathlib import Path

from s3cachefs.datasets import binds, overlay
from s3cachefs.datasets.kerneltrees import Bind

OVERLAY = "overlay"
BIND = "bind"


def choose(enabled: bool) -> tuple[str, str | None]:
    """The kind of mount this daemon uses, and why not overlays (None if it uses them)."""
    if not enabled or os.geteuid() != 0:
        return BIND, None  # nothing is mounted at all: no line to log
    why = overlay.unavailable()
    return (BIND, why) if why else (OVERLAY, None)


class KernelMounts:
    """The mounts of one daemon's kernel-served datasets, of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._below: dict[Path, int] = {}  # target -> O_PATH handle on its FUSE directory

    def ready(self, target: Path, replacing: bool) -> bool:
        """The dataset's directory exists in the FUSE view, and nothing but FUSE (or our
        own mount, when ``replacing``) is mounted on it."""
        if self.kind == BIND:
            return binds.target_ready(target, replacing)
        stack = binds.stack_at(target)
        if stack and not replacing and not stack[-1].fstype.startswith("fuse"):
            return False
        os.listdir(target)  # also puts the manifest's listing in: long kernel timeouts
        return os.path.isdir(target)

    def attach(self, tree: Path, target: Path) -> int:
        """Mount ``tree`` on ``target``; returns the mount's id."""
        if self.kind == BIND:
            return binds.attach_ro(tree, target)
        return overlay.mount(tree, self._fuse_dir(target), target)

    def swap(self, tree: Path, previous: Bind) -> tuple[int, str]:
        """Mount ``tree`` beneath ``previous``, then detach ``previous``.

        Returns the new id and what became of the old mount (`binds.detach`).
        Raises `binds.BeneathUnsupported` / `overlay.OverlayUnsupported` where
        the kernel cannot mount beneath (nothing changed then).
        """
        if self.kind == BIND:
            mount_id = binds.attach_ro(tree, previous.target, beneath=True)
            return mount_id, binds.detach(previous.target, previous.mount_id)
        below = self._fuse_dir(previous.target)
        return overlay.swap(tree, below, previous.target, previous.mount_id)

    def detach(self, bind: Bind) -> str:
        """Unmount ``bind`` if it is the visible mount on its target (`binds.detach`)."""
        outcome = binds.detach(bind.target, bind.mount_id)
        if outcome != "covered":
            self.forget(bind.target)
        return outcome

    def forget(self, target: Path) -> None:
        """No overlay of ours on ``target`` any more: close its FUSE handle."""
        fd = self._below.pop(target, None)
        if fd is not None:
            os.close(fd)

    def keep_only(self, targets: set[Path]) -> None:
        """Close the FUSE handles of every target but ``targets`` (where our mounts are):
        those a failed mount or a covered overlay left, or all of them at stop."""
        for target in set(self._below) - targets:
            self.forget(target)

    def _fuse_dir(self, target: Path) -> int:
        if target not in self._below:
            self._below[target] = overlay.open_below(target)
        return self._below[target]

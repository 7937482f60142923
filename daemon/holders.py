"""Who else holds a mount: copies of it in other mount namespaces, and other mount points.

A container runtime (or ``unshare -m``) copies every mount into the new mount
namespace. Unmounting the path here removes only this namespace's copy
(unless the copy receives the unmount by propagation): the FUSE connection
lives on, and so does the daemon, serving the other namespace. `unmount`
asks this module before and after it acts, and says so instead of "unmounted".

A FUSE connection is one file system: every copy of the mount, in any
namespace, has the same device number (``0:NN`` in mountinfo). Namespaces and
processes are read from /proc; processes this user may not inspect are not
seen ("where it can tell").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from s3cachefs.datasets.binds import MountEntry, mountinfo

# Processes named per namespace in a message.
NAMED_PIDS = 4


@dataclass(frozen=True)
class Holder:
    namespace: str  # "mnt:[4026532812]", or "this namespace"
    pids: tuple[int, ...]  # processes in it (all of them; the message names a few)
    mount_points: tuple[str, ...]  # where the copies are mounted there
    follows: bool  # every copy receives an unmount of ours by propagation

    def describe(self) -> str:
        named = ", ".join(f"{pid} {_comm(pid)}" for pid in self.pids[:NAMED_PIDS])
        more = f" and {len(self.pids) - NAMED_PIDS} more" if len(self.pids) > NAMED_PIDS else ""
        where = ", ".join(self.mount_points[:2])
        who = f", processes {named}{more}" if self.pids else ""
        return f"{self.namespace} (at {where}{who})"


def holders(mount: MountEntry, path: str) -> list[Holder]:
    """Other mounts of ``mount``'s file system: in this namespace (not on ``path``), and in
    every other mount namespace this user can read."""
    own_ns = _namespace("self")
    found = []
    here = [
        e.mount_point for e in mountinfo() if e.device == mount.device and e.mount_point != path
    ]
    if here:
        found.append(Holder("this namespace", (), tuple(here), follows=False))
    pids: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ns = _namespace(entry.name)
            if ns is not None and ns != own_ns:
                pids.setdefault(ns, []).append(int(entry.name))
    groups = {t.split(":", 1)[1] for t in mount.tags if t.startswith("shared:")}
    for ns, members in sorted(pids.items()):
        copies = _copies(members, mount.device)
        if copies:
            follows = all(_follows(copy, groups) for copy in copies)
            points = tuple(c.mount_point for c in copies)
            found.append(Holder(ns, tuple(sorted(members)), points, follows))
    return found


def _copies(members: list[int], device: str) -> list[MountEntry]:
    """The mounts of ``device`` in a namespace, as the first readable member process sees it."""
    for pid in members:
        try:
            return [e for e in mountinfo(pid) if e.device == device]
        except OSError:
            continue  # gone, or not ours to read
    return []


def _follows(copy: MountEntry, groups: set[str]) -> bool:
    """A peer (shared:N) or slave (master:N) of our peer group gets our unmount too."""
    return any(t in (f"shared:{g}", f"master:{g}") for g in groups for t in copy.tags)


def _namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"

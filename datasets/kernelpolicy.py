"""Which pinned datasets the kernel may serve, and, for the others, why not.

Kernel-served: complete pinned datasets, whole or sharded, whose files no
check has found damaged, when the daemon may mount (root) and
``--kernel-serve-pinned`` is on. The manifests of one directory (the shards
of one dataset, or a shard and the whole) share one tree (`datasets.kernelserve`).
Refused, with one INFO line, and served through FUSE as before: datasets nested
in one another (a mount on one would hide or stack on the other), anything when
the daemon may not mount, and, where the kernel has no overlays (binds only,
`datasets.kernelmounts`), a shard (a bind would hide the rest of the dataset)
and a dataset at the mount root (a bind over the mountpoint itself).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from s3cachefs.datasets.pins import Manifest


def refusal(
    manifest: Manifest,
    pinned: Iterable[Manifest],
    *,
    enabled: bool,
    bucket: str,
    mount_prefix: str,
    damage: str | None,
    overlays: bool = False,
) -> str | None:
    """Why the kernel must not serve ``manifest``'s dataset, or None. Must not await.

    ``pinned``: every manifest (for nesting); ``damage``: what the last check of its
    files found, if it found damage; ``overlays``: the daemon mounts overlays, not binds.
    """
    nested = [
        other.prefix
        for other in pinned
        if other.prefix != manifest.prefix
        and other.complete
        and (overlays or other.shard is None)
        and (other.prefix.startswith(manifest.prefix) or manifest.prefix.startswith(other.prefix))
    ]
    checks = (
        (not enabled, "off (--no-kernel-serve-pinned)"),
        (
            manifest.bucket != bucket or not manifest.prefix.startswith(mount_prefix),
            "not under this mount",
        ),
        (
            manifest.shard is not None and not overlays,
            "a shard is part of a dataset; served through FUSE (no overlays on this kernel)",
        ),
        (not manifest.complete, "incomplete; served through FUSE"),
        (
            manifest.prefix == mount_prefix and not overlays,
            "the dataset is the mount root; binding over the mountpoint itself is refused",
        ),
        (bool(nested), f"nested with dataset {nested[:1]}; both served through FUSE"),
        (os.geteuid() != 0, "the daemon is not root and cannot mount"),
        (damage is not None, damage or ""),
    )
    return next((reason for failed, reason in checks if failed), None)

"""Which pinned datasets the kernel may serve, and, for the others, why not.

Kernel-served: complete, unsharded datasets below the mount root, not nested
in another complete one, whose files no check has found damaged, when the
daemon may mount (root) and ``--kernel-serve-pinned`` is on. Refused, with one
INFO line (`datasets.kernelserve`), and served through FUSE as before: a
sharded pin (a shard is part of a dataset), a dataset whose directory is the
mount root (binding over the mountpoint itself), datasets nested in one
another, and anything when the daemon may not mount.
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
) -> str | None:
    """Why the kernel must not serve ``manifest``'s dataset, or None. Must not await.

    ``pinned``: every manifest (for nesting); ``damage``: what the last check of its
    files found, if it found damage.
    """
    nested = [
        other.prefix
        for other in pinned
        if other is not manifest
        and other.complete
        and other.shard is None
        and (other.prefix.startswith(manifest.prefix) or manifest.prefix.startswith(other.prefix))
    ]
    checks = (
        (not enabled, "off (--no-kernel-serve-pinned)"),
        (
            manifest.bucket != bucket or not manifest.prefix.startswith(mount_prefix),
            "not under this mount",
        ),
        (manifest.shard is not None, "a shard is part of a dataset; served through FUSE"),
        (not manifest.complete, "incomplete; served through FUSE"),
        (
            manifest.prefix == mount_prefix,
            "the dataset is the mount root; binding over the mountpoint itself is refused",
        ),
        (bool(nested), f"nested with dataset {nested[:1]}; both served through FUSE"),
        (os.geteuid() != 0, "the daemon is not root and cannot bind"),
        (damage is not None, damage or ""),
    )
    return next((reason for failed, reason in checks if failed), None)

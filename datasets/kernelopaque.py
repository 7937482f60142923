"""Opaque directories in a kernel-served tree: what overlayfs need not ask FUSE about.

An overlay ``lowerdir=TREE:FUSEDIR`` merges every directory the tree shares
with the FUSE directory: a readdir reads both layers (one FUSE opendir,
readdir and releasedir per directory), and a lookup of a directory name goes
on to FUSE. With the page cache dropped, a walk of a complete dataset asked
FUSE about every directory and merged each (W4: 0.26-0.52x local disk, about
half the speed of the same overlay with marks; bench/README.md, "W4 through
overlays"). A directory of the tree that already holds
every name the FUSE view shows below it gains nothing from FUSE: it is marked
``trusted.overlay.opaque=y``, which overlayfs honours in any lower layer but
the lowest (Linux 6.18: lookups stop there and readdir reads the tree alone).

"Every name the FUSE view shows" is read from the pin store: inside a pinned
dataset the FUSE view's listings come from the complete manifests (a shard's
with the dataset's listing it recorded) and never expire, whatever
``--metadata-ttl`` says. So a key S3 gains later is shown by neither path
until the next prefetch re-lists it, and then the new manifest's listing
unmarks its directory (a tree whose marks differ is rebuilt: the marks a tree
was built with are recorded with it, `kerneltrees.current`, not read back).
A directory the pin store does not list (a shard of an earlier release with
no recorded listing: S3 lists it) stays merged. The tree's root is never
marked: overlayfs ignores the mark on a layer's root (measured), so the
dataset directory itself is always merged (one FUSE readdir per walk).

Blocking functions only (the caller runs them in worker threads).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from s3cachefs.store.types import Listing

OPAQUE = "trusted.overlay.opaque"
# A file system without trusted xattrs (or a daemon without the right to set them):
# the tree is mounted unmarked (every directory merged, as before), never refused.
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


def opaque_dirs(files: Iterable[str], listings: Mapping[str, Listing | None]) -> frozenset[str]:
    """The directories of a tree to mark opaque.

    ``files``: the tree's files (relative paths); ``listings``: every directory of
    the tree below its root (relative, no trailing "/") and what the FUSE view
    lists in it (None: not answered from the pin store).
    """
    names: dict[str, set[str]] = {rel: set() for rel in listings}
    names[""] = set()
    for rel in [*files, *listings]:
        parent, _, name = rel.rpartition("/")
        names.setdefault(parent, set()).add(name)
    complete: dict[str, bool] = {}
    for rel in sorted(listings, key=lambda d: d.count("/"), reverse=True):  # deepest first
        listing = listings[rel]
        held = names[rel]
        complete[rel] = (
            listing is not None
            and all(_name(o.key) in held for o in listing.objects)
            and all(_name(p) in held for p in listing.prefixes)
            and all(complete.get(f"{rel}/{name}", True) for name in held)
        )
    return frozenset(rel for rel, ok in complete.items() if ok)


def _name(key: str) -> str:
    return key.rstrip("/").rpartition("/")[2]


def mark(tree: Path, opaque: Iterable[str]) -> str | None:
    """Mark these directories of ``tree`` opaque (before it is mounted: a mounted tree is
    never changed). None if marked; why not if this file system cannot hold the mark."""
    for rel in sorted(opaque):
        try:
            os.setxattr(tree / rel, OPAQUE, b"y")
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return f"{OPAQUE}: {os.strerror(exc.errno)}"
            raise
    return None


def marks(tree: Path) -> frozenset[str] | None:
    """The directories of ``tree`` marked opaque; None if this file system cannot hold marks.

    A walk of the whole tree (0.5 s on 200k files): for checks by hand and tests; the
    daemon trusts the record the tree was synced with (`kerneltrees.current`).
    """
    found = set()
    for dirpath, dirnames, _ in os.walk(tree):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            try:
                value = os.getxattr(path, OPAQUE, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    continue
                if exc.errno in _UNSUPPORTED:
                    return None
                raise
            if value == b"y":
                found.add(os.path.relpath(path, tree))
    return frozenset(found)

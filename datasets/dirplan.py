"""What a `sync` must do to DEST: list the dataset, compare with the manifest (`plan`).

The listing follows the FUSE view's naming rules (`store.keys`): directory
markers are not files, a key with a segment that cannot be a file name is
skipped, and a key that is also a directory (``a`` and ``a/b``) loses to the
directory; the sync's own state folder name (``.s3cachefs``) is reserved at
the top. Each skip is one WARNING with the count and the first keys.

An object is already in DEST when the manifest records it verified at the
same ETag and size and the file is still there with the size and mtime that
run gave it; anything else is fetched again (`verify --dir` re-reads the
bytes themselves). A path whose directory resolves out of DEST (a symlinked
directory) is refused, one WARNING each: the sync never writes nor deletes
outside DEST (`leaves_dest`).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from s3cachefs.datasets.dirmanifest import STATE_DIR, DirManifest, Entry
from s3cachefs.datasets.pins import Shard
from s3cachefs.store.keys import valid_name
from s3cachefs.store.types import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)
SKIPPED_SHOWN = 5


@dataclass
class Listed:
    """The dataset (or the shard) as S3 lists it: path relative to DEST -> version."""

    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # keys that cannot be files in DEST
    # Every valid key of the dataset (all shards): a shard's sync never deletes the others'.
    all_keys: set[str] = field(default_factory=set)


def list_dataset(store: ObjectStore, prefix: str, shard: Shard | None) -> Listed:
    """Every object under ``prefix`` that can be a file in DEST (blocking: StoreError)."""
    listed = Listed()
    files: dict[str, ObjectInfo] = {}
    for page in store.list_tree(prefix):
        for info in page:
            if info.key.endswith("/"):
                continue  # a directory marker
            rel = info.key[len(prefix) :]
            parts = rel.split("/")
            if not all(valid_name(p) for p in parts) or parts[0] == STATE_DIR:
                listed.skipped.append(info.key)
                continue
            files[rel] = info
    dirs = {rel.rsplit("/", 1)[0] for rel in files if "/" in rel}
    dirs = {"/".join(d.split("/")[: i + 1]) for d in dirs for i in range(d.count("/") + 1)}
    for rel, info in files.items():
        if rel in dirs:  # both a file and a directory: the directory wins
            listed.skipped.append(info.key)
            continue
        listed.all_keys.add(rel)
        if shard is None or shard.holds(info.key):
            listed.objects[rel] = info
    if listed.skipped:
        shown = ", ".join(sorted(listed.skipped)[:SKIPPED_SHOWN])
        log.warning(
            "sync skipped %d keys under %s that cannot be file names here "
            "(bad segment, a file that is also a directory, or %s): %s",
            len(listed.skipped),
            prefix or "the bucket",
            STATE_DIR,
            shown,
        )
    return listed


@dataclass
class Plan:
    fetch: dict[str, ObjectInfo] = field(default_factory=dict)  # new or changed
    present: dict[str, Entry] = field(default_factory=dict)  # verified earlier, unchanged
    gone: dict[str, Entry] = field(default_factory=dict)  # in DEST, no longer listed
    refused: dict[str, ObjectInfo] = field(default_factory=dict)  # would land outside DEST

    @property
    def bytes_needed(self) -> int:
        return sum(info.size for info in self.fetch.values())


def plan(dest: Path, manifest: DirManifest, listed: Listed) -> Plan:
    """What is to fetch, what is there already, what S3 (or the shard) no longer has."""
    result = Plan()
    outside: dict[str, str | None] = {}  # folder -> where it leads out of DEST (one check)
    for rel, info in listed.objects.items():
        entry = manifest.objects.get(rel) or manifest.kept.get(rel)
        folder = rel.rpartition("/")[0]
        if folder and folder not in outside:
            outside[folder] = _leads_out(dest, folder)
        if folder and outside[folder] is not None:
            _refused(rel, dest, outside[folder])
            result.refused[rel] = info
        elif entry is not None and _unchanged(dest / rel, entry, info):
            result.present[rel] = entry
        else:
            result.fetch[rel] = info
    for rel, entry in [*manifest.objects.items(), *manifest.kept.items()]:
        if rel not in listed.objects:
            result.gone[rel] = entry
    return result


def leaves_dest(dest: Path, rel: str) -> bool:
    """True (and one WARNING) if DEST/``rel``'s directory resolves outside DEST (a symlinked
    directory in DEST): the sync never writes nor deletes there. A path is checked just
    before use; a symlink swapped in between is the DEST owner's own doing."""
    where = _leads_out(dest, rel.rpartition("/")[0])
    if where is not None:
        _refused(rel, dest, where)
    return where is not None


def _leads_out(dest: Path, folder: str) -> str | None:
    """Where DEST/``folder`` resolves, if that is outside DEST (else None)."""
    top = os.path.realpath(dest)
    real = os.path.realpath(dest / folder)
    return None if real == top or real.startswith(top + "/") else real


def _refused(rel: str, dest: Path, where: str | None) -> None:
    log.warning("sync refused %s: its directory leads out of %s (to %s)", rel, dest, where)


def prune(folder: Path, top: Path) -> None:
    """Remove directories emptied by deletes, up to (not including) DEST."""
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _unchanged(path: Path, entry: Entry, info: ObjectInfo) -> bool:
    if (entry.etag, entry.size) != (info.etag, info.size):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode) and st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns
    )

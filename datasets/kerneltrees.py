"""The trees of hard links kernel-served datasets are made of, under ``CACHE/v1/trees/``.

A complete pinned dataset's cache files are byte-exact copies of its objects
(`cache.blockcache`), so a tree of hard links to them (dirs 0755, files 0444;
the cache dir itself stays 0700, so a tree is reachable only through its bind)
is the dataset as a plain directory. Per manifest id::

    trees/<id>          the tree (bound over the dataset by `datasets.kernelserve`)
    trees/<id>.next     a tree being built; promoted to <id> once bound
    trees/<id>.synced   records that <id> was ``syncfs``'d after it was built, and
                        the opaque marks it was built with (JSON, `Synced`)
    trees/<id>.old      the tree the last swap replaced (`promote`)
    trees/<id>.pre      files linked while a first prefetch ran (`datasets.kernelprestage`)

A tree is built completely before it is bound; it is ``syncfs``'d and its
``.synced`` record written after (`seal`): the page cache serves the same bytes
meanwhile, and a flush of the gigabytes a prefetch just wrote would hold its
reply. A tree without its ``.synced`` record (not sealed yet, crash, power
loss), or one that no longer matches its
manifest, is built again from the cache files, which the check at start has
just read back against their block CRC32s (not S3's digest: that is `verify`'s).
The tree shows the same directories as the FUSE view: those of its files, and
those the manifest keeps for ``dir/`` markers and skipped keys. Those holding
every name the FUSE view lists are marked opaque for the overlay
(`datasets.kernelopaque`); the marks are part of what a current tree matches,
compared by its record (a tree synced before marks were recorded is rebuilt once).
A tree that cannot be read is not current: its rebuild fails like any mount.

Blocking functions only (the caller runs them in worker threads).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets import binds, kernelopaque
from s3cachefs.store.types import ObjectInfo

log = logging.getLogger(__name__)


class Layout(NamedTuple):
    entries: list[binds.TreeEntry]
    dirs: frozenset[str]  # relative, without a trailing "/"
    versions: list[ObjectVersion | None]  # of each entry; None for an empty object
    oids: frozenset[str]  # of every object of the manifest (the tree's pin-store hold)
    # Directories marked opaque for the overlay (`datasets.kernelopaque`): set once merged.
    opaque: frozenset[str] = frozenset()


class Synced(NamedTuple):
    """A synced tree's record: the directories it marks opaque; None if its file system
    could not hold the marks (``why``: every directory is merged with the FUSE view)."""

    opaque: frozenset[str] | None
    why: str = ""

    def dumps(self) -> str:
        marks = None if self.opaque is None else sorted(self.opaque)
        return json.dumps({"opaque": marks, "why": self.why})


class Staged(NamedTuple):
    fresh: bool  # built at the ``.next`` path (else ``tree`` was current)
    record: Synced  # what its ``.synced`` record says (or will, once promoted)


@dataclass
class Bind:
    """A tree mounted read-only over its dataset's directory (an overlay or a bind).

    One per dataset directory: the shards (and the whole) of one dataset pinned
    here share it, their files merged in one tree (``members``: their manifest ids).
    """

    manifest_id: str  # the tree's id: `group_id` of the dataset's prefix
    target: Path
    tree: Path
    mount_id: int
    owner: str  # the pin-store hold that keeps the tree's objects pinned
    oids: frozenset[str]
    members: frozenset[str] = frozenset()  # empty: the manifest ``manifest_id`` alone
    kind: str = "bind"  # or "overlay" (`datasets.kernelmounts`)
    prefix: str = ""
    opaque: frozenset[str] | None = frozenset()  # its marks (None: not held, `Synced`)

    @property
    def ids(self) -> frozenset[str]:
        return self.members or frozenset({self.manifest_id})


def layout_of(
    cache: BlockCache,
    bucket: str,
    prefix: str,
    objects: list[ObjectInfo],
    manifest_dirs: list[str],
    others: Sequence[str] = (),
) -> Layout | None:
    """The tree of these objects; None if one is not complete in the cache.

    ``others``: the dataset's other keys (a shard's manifest lists them), which
    may hide a file behind a directory of the same name. Reads the cache's
    records (lookups only, no iteration: thread-safe).
    """
    dirs = frozenset(d[len(prefix) :].rstrip("/") for d in manifest_dirs)
    keys = [*(i.key for i in objects), *others]
    parents = {
        "/".join(parts[:depth])
        for rel in [*(k[len(prefix) :] for k in keys), *(d + "/" for d in dirs)]
        for parts in [rel.split("/")]
        for depth in range(1, len(parts))
    }
    entries, versions, oids = [], [], set()
    for info in objects:
        version = ObjectVersion(bucket, info.key, info.etag, info.size)
        oids.add(version.oid)
        rel = info.key[len(prefix) :]
        if rel in parents:
            continue  # hidden by the directory of the same name, as in the FUSE view
        if info.size and cache.missing_blocks(version):
            return None
        source = cache.object_path(version.oid) if info.size else None
        entries.append(binds.TreeEntry(rel, source, info.size, info.mtime_ns))
        versions.append(version if info.size else None)
    return Layout(entries, dirs, versions, frozenset(oids))


def merge(layouts: list[Layout]) -> Layout:
    """One tree of several manifests of one dataset (shards, or a shard and the whole).

    A path two of them have comes from the first (the caller orders them, newest
    first); a file that is a directory in another one is left out, as in the FUSE view.
    """
    if len(layouts) == 1:
        return layouts[0]
    dirs = frozenset().union(*(layout.dirs for layout in layouts))
    entries: dict[str, tuple[binds.TreeEntry, ObjectVersion | None]] = {}
    for layout in layouts:
        for entry, version in zip(layout.entries, layout.versions, strict=True):
            entries.setdefault(entry.rel, (entry, version))
    parents = binds.tree_dirs([e for e, _ in entries.values()], dirs)
    kept = [(e, v) for rel, (e, v) in sorted(entries.items()) if rel not in parents]
    oids = frozenset().union(*(layout.oids for layout in layouts))
    return Layout([e for e, _ in kept], dirs, [v for _, v in kept], oids)


def next_path(tree: Path) -> Path:
    return tree.with_name(f"{tree.name}.next")


def synced_path(tree: Path) -> Path:
    return tree.with_name(f"{tree.name}.synced")


def synced(tree: Path) -> Synced | None:
    """The record ``tree`` was synced with; None if there is none, or none this daemon
    reads (an empty one, written before marks were recorded; one a crash cut short)."""
    try:
        data = json.loads(synced_path(tree).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(data, dict) or "opaque" not in data:
        return None
    opaque, why = data["opaque"], data.get("why")
    if opaque is not None and not (
        isinstance(opaque, list) and all(isinstance(d, str) for d in opaque)
    ):
        return None
    return Synced(None if opaque is None else frozenset(opaque), str(why or ""))


def current(tree: Path, layout: Layout, unsealed: Synced | None = None) -> Synced | None:
    """The record of ``tree`` if it was synced with the marks ``layout`` wants (or none, where
    its file system cannot hold them) and still matches ``layout``'s files; else None.
    ``unsealed``: the record of a tree this daemon built and has not sealed yet.

    Never raises an OSError: a tree that cannot be read is not current, and its rebuild
    goes through the caller's handling of a failed mount (the daemon stays up).
    """
    try:
        record = unsealed or synced(tree)
        if record is None or record.opaque not in (None, layout.opaque):
            return None
        return record if binds.tree_matches(tree, layout.entries, layout.dirs) else None
    except OSError as exc:
        log.warning("kernel-serve tree %s unreadable (%s): built again", tree, exc)
        return None


def sweep(trees: Path, manifest_ids: Container[str]) -> None:
    """Trees whose build or swap a crash interrupted, and trees of forgotten manifests."""
    trees.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in trees.iterdir():
        if path.name.startswith("read-"):  # `datasets.readtrees`: the root overlay's own
            continue
        name = path.name.split(".")[0]
        leftover = path.is_dir() and path.name != name
        if leftover:
            discard(path)
        elif name not in manifest_ids:
            if path.is_dir():
                binds.remove_tree(path)
            else:
                path.unlink(missing_ok=True)


def stage(tree: Path, layout: Layout, unsealed: Synced | None = None) -> Staged:
    """Build the tree at its ``.next`` path unless ``tree`` is current (not synced: `seal`);
    from its ``.pre`` if there is one."""
    tree.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = current(tree, layout, unsealed)
    if record is not None:
        return Staged(fresh=False, record=record)
    pre = pre_path(tree)
    if pre.is_dir():
        complete(pre, layout.entries, layout.dirs)
        discard(next_path(tree))
        os.replace(pre, next_path(tree))
    else:
        binds.build_tree(next_path(tree), layout.entries, layout.dirs)
    why = kernelopaque.mark(next_path(tree), layout.opaque)
    return Staged(True, Synced(layout.opaque) if why is None else Synced(None, why))


def promote(tree: Path) -> None:
    """The staged tree becomes ``trees/<id>`` (unsealed); the tree it replaces is set aside
    whole.

    Set aside (``<id>.old``), not removed: a swap detaches the old mount lazily,
    and a reader still walking it would see its directories empty if the tree
    were emptied under it (a lower layer must not change). The tree set aside
    one swap earlier goes now; what is left goes at unmount and at start.
    """
    synced_path(tree).unlink(missing_ok=True)
    aside = old_path(tree)
    discard(aside)
    if tree.exists():
        os.replace(tree, aside)
    os.replace(next_path(tree), tree)


def sync(trees: Path) -> None:
    """Flush the file system of the trees: what they link (and the files) is on disk."""
    binds.syncfs(trees)


def seal(tree: Path, record: Synced) -> None:
    """Record that ``tree`` is on disk, with its marks; call after `sync`, only."""
    fd = os.open(synced_path(tree), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:  # lost or cut short by a crash: the tree is built again
        out.write(record.dumps())


def pre_path(tree: Path) -> Path:
    return tree.with_name(f"{tree.name}.pre")


def prelink(pre: Path, entries: list[binds.TreeEntry], dir_mode: int = 0o755) -> None:
    """Link these files into ``pre`` as `binds.build_tree` would; what fails is left to
    `complete` (a name that is a directory in another key, a file freed meanwhile)."""
    if not pre.is_dir():
        pre.mkdir(mode=dir_mode)
        os.chmod(pre, dir_mode)
    for entry in entries:
        path = pre / entry.rel
        try:
            _mkdirs(pre, path.parent, dir_mode)
            binds.place(path, entry)
        except OSError:
            continue


def complete(
    pre: Path, entries: list[binds.TreeEntry], dirs: frozenset[str], dir_mode: int = 0o755
) -> None:
    """Make ``pre`` exactly the tree `binds.build_tree` makes of ``entries`` and ``dirs``:
    what is not one of them (or not a 0444 link to its file, with its size and mtime) goes,
    what is missing is made."""
    files = {e.rel: e for e in entries}
    wanted = binds.tree_dirs(entries, dirs)
    for dirpath, dirnames, filenames in os.walk(pre, topdown=False, onerror=_raise):
        top = Path(dirpath)
        rel_dir = os.path.relpath(dirpath, pre)
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            entry = files.get(rel)
            if entry is None or not _placed(top / name, entry):
                os.unlink(top / name)
        for name in dirnames:
            if os.path.normpath(os.path.join(rel_dir, name)) not in wanted:
                shutil.rmtree(top / name)  # its files were visited (bottom-up): it is empty
    os.chmod(pre, dir_mode)
    for rel in sorted(wanted):
        _mkdirs(pre, pre / rel, dir_mode)
    for entry in entries:
        path = pre / entry.rel
        if not os.path.lexists(path):
            binds.place(path, entry)


def _raise(exc: OSError) -> None:
    raise exc


def _mkdirs(root: Path, directory: Path, mode: int) -> None:
    """``directory`` (below ``root``) and its parents, each ``mode``."""
    if directory == root or directory.is_dir():
        return
    _mkdirs(root, directory.parent, mode)
    directory.mkdir(mode=mode)
    os.chmod(directory, mode)


def _placed(path: Path, entry: binds.TreeEntry) -> bool:
    """Whether ``path`` is what `binds.place` makes of ``entry`` now."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o444:
        return False
    if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
        return False
    if entry.source is None:
        return st.st_nlink == 1
    try:
        src = os.stat(entry.source)
    except FileNotFoundError:
        return False
    return (src.st_ino, src.st_dev) == (st.st_ino, st.st_dev)


def old_path(tree: Path) -> Path:
    return tree.with_name(f"{tree.name}.old")


def remove(tree: Path) -> None:
    synced_path(tree).unlink(missing_ok=True)
    binds.remove_tree(tree)
    discard(old_path(tree))
    discard(pre_path(tree))


def discard(path: Path) -> None:
    """A tree left half-built or half-swapped."""
    shutil.rmtree(path, ignore_errors=True)

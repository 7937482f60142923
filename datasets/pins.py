"""Pinned datasets: manifests that survive restarts and answer metadata without S3.

A completed prefetch writes a manifest (every object's key, size, ETag,
mtime, MD5 where S3 gives one, and the end-to-end check it passed, with the
expected digest and part layout: `store.checksums.Check`) to
``CACHE_DIR/v1/pins/<id>.json``
(temp file, fsync, rename: a crash leaves the old manifest or the new one).
The block cache never evicts a pinned object version: the set of them is the
cache ledger's (`cache.ledger`), and this store tells it every change. A
complete, unsharded manifest also serves lookups, ``stat`` and ``readdir``
inside the dataset with no S3 request, so the dataset stays readable while S3
is unreachable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.ledger import Ledger
from s3cachefs.store.checksums import Check
from s3cachefs.store.keys import valid_name
from s3cachefs.store.responses import etag_md5
from s3cachefs.store.types import Listing, ObjectInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the keys whose stable hash falls on it."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, key: str) -> bool:
        """Stable across machines and releases: first 8 bytes of SHA-256 of the key, mod count."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


@dataclass
class Manifest:
    bucket: str
    prefix: str  # full key prefix of the dataset, ending in "/"
    shard: str | None  # "I/N", or None for the whole dataset
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    md5: dict[str, str] = field(default_factory=dict)  # key -> hex MD5, where S3 gave one
    # key -> the end-to-end check it passed; absent in manifests written before checks
    checks: dict[str, Check] = field(default_factory=dict)
    # Full prefixes of directories the dataset shows with no file of its own in them: the
    # FUSE view lists them (a "dir/" marker, or above a key it skips), so the pinned view does.
    dirs: set[str] = field(default_factory=set)
    complete: bool = False
    verified_at: float | None = None
    # A shard's: the dataset's other files, as listed when it was prefetched (None: not
    # recorded, an unsharded manifest or an earlier release). With it, the shard's
    # manifest answers the whole dataset's directories without S3.
    listing: dict[str, ObjectInfo] | None = None

    @property
    def id(self) -> str:
        return manifest_id(self.bucket, self.prefix, self.shard)

    @property
    def total_bytes(self) -> int:
        return sum(info.size for info in self.objects.values())

    def check(self, key: str) -> Check:
        """The check ``key`` passed; for an older manifest, what was done then (MD5 or size)."""
        if key in self.checks:
            return self.checks[key]
        md5 = etag_md5(self.objects[key].etag)
        local = self.md5.get(key)  # of what was pinned, not S3's: size and CRCs only
        # An MD5 recorded that is not the ETag's: the release that wrote it pinned an object
        # whose ETag is no MD5 (SSE-KMS, SSE-C) by its size; the ETag was never checked.
        if md5 is not None and local in (None, md5):
            return Check("md5", md5)
        return Check("local-md5", local) if local else Check("size")

    def size_only(self) -> list[str]:
        """Keys not verified end to end (S3 gave nothing to check them against)."""
        return sorted(k for k in self.objects if not self.check(k).end_to_end)

    def versions(self) -> list[ObjectVersion]:
        return [ObjectVersion(self.bucket, o.key, o.etag, o.size) for o in self.objects.values()]

    def keep_dirs_of(self, key: str) -> None:
        """A key that is not a file of the dataset (a ``dir/`` marker, or one with a segment
        that is not a valid name): keep the directories the FUSE view shows for it."""
        parts = key[len(self.prefix) :].split("/")
        for depth, part in enumerate(parts[:-1]):
            if not valid_name(part):
                break  # a skipped segment hides everything below it (`store.keys`)
            self.dirs.add(self.prefix + "".join(p + "/" for p in parts[: depth + 1]))


def manifest_id(bucket: str, prefix: str, shard: str | None) -> str:
    return hashlib.sha256(f"{bucket}\0{prefix}\0{shard or ''}".encode()).hexdigest()[:24]


class PinStore:
    """The manifests of one cache dir, and the directory listings they answer.

    What is pinned (saved manifests, and what running jobs hold) is kept by the
    cache's ``ledger``, its one owner: every change here is passed on to it at
    once (load, install, delete, hold, release), never by hand.
    """

    def __init__(self, cache_root: Path, bucket: str, ledger: Ledger) -> None:
        self.dir = cache_root / "pins"
        self.bucket = bucket
        self.ledger = ledger
        self.manifests: dict[str, Manifest] = {}
        self.generation = 0  # bumped whenever the pinned tree changes
        self._listings: dict[str, Listing] = {}
        self._ancestors: dict[str, Listing] = {}
        # Objects verified by running prefetch jobs, not yet in a saved manifest.
        self._held: dict[str, set[str]] = {}

    def load(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in self.dir.glob("*.json.tmp"):
            path.unlink()  # a save that a crash interrupted; the previous manifest stands
        for path in sorted(self.dir.glob("*.json")):
            try:
                manifest = _decode(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("manifest=%s unreadable (%s); ignored", path.name, exc)
                continue
            self.manifests[manifest.id] = manifest
        self._rebuild()
        self._repin()

    def save(self, manifest: Manifest) -> None:
        self.write(manifest)
        self.install(manifest)

    def write(self, manifest: Manifest) -> None:
        """Write atomically: temp file, fsync, rename, fsync the directory. Touches no
        state, so a worker thread may run it (a large manifest takes a while); `install` next."""
        path = self.dir / f"{manifest.id}.json"
        tmp = path.with_suffix(".json.tmp")
        with tmp.open("w") as f:
            json.dump(_encode(manifest), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def install(self, manifest: Manifest) -> None:
        """The written manifest answers from now on, and its objects are pinned."""
        self.manifests[manifest.id] = manifest
        self._rebuild()
        self._repin()

    def delete(self, manifest: Manifest) -> None:
        (self.dir / f"{manifest.id}.json").unlink(missing_ok=True)
        self.manifests.pop(manifest.id, None)
        self._rebuild()
        self._repin()

    def find(self, prefix: str, shard: str | None) -> Manifest | None:
        return self.manifests.get(manifest_id(self.bucket, prefix, shard))

    def pinned_oids(self) -> set[str]:
        """Every object version that must not be evicted: saved manifests and running jobs."""
        saved = {v.oid for m in self.manifests.values() for v in m.versions()}
        return saved.union(*self._held.values())

    def hold(self, owner: str, oid: str) -> None:
        """Pin ``oid`` for a running job until it saves its manifest (or stops).

        One oid at a time: recomputing the whole set per object is O(n^2).
        """
        self._held.setdefault(owner, set()).add(oid)
        self.ledger.pin(oid)

    def release(self, owner: str) -> None:
        if self._held.pop(owner, None) is not None:
            self._repin()

    def _repin(self) -> None:
        """Tell the cache ledger the pinned set after a change. Must not await."""
        self.ledger.set_pinned(self.pinned_oids())

    def listing(self, dir_prefix: str) -> Listing | None:
        """A directory's entries from complete manifests, if it lies inside one."""
        return self._listings.get(dir_prefix)

    def ancestors(self, dir_prefix: str) -> Listing | None:
        """For a directory above pinned datasets: the way down to them (S3 unreachable)."""
        return self._ancestors.get(dir_prefix)

    def _rebuild(self) -> None:
        """Index every directory inside complete manifests (a shard's with the dataset's
        listing it recorded). Must not await."""
        listings: dict[str, Listing] = {}
        ancestors: dict[str, Listing] = {}
        for prefix, (files, dirs) in self._datasets().items():
            listings.setdefault(prefix, Listing())
            parts = prefix.rstrip("/").split("/")
            for depth in range(len(parts)):
                above = "".join(p + "/" for p in parts[:depth])
                child = above + parts[depth] + "/"
                entry = ancestors.setdefault(above, Listing())
                if child not in entry.prefixes:
                    entry.prefixes.append(child)
            for info in files.values():
                parent = _add_parents(listings, prefix, info.key)
                listings.setdefault(parent, Listing()).objects.append(info)
            for directory in sorted(dirs):
                _add_parents(listings, prefix, directory + "x")
        self._listings = listings
        self._ancestors = ancestors
        self.generation += 1

    def _datasets(self) -> dict[str, tuple[dict[str, ObjectInfo], set[str]]]:
        """Per pinned dataset directory: its files and extra directories. The shards of one
        dataset merge: each one's pinned objects over the listings, the newest listing last.
        A shard of an earlier release (no listing) holds part of each directory: S3 lists it."""
        found: dict[str, tuple[dict[str, ObjectInfo], set[str]]] = {}
        usable = [
            m
            for m in self.manifests.values()
            if m.complete and (m.shard is None or m.listing is not None)
        ]
        whole = {m.prefix for m in usable if m.shard is None}
        usable.sort(key=lambda m: m.verified_at or 0)
        for manifest in usable:
            files, dirs = found.setdefault(manifest.prefix, ({}, set()))
            if manifest.listing is not None and manifest.prefix not in whole:
                files.update(manifest.listing)
            dirs.update(manifest.dirs)
        for manifest in usable:
            found[manifest.prefix][0].update(manifest.objects)
        return found


def _add_parents(listings: dict[str, Listing], prefix: str, key: str) -> str:
    """List every directory between ``prefix`` and ``key``; returns the key's directory."""
    parent = prefix
    for part in key[len(prefix) :].split("/")[:-1]:
        child = parent + part + "/"
        if child not in listings:
            listings[child] = Listing()
            listings.setdefault(parent, Listing()).prefixes.append(child)
        parent = child
    return parent


def _encode(m: Manifest) -> dict[str, object]:
    return {
        "format": 1,
        "bucket": m.bucket,
        "prefix": m.prefix,
        "shard": m.shard,
        "complete": m.complete,
        "verified_at": m.verified_at,
        "objects": [[*asdict(o).values(), m.md5.get(o.key)] for o in m.objects.values()],
        # Beside "objects", not in its rows: older daemons read this manifest as before.
        "checks": {k: c.encode() for k, c in m.checks.items() if k in m.objects},
        "dirs": sorted(m.dirs),  # absent in manifests of earlier releases
        **(
            {}
            if m.listing is None
            else {"listing": [list(asdict(o).values()) for o in m.listing.values()]}
        ),
    }


def _decode(data: dict[str, object]) -> Manifest:
    if data.get("format") != 1:
        raise ValueError(f"unknown manifest format {data.get('format')!r}")
    manifest = Manifest(
        bucket=str(data["bucket"]),
        prefix=str(data["prefix"]),
        shard=None if data["shard"] is None else str(data["shard"]),
        complete=bool(data["complete"]),
        verified_at=None if data["verified_at"] is None else float(data["verified_at"]),  # type: ignore[arg-type]
    )
    manifest.dirs = {str(d) for d in data.get("dirs", [])}  # type: ignore[attr-defined]
    for key, size, etag, mtime_ns, md5 in data["objects"]:  # type: ignore[attr-defined]
        manifest.objects[key] = ObjectInfo(key, size, etag, mtime_ns)
        if md5:
            manifest.md5[key] = md5
    if data.get("listing") is not None:
        rows = data["listing"]
        manifest.listing = {row[0]: ObjectInfo(*row) for row in rows}  # type: ignore[attr-defined]
    for key, check in dict(data.get("checks") or {}).items():  # type: ignore[call-overload]
        if key in manifest.objects:
            manifest.checks[key] = Check.decode(check)
    return manifest

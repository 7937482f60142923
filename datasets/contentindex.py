"""Which pinned object version has this content: the pinned manifests, looked up by digest.

A pinned manifest (`datasets.pins`) records, per key, the object version and
the end-to-end check its bytes passed (`store.checksums.Check`): S3's digest of
the content. Two keys whose digests and sizes are equal hold the same content,
so a version to prefetch may be copied from a cached one (`cache.reuse`) instead
of downloaded. The digests an object can be found by:

- its MD5 (a single-part ETag, unless ``--etag-md5 off``): known from the
  listing, no request;
- its multipart ETag (the MD5 of the part MD5s, ``-N``), when the source's
  check recorded the part layout: no request either. The new key is pinned by
  that ETag over that layout, which its bytes digest to;
- its SHA-1 or SHA-256 S3 checksum (full-object, or composite over the same
  part layout): the new key's needs a HEAD (`datasets.objectcheck`), so it is
  asked only when a source of that size is known by one.

Only digests no one can forge count as "same content": the new key gets the
source's bytes pinned for as long as it is pinned, with nothing to catch a
mistake. A CRC (crc32, crc32c, crc64nvme; full-object or composite) is no
content key: it catches accidents, not intent, and anyone who can write to the
bucket can make an object of any size with any CRC by flipping a few chosen
bits (a linear solve, milliseconds); among millions of objects of a common
size a 32-bit one also matches by chance. An object checked by a CRC is
downloaded and checked against it as usual. Size-checked objects (and old
manifests' own MD5s) are no sources either: nothing S3 computed says what they
hold. Whether a source is still cached whole is the cache's to say, at the copy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import trio

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.pins import Manifest, PinStore
from s3cachefs.store.checkplan import multipart_parts
from s3cachefs.store.checksums import Check
from s3cachefs.store.responses import etag_md5
from s3cachefs.store.types import ObjectInfo

# (kind of digest, its value, the part layout it is over, the object's size)
ContentKey = tuple[str, str, tuple[int, ...], int]
# Checks a new key can be found by from its listing alone.
_LISTED = ("md5", "mpu-etag")
# S3 checksums that say "same content": cryptographic digests only, never a CRC.
_DIGESTS = ("sha1", "sha256")


def content_key(check: Check) -> bool:
    """Whether two objects that passed ``check`` with the same value and size hold the
    same bytes: an MD5 (or multipart ETag over the same part layout), a SHA-1 or a
    SHA-256; never a CRC, which can be forged (or match by chance)."""
    return check.kind in _LISTED or (
        check.algorithm in _DIGESTS and check.kind.endswith(("-full", "-composite"))
    )


@dataclass(frozen=True)
class Source:
    """A pinned version with the content, and the check the new key is pinned with."""

    version: ObjectVersion
    check: Check


def _entries(version: ObjectVersion, check: Check) -> list[tuple[ContentKey, Source]]:
    """The content keys an object passed ``check`` is found by, each with its source."""
    size = version.size
    found: list[tuple[ContentKey, Source]] = []
    if content_key(check):
        found.append(((check.kind, check.value, check.parts, size), Source(version, check)))
    if multipart_parts(version.etag) is not None and check.parts:
        # Found by its ETag too, and the new key pinned by that ETag over these parts
        # (a "mpu-etag" check is just that already).
        etag = version.etag.strip('"')
        by_etag = Source(version, Check("mpu-etag", etag, check.parts))
        found.append((("etag", etag, (), size), by_etag))
    return found


class ContentIndex:
    """The end-to-end checked objects of some manifests, by content key."""

    def __init__(self, manifests: Iterable[Manifest], *, etag_md5s: bool) -> None:
        # False (--etag-md5 off): a 32-hex ETag is no MD5, so no content key either.
        self.etag_md5s = etag_md5s
        self._sources: dict[ContentKey, list[Source]] = {}
        self._checksum_sizes: Counter[int] = Counter()  # sources found only after a HEAD
        for manifest in manifests:
            self.add(manifest)

    def add(self, manifest: Manifest) -> None:
        """Index a manifest's end-to-end checked objects. Blocking (millions, maybe)."""
        for key, info in manifest.objects.items():
            check = manifest.check(key)
            if check.end_to_end:
                version = ObjectVersion(manifest.bucket, key, info.etag, info.size)
                for content, source in _entries(version, check):
                    self._sources.setdefault(content, []).append(source)
                    if content[0] not in _LISTED and content[0] != "etag":
                        self._checksum_sizes[info.size] += 1

    def remove(self, manifest: Manifest) -> None:
        """Forget what `add` indexed of ``manifest``. Blocking; O(its objects)."""
        for key, info in manifest.objects.items():
            check = manifest.check(key)
            if not check.end_to_end:
                continue
            version = ObjectVersion(manifest.bucket, key, info.etag, info.size)
            for content, source in _entries(version, check):
                sources = self._sources.get(content, [])
                if source in sources:
                    sources.remove(source)
                    if not sources:
                        del self._sources[content]
                    if content[0] not in _LISTED and content[0] != "etag":
                        self._checksum_sizes[info.size] -= 1
                        if self._checksum_sizes[info.size] <= 0:
                            del self._checksum_sizes[info.size]

    def find(self, info: ObjectInfo) -> list[Source]:
        """Sources of ``info``'s content known from its listing alone (no request)."""
        md5 = etag_md5(info.etag)
        if md5 is not None:
            return self._get(("md5", md5, (), info.size)) if self.etag_md5s else []
        if multipart_parts(info.etag) is None:
            return []
        return self._get(("etag", info.etag.strip('"'), (), info.size))

    def asks_s3(self, info: ObjectInfo) -> bool:
        """Whether a source of its size is known by a SHA checksum only (worth a HEAD)."""
        trusted_md5 = self.etag_md5s and etag_md5(info.etag) is not None
        return info.size in self._checksum_sizes and not trusted_md5

    def by_check(self, check: Check, size: int) -> list[Source]:
        """Sources whose content passed ``check`` (S3's, for the new key, from a HEAD)."""
        if check.kind.endswith("-either"):  # full-object or composite: either will do
            full = Check(f"{check.algorithm}-full", check.value)
            composite = Check(f"{check.algorithm}-composite", check.value, check.parts)
            return self.by_check(full, size) + self.by_check(composite, size)
        if not content_key(check):  # a CRC: no proof of content
            return []
        return self._get((check.kind, check.value, check.parts, size))

    def _get(self, key: ContentKey) -> list[Source]:
        return list(self._sources.get(key, ()))


@dataclass
class _Kept:
    index: ContentIndex
    manifests: dict[str, Manifest]  # what it indexes: id -> the installed manifest
    lock: trio.Lock = field(default_factory=trio.Lock)


_KEPT: WeakKeyDictionary[PinStore, _Kept] = WeakKeyDictionary()


async def index_of(pins: PinStore, *, etag_md5s: bool) -> ContentIndex:
    """The content index of ``pins``' installed manifests, kept between prefetch runs.

    Brought up to date with the manifests installed, replaced or deleted since (in a
    thread, O(their objects)) instead of rebuilt over every pinned object each run
    (~5 µs per object: seconds of the GIL per million). An installed manifest is
    never changed, only replaced, so its identity says whether it is indexed.
    """
    kept = _KEPT.get(pins)
    if kept is None or kept.index.etag_md5s != etag_md5s:
        kept = _KEPT[pins] = _Kept(ContentIndex((), etag_md5s=etag_md5s), {})
    async with kept.lock:
        now = dict(pins.manifests)
        gone = [m for mid, m in kept.manifests.items() if now.get(mid) is not m]
        new = [m for mid, m in now.items() if kept.manifests.get(mid) is not m]
        if gone or new:
            index = kept.index

            def update() -> None:
                for manifest in gone:
                    index.remove(manifest)
                for manifest in new:
                    index.add(manifest)

            with trio.CancelScope(shield=True):  # indexed and recorded as such, or neither
                await trio.to_thread.run_sync(update)
                kept.manifests = now
    return kept.index

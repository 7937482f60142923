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

from collections.abc import Iterable
from dataclasses import dataclass

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.pins import Manifest
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


class ContentIndex:
    """The end-to-end checked objects of some manifests, by content key."""

    def __init__(self, manifests: Iterable[Manifest], *, etag_md5s: bool) -> None:
        # False (--etag-md5 off): a 32-hex ETag is no MD5, so no content key either.
        self.etag_md5s = etag_md5s
        self._sources: dict[ContentKey, list[Source]] = {}
        self._checksum_sizes: set[int] = set()  # sizes of sources found only after a HEAD
        for manifest in manifests:
            for key, info in manifest.objects.items():
                check = manifest.check(key)
                if check.end_to_end:
                    self._add(ObjectVersion(manifest.bucket, key, info.etag, info.size), check)

    def _add(self, version: ObjectVersion, check: Check) -> None:
        size = version.size
        if content_key(check):
            key = (check.kind, check.value, check.parts, size)
            self._sources.setdefault(key, []).append(Source(version, check))
            if check.kind not in _LISTED:
                self._checksum_sizes.add(size)
        if multipart_parts(version.etag) is not None and check.parts:
            # Found by its ETag too, and the new key pinned by that ETag over these parts
            # (a "mpu-etag" check is just that already).
            etag = version.etag.strip('"')
            by_etag = Source(version, Check("mpu-etag", etag, check.parts))
            self._sources.setdefault(("etag", etag, (), size), []).append(by_etag)

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

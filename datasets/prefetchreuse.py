"""A prefetch's content reuse: objects whose content is cached under another key, copied.

`PrefetchJob` offers each object that misses blocks as it queues it (`offer`:
the listing says enough, no request); a worker then takes it (`take`): copied
from a pinned version with the same digest (never a CRC) and size (`datasets.contentindex`)
by a verified copy inside the cache (`cache.reuse`), with zero GETs, and pinned
with that digest's check; else (no source cached whole, a source block that
fails its CRC) the job downloads it as any other. A dry run counts what the
listing shows can be reused as not to download (it still takes room).
"""

from __future__ import annotations

import logging

from s3cachefs.base.errors import StoreError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.reuse import copy_verified
from s3cachefs.datasets.contentindex import ContentIndex, Source, index_of
from s3cachefs.datasets.objectcheck import ObjectCheck
from s3cachefs.datasets.pins import PinStore
from s3cachefs.datasets.prefetchprogress import Progress
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo

log = logging.getLogger(__name__)


class PrefetchReuse:
    """What one prefetch job copies from the cache instead of downloading."""

    def __init__(
        self,
        cache: BlockCache,
        pins: PinStore,
        objects: ObjectCheck,
        progress: Progress,
        *,
        dry_run: bool,
    ) -> None:
        self.cache = cache
        self.pins = pins
        self.objects = objects
        self.progress = progress
        self.dry_run = dry_run
        self._index: ContentIndex | None = None

    @property
    def index(self) -> ContentIndex:
        assert self._index is not None, "an object is offered (`offer`) before it is taken"
        return self._index

    async def offer(self, info: ObjectInfo, version: ObjectVersion) -> bool:
        """Whether a worker should try to copy ``info`` (missing blocks).

        In a dry run: counted as reused if the listing shows a source, and False.
        """
        if not self.pins.manifests or version.oid in self.cache.ledger:
            return False  # nothing pinned, or partly cached: its missing blocks are fetched
        if self._index is None:  # kept between runs, brought up to date once per run
            self._index = await index_of(self.pins, etag_md5s=self.objects.etag_md5s)
        cached = [s for s in self.index.find(info) if self._whole(s, version)]
        if self.dry_run:
            if cached:
                self._count(info)
            return False
        return bool(cached) or self.index.asks_s3(info)

    async def take(
        self, info: ObjectInfo, version: ObjectVersion
    ) -> tuple[Check | None, Check | None]:
        """Copy an offered object from a version with its content: (the check to pin it
        with, None if it was not copied: the caller downloads it; S3's own check, if a
        HEAD asked for it: the download needs no second HEAD)."""
        sources, asked = self.index.find(info), None
        if not sources and self.index.asks_s3(info):
            try:
                asked = await self.objects.first_check(info)  # S3's checksum: a HEAD
            except StoreError as exc:
                log.info("prefetch key=%s not reused: %s", info.key, exc)
                return None, None
            sources = self.index.by_check(asked, info.size)
        for source in sources:
            if self._whole(source, version) and await copy_verified(
                self.cache, source.version, version
            ):
                self._count(info)
                return source.check, asked
        return None, asked

    def _whole(self, source: Source, version: ObjectVersion) -> bool:
        return source.version.oid != version.oid and not self.cache.missing_blocks(source.version)

    def _count(self, info: ObjectInfo) -> None:
        self.progress.files_reused += 1
        self.progress.bytes_reused += info.size

"""A prefetch's listing side: the dataset's pages, admitted as they come.

`PrefetchListing` lists the prefix page by page (S3's own listing,
`store.list_tree`), drops what a FUSE view cannot show as a file (directory
markers, invalid names, keys shadowed by a directory: `datasets.keyshadow`),
keeps a shard's share, and admits each page before its objects are handed on:
the page is counted into the totals and the manifest, and the bytes still
missing are checked against what the cache can hold without evicting pinned
data. A dataset that does not fit is refused with the numbers (`DoesNotFit`);
a dry run counts everything, then says.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from s3cachefs.base.errors import NotEnoughSpaceError, S3CacheFSError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.keyshadow import Shadowed
from s3cachefs.datasets.pins import Manifest, Shard
from s3cachefs.datasets.prefetchprogress import Progress
from s3cachefs.store.keys import valid_name
from s3cachefs.store.types import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)


class PrefetchRefused(S3CacheFSError):
    """The dataset cannot be prefetched: it holds nothing, or it does not fit."""


class DoesNotFit(PrefetchRefused, NotEnoughSpaceError):
    """The dataset cannot fit in the cache (the message and the fields have the numbers)."""


def valid_key(key: str, prefix: str) -> bool:
    return all(valid_name(part) for part in key[len(prefix) :].split("/"))


class PrefetchListing:
    """The listing of one prefetch: pages in, admitted objects out (`run`)."""

    def __init__(
        self,
        store: ObjectStore,
        cache: BlockCache,
        manifest: Manifest,
        progress: Progress,
        *,
        prefix: str,
        shard: Shard | None,
        dry_run: bool,
    ) -> None:
        self.store = store
        self.cache = cache
        self.manifest = manifest
        self.progress = progress
        self.prefix = prefix
        self.shard = shard
        self.dry_run = dry_run
        # Bytes each listed object still had to download when listed; an object
        # leaves when it is done (its bytes are then in the cache's own count).
        self._pending: dict[str, int] = {}
        self.listed_keys: set[str] = set()

    @property
    def bytes_needed(self) -> int:
        return sum(self._pending.values())

    def done(self, key: str) -> None:
        """``key`` is in the cache for good: its bytes no longer count as still needed."""
        self._pending.pop(key, None)

    async def run(self, take: Callable[[list[ObjectInfo]], Awaitable[None]]) -> None:
        """List to the end, handing each admitted page to ``take``; sets ``listing_done``."""
        pages = self.store.list_tree(self.prefix)
        others: dict[str, ObjectInfo] = {}  # a shard's: the dataset's other files
        shadow = Shadowed()  # a key that is also a directory: the directory wins, as in FUSE
        while True:
            page = await trio.to_thread.run_sync(next, pages, None)
            if page is None:
                await take(self._take(shadow.flush(), others))
                break
            files = [info for info in page if not info.key.endswith("/")]  # not dir markers
            valid = [info for info in files if valid_key(info.key, self.prefix)]
            for info in page:  # the directories the FUSE view shows for the others
                if info.key.endswith("/") or not valid_key(info.key, self.prefix):
                    self.manifest.keep_dirs_of(info.key)
            if len(valid) < len(files):
                self.progress.files_skipped += len(files) - len(valid)
                log.warning(
                    "prefetch skipped %d keys that are not valid file names under %s",
                    len(files) - len(valid),
                    self.prefix,
                )
            await take(self._take(shadow.feed(valid), others))
        self.progress.files_skipped += shadow.warn("prefetch", self.prefix)
        if self.shard is not None:  # the whole listing: the manifest answers every directory
            self.manifest.listing = others
        self.progress.listing_done = True

    def _take(self, valid: list[ObjectInfo], others: dict[str, ObjectInfo]) -> list[ObjectInfo]:
        """This shard's share of ``valid``, admitted. Must not await."""
        accepted = [i for i in valid if self.shard is None or self.shard.holds(i.key)]
        if self.shard is not None:
            others.update((i.key, i) for i in valid if not self.shard.holds(i.key))
        self.admit(accepted)
        return accepted

    def admit(self, page: list[ObjectInfo]) -> None:
        """Count a page into the totals, refusing if what is missing cannot fit. Must not await."""
        for info in page:
            self.manifest.objects[info.key] = info
            self.listed_keys.add(info.key)
            self.progress.files_total += 1
            self.progress.bytes_total += info.size
            version = ObjectVersion(self.store.bucket, info.key, info.etag, info.size)
            missing = len(self.cache.missing_blocks(version))
            self._pending[info.key] = min(info.size, missing * self.cache.block_size)
        fits, room = self.cache.room_for(self.bytes_needed)
        if not fits and not self.dry_run:  # a dry run counts everything, then says
            raise DoesNotFit(
                f"dataset does not fit: {gib(self.bytes_needed)} still to download "
                f"({self.progress.files_total} objects, {gib(self.progress.bytes_total)} listed"
                f"{'' if self.progress.listing_done else ' so far'}), room for {gib(room)} "
                f"(--cache-size {gib(self.cache.cache_size)}, --min-free "
                f"{gib(self.cache.min_free)}, pinned {gib(self.cache.pinned_bytes)})",
                needed=self.bytes_needed,
                available=room,
            )


def gib(n: int) -> str:
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.2f} GiB"

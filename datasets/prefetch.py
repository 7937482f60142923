"""Prefetch (Sync-before-Run): every object of a dataset into the cache, verified, pinned.

The job lists the dataset's prefix page by page and downloads while the
listing goes on. Work items are runs of missing blocks (up to
``--fetch-size`` each), so a large object is several ranged GETs in
parallel; ``jobs`` workers fetch at once, fewer than the S3 limiter's slots,
so a foreground read never waits behind the whole prefetch. Blocks go through
the same cache, single-flight and CRCs as reads: a read and a prefetch never
download the same block twice.

Each object, once all its blocks are in, is checked end to end against a
digest S3 computed (`datasets.objectcheck`). An object S3 gives nothing to
check against is pinned "size-checked only", and says so; with
``require_checksums`` it fails instead. A verified object is pinned at once, so
the rest of the job cannot evict it. Progress goes out as events
(`datasets.prefetchprogress`).
At the end the manifest is saved: complete when every object verified.

The listing, and the capacity check of each page before its objects are
queued, are `datasets.prefetchlist`'s. A dataset whose first page does not fit
downloads nothing; ``--dry-run`` checks the whole listing first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import trio

from s3cachefs.base.errors import S3CacheFSError, StoreError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.objectcheck import ObjectCheck, ObjectFailed
from s3cachefs.datasets.pins import Manifest, PinStore, Shard
from s3cachefs.datasets.prefetchlist import PrefetchListing, PrefetchRefused
from s3cachefs.datasets.prefetchprogress import PROGRESS_INTERVAL, Progress, Report
from s3cachefs.datasets.prefetchreuse import PrefetchReuse
from s3cachefs.datasets.prefetchruns import download_run
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

SIZE_ONLY_SHOWN = 5  # keys named in reports of size-checked-only objects


@dataclass
class _Object:
    info: ObjectInfo
    version: ObjectVersion
    runs_left: int
    reuse: bool = False  # offered to reuse: copied by a worker, else downloaded (`_reuse`)
    asked: Check | None = None  # S3's check, if a HEAD for the reuse asked it already


class PrefetchJob:
    def __init__(
        self,
        store: ObjectStore,
        cache: BlockCache,
        pins: PinStore,
        *,
        prefix: str,
        shard: Shard | None,
        jobs: int,
        dry_run: bool = False,
        require_checksums: bool = False,
        etag_md5s: bool = True,
    ) -> None:
        self.store = store
        # False (--etag-md5 off): a 32-hex ETag is no MD5; S3 is asked for a checksum instead.
        self.etag_md5s = etag_md5s
        self.cache = cache
        self.objects = ObjectCheck(store, cache, etag_md5s=etag_md5s)
        self.pins = pins
        self.prefix = prefix
        self.shard = shard
        self.jobs = max(1, jobs)
        self.dry_run = dry_run
        self.require_checksums = require_checksums
        self.progress = Progress(dry_run=dry_run)
        self.reuse = PrefetchReuse(cache, pins, self.objects, self.progress, dry_run=dry_run)
        self.manifest = Manifest(store.bucket, prefix, None if shard is None else str(shard))
        self.previous = pins.find(prefix, self.manifest.shard)
        self.listing = PrefetchListing(
            store, cache, self.manifest, self.progress, prefix=prefix, shard=shard, dry_run=dry_run
        )
        self.listed_keys = self.listing.listed_keys
        self.accepted: set[str] = set()  # keys verified (or known good) in this run
        self.owner = f"prefetch:{self.manifest.id}"
        self._all_done = trio.Event()
        # Called for each object pinned (`datasets.kernelprestage`: linked into its tree).
        self.on_pin: Callable[[ObjectInfo, ObjectVersion], None] | None = None

    async def run(self, report: Report) -> dict[str, Any]:
        """Run to the end; raises PrefetchRefused or StoreError (listing) with the reason."""
        try:
            await self._run(report)
        except BaseExceptionGroup as group:  # one task's error, wrapped by the nursery
            raise _single(group) from None
        return self._final()

    async def _run(self, report: Report) -> None:
        send, receive = trio.open_memory_channel[_Object | tuple[_Object, range]](10_000)
        self._again = send.clone()  # the runs of an object that was not reused (`_reuse`)
        refused = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_every, report)
                async with send:
                    if not self.dry_run:
                        for _ in range(self.jobs):
                            nursery.start_soon(self._worker, receive.clone())
                    await receive.aclose()
                    await self._list(send)
                if self.dry_run:
                    nursery.cancel_scope.cancel()
                else:
                    await self._wait_done()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            refused = any(isinstance(e, PrefetchRefused) for e in group.exceptions)
            raise
        finally:
            self._again.close()
            with trio.CancelScope(shield=True):
                if not self.dry_run and not refused:
                    await self._finish()
                self.pins.release(self.owner)

    async def _list(self, send: trio.MemorySendChannel[Any]) -> None:
        async def take(accepted: list[ObjectInfo]) -> None:
            for info in accepted:
                await self._queue(info, send)

        await self.listing.run(take)
        self._check_done()
        if self.progress.files_total == 0 and not self.progress.files_skipped:
            raise PrefetchRefused(f"s3://{self.store.bucket}/{self.prefix} holds no objects")

    async def _queue(self, info: ObjectInfo, send: trio.MemorySendChannel[Any]) -> None:
        version = ObjectVersion(self.store.bucket, info.key, info.etag, info.size)
        missing = self.cache.missing_blocks(version)
        previous = self.previous
        known = (
            previous is not None
            and previous.objects.get(info.key) == info
            # pinned before end-to-end checks (no check recorded): verify it now
            # (an older manifest's MD5 that is not the ETag's: S3 is asked what it is now)
            and (
                info.key in previous.checks
                or (self.etag_md5s and previous.check(info.key).kind == "md5")
            )
        )
        if not missing and known and previous is not None:  # verified when it was pinned
            self._accept(info, previous.check(info.key))
            return
        offered = bool(missing) and await self.reuse.offer(info, version)  # a dry run counts it
        if self.dry_run:
            return
        if offered:  # its content is cached under another key (`datasets.prefetchreuse`)
            await send.send(_Object(info, version, 0, reuse=True))
            return
        runs = _runs(missing, self.cache.run_blocks)
        item = _Object(info, version, len(runs))
        if not runs:
            await send.send(item)  # only needs verifying
        for run in runs:
            await send.send((item, run))

    async def _worker(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        async with receive:
            async for item in receive:
                if isinstance(item, _Object):
                    await (self._reuse(item) if item.reuse else self._verify(item))
                else:
                    await self._fetch(*item)

    async def _fetch(self, obj: _Object, run: range) -> None:
        if obj.info.key in self.progress.failed:
            return
        try:
            proven = await self._download(obj, run)
        except (StoreError, ObjectFailed) as exc:
            self._fail(obj.info.key, str(exc))
            return
        obj.runs_left -= 1
        if obj.runs_left == 0:
            await self._verify(obj, proven)

    async def _reuse(self, obj: _Object) -> None:
        """A copy of the same content cached under another key (no GET), else downloaded."""
        check, obj.asked = await self.reuse.take(obj.info, obj.version)
        if check is not None:
            self._pin(obj.info, check)
            return
        runs = _runs(self.cache.missing_blocks(obj.version), self.cache.run_blocks)
        obj.runs_left = len(runs)
        if not runs:  # cached meanwhile (a reader)
            await self._verify(obj)
        for run in runs:  # to every worker, as any object's; here if the queue is full
            try:
                self._again.send_nowait((obj, run))
            except trio.WouldBlock:
                await self._fetch(obj, run)

    async def _download(self, obj: _Object, run: range) -> Check | None:
        """One run onto disk (`datasets.prefetchruns`); the check passed, if it proved one."""
        nbytes, proven = await download_run(
            self.cache, self.objects, obj.info, run, obj.runs_left, asked=obj.asked
        )
        self.progress.bytes_fetched += nbytes
        return proven

    async def _verify(self, obj: _Object, proven: Check | None = None) -> None:
        if proven is not None:  # its digest matched as it was written: no re-read
            self._pin(obj.info, proven)
            return
        try:
            check = await self.objects.check(obj.info, obj.version)
        except (StoreError, ObjectFailed) as exc:
            self._fail(obj.info.key, str(exc))
            return
        self._pin(obj.info, check)

    def _pin(self, info: ObjectInfo, check: Check) -> None:
        if not check.end_to_end and self.require_checksums:
            self._refuse(info.key, check)
            return
        version = ObjectVersion(self.store.bucket, info.key, info.etag, info.size)
        self.pins.hold(self.owner, version.oid)
        self._accept(info, check)
        if self.on_pin is not None:
            self.on_pin(info, version)

    def _refuse(self, key: str, check: Check) -> None:
        self._fail(
            key,
            "size-checked only: S3 gives no checksum, MD5 ETag or part layout to verify it "
            f"against (refused by --require-checksums; checked: {check.describe()})",
        )

    @property
    def bytes_needed(self) -> int:
        return self.listing.bytes_needed

    def _accept(self, info: ObjectInfo, check: Check) -> None:
        if not check.end_to_end and self.require_checksums:
            self._refuse(info.key, check)
            return
        check = replace(check, guessed=False)  # the digest matched: the layout was right
        self.manifest.checks[info.key] = check
        if check.kind == "md5":
            self.manifest.md5[info.key] = check.value
        if not check.end_to_end:
            self.progress.size_only.add(info.key)
        self.accepted.add(info.key)
        self.listing.done(info.key)
        self.progress.files_done += 1
        self.progress.bytes_done += info.size
        self._check_done()

    def _fail(self, key: str, reason: str) -> None:
        if key not in self.progress.failed:
            log.warning("prefetch key=%s failed: %s", key, reason)
            self.progress.failed[key] = reason
            self._check_done()

    def _check_done(self) -> None:
        progress = self.progress
        if progress.listing_done and (
            progress.files_done + len(progress.failed) >= progress.files_total
        ):
            self._all_done.set()

    async def _wait_done(self) -> None:
        await self._all_done.wait()

    async def _report_every(self, report: Report) -> None:
        while True:
            await report(self.progress.event("progress"))
            await trio.sleep(PROGRESS_INTERVAL)

    async def _finish(self) -> None:
        """Save what this run verified, pinned; release what is no longer pinned.

        Saved: the objects this run accepted, plus, when it stopped early
        (Ctrl-C, S3 down), the previous manifest's entries that are unchanged
        and still cached (verified by an earlier run); the next run resumes.
        Complete: every listed object accepted, listing finished, none failed.
        """
        progress = self.progress
        saved = {k: self.manifest.objects[k] for k in self.accepted}
        md5 = {k: v for k, v in self.manifest.md5.items() if k in saved}
        checks = {k: v for k, v in self.manifest.checks.items() if k in saved}
        self.manifest.complete = (
            progress.listing_done and not progress.failed and self.accepted >= self.listed_keys
        )
        if not self.manifest.complete and self.previous is not None:
            for key, info in self.previous.objects.items():
                version = ObjectVersion(self.store.bucket, key, info.etag, info.size)
                unchanged = self.manifest.objects.get(key, info) == info
                if key not in saved and unchanged and not self.cache.missing_blocks(version):
                    saved[key] = info
                    if key in self.previous.md5:
                        md5[key] = self.previous.md5[key]
                    if key in self.previous.checks:
                        checks[key] = self.previous.checks[key]
        self.manifest.objects, self.manifest.md5, self.manifest.checks = saved, md5, checks
        self.manifest.verified_at = time.time()
        if saved or self.previous is not None:
            await trio.to_thread.run_sync(self.pins.write, self.manifest)
            self.pins.install(self.manifest)
        self.pins.release(self.owner)
        pinned = self.cache.pinned
        if self.previous is not None and self.manifest.complete:
            # old versions of changed objects and deleted objects: no longer pinned by anyone
            await self.cache.free({v.oid for v in self.previous.versions()} - pinned)

    def _final(self) -> dict[str, Any]:
        event = self.progress.event("done")
        event["ok"] = (not self.dry_run and self.manifest.complete) or (
            self.dry_run and self.progress.listing_done
        )
        event["complete"] = self.manifest.complete
        event["failed_objects"] = dict(sorted(self.progress.failed.items()))
        event["size_only_keys"] = sorted(self.progress.size_only)[:SIZE_ONLY_SHOWN]
        if self.dry_run:
            fits, room = self.cache.room_for(self.bytes_needed)
            event.update(dry_run=True, fits=fits, bytes_needed=self.bytes_needed, room=room)
            event["bytes_to_download"] = self.bytes_needed - self.progress.bytes_reused
        return event


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error that made a nursery fail (ours first), out of its exception group."""
    flat: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            flat.append(exc)
    for exc in flat:
        if isinstance(exc, S3CacheFSError):
            return exc
    return flat[0]


def _runs(indices: list[int], longest: int) -> list[range]:
    """Group sorted block indices into contiguous runs of at most ``longest``."""
    runs: list[range] = []
    for idx in indices:
        if runs and runs[-1].stop == idx and len(runs[-1]) < longest:
            runs[-1] = range(runs[-1].start, idx + 1)
        else:
            runs.append(range(idx, idx + 1))
    return runs

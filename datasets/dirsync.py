"""`DirSync`: Sync-before-Run of ``s3://BUCKET/DATASET/`` into a plain directory (no FUSE).

One run: lock DEST (one sync at a time), sweep downloads a killed run left in
``.s3cachefs/tmp``, list the dataset (`datasets.dirplan`), refuse with the
numbers if what is to fetch does not fit on DEST's disk, delete (with
``delete``) the files of objects S3 no longer has, then fetch the new and
changed objects (`datasets.dirfetch`) and, for each, decide whether its bytes
are S3's: the check `store.checkplan` plans (MD5 ETag, additional checksum,
multipart ETag over the part layout), another check of the same bytes if S3
offers one, else one fetch more; size-checked only when S3 gives nothing to
check against (refused with ``require_checksums``), like `prefetch`
(`datasets.objectcheck`).

A verified object lands atomically: its temp file (written and fsynced in
``.s3cachefs/tmp``, same filesystem) gets S3's LastModified and is renamed
over the final name, so a reader sees the old file or the new one, never a
partial one; then one journal line records it (`datasets.dirmanifest`), so a
kill -9 at any point loses no verified object. The manifest is complete only
when every listed object is in DEST verified.

Blocking, in the calling thread (plus the fetcher's pool); ``stop`` ends a run
early (the provider's timeout): what was verified stays recorded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import (
    ConfigError,
    IncompleteError,
    NotEnoughSpaceError,
    NotFoundError,
    StaleError,
    TransientError,
)
from s3cachefs.base.values import human_bytes
from s3cachefs.datasets import dirmanifest as dm
from s3cachefs.datasets.dircheck import fatal, verdict
from s3cachefs.datasets.dirfetch import FetchItem, FetchResult, ObjectFetcher, ThreadFetcher
from s3cachefs.datasets.dirmanifest import DirManifest, Entry, Journal
from s3cachefs.datasets.dirplan import Listed, Plan, leaves_dest, list_dataset, plan, prune
from s3cachefs.datasets.dirresult import SyncOptions, SyncResult, free_space
from s3cachefs.store import checkplan
from s3cachefs.store.checksums import Check
from s3cachefs.store.s3 import S3Store
from s3cachefs.store.types import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.5  # seconds between progress events
DEFAULT_JOBS = 16  # whole-object GETs at once
LOCK_POLL = 0.2  # seconds between tries of a lock another sync holds (``wait``)


Fetchers = Callable[[ObjectStore, Callable[[ObjectInfo], Check]], ObjectFetcher]


class DirSync:
    """One sync run of one dataset into one directory (`run`)."""

    def __init__(
        self,
        options: SyncOptions,
        store: ObjectStore,
        fetcher: Fetchers,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.options = options
        self.store = store
        self.dest = options.dest.absolute()
        self.state = dm.state_dir(self.dest)
        self.fetcher = fetcher(store, self._plan_check)
        self.on_event = on_event
        self.stop = stop or threading.Event()
        self.result = SyncResult(options.source, str(self.dest), options.dry_run)
        self._started = time.monotonic()
        self._last_event = 0.0
        self._touched: set[Path] = set()  # directories to fsync before the manifest
        self._serial = 0
        self._fresh = False  # DEST made by this run

    def _plan_check(self, info: ObjectInfo) -> Check:
        return checkplan.plan(self.store, info, etag_md5s=self.options.etag_md5s)

    def run(self) -> SyncResult:
        """Blocking. Raises ConfigError (DEST, space), StoreError (S3) for the whole run;
        objects that fail are in the result (``failed``), and ``complete`` is False."""
        try:
            if self.dest.exists() and not self.dest.is_dir():
                raise ConfigError(f"{self.dest} exists and is not a directory")
        except OSError as exc:  # a parent this user may not enter
            raise ConfigError(f"{self.dest}: not writable ({exc.strerror or exc})") from None
        if self.options.dry_run:
            manifest = dm.load(self.dest) if self.state.is_dir() else None
            return self._dry_run(manifest or self._new_manifest())
        self._check_bucket()  # before anything is written into DEST
        self._fresh = not self.dest.exists()  # a refused run leaves nothing there
        with self._locked():
            manifest = dm.load(self.dest) or self._new_manifest()
            self._same_source(manifest)
            listed = list_dataset(self.store, self.options.prefix, self.options.shard)
            todo = self._count(listed, plan(self.dest, manifest, listed))
            self._check_room(todo.bytes_needed)
            manifest.shard = str(self.options.shard) if self.options.shard else None
            manifest.complete, manifest.failed = False, {}
            manifest.objects = {**todo.present, **_still(manifest, {**todo.fetch, **todo.refused})}
            # Files S3 (or the shard) no longer lists stay recorded until deleted from DEST:
            # a kill -9 before the end must not make a later `--delete` forget them.
            manifest.kept = dict(todo.gone)
            dm.save(self.dest, manifest)  # compacts the last run's journal; not complete
            journal = Journal(self.dest, manifest)
            try:
                self._gone(todo, listed, manifest, journal)
                self._fetch_all(todo, manifest, journal)
            finally:
                journal.close()
                self._finish(manifest)
        return self.result

    # ---- setup ---------------------------------------------------------------

    def _new_manifest(self) -> DirManifest:
        o = self.options
        return DirManifest(o.bucket, o.prefix, o.endpoint_url)

    def _same_source(self, manifest: DirManifest) -> None:
        if (manifest.bucket, manifest.prefix) != (self.options.bucket, self.options.prefix):
            raise ConfigError(
                f"{self.dest} holds a sync of {manifest.source}, not of {self.options.source}"
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            (self.state / "tmp").mkdir(parents=True, exist_ok=True)
            lock = (self.state / "lock").open("a")
        except OSError as exc:
            raise ConfigError(f"{self.dest}: not writable ({exc.strerror or exc})") from None
        with lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    busy = f"another sync is writing into {self.dest}"
                    if not self.options.wait:
                        raise ConfigError(busy) from None
                    if self.stop.wait(LOCK_POLL):  # waiting for it, until stopped
                        raise IncompleteError(f"{busy}; stopped while waiting") from None
            for leftover in (self.state / "tmp").iterdir():  # a killed run's downloads
                leftover.unlink()
            yield

    def _count(self, listed: Listed, todo: Plan) -> Plan:
        if not listed.objects and not listed.skipped:  # as `prefetch`: a typo is no dataset
            shard = f" in shard {self.options.shard}" if self.options.shard else ""
            if self._fresh and not self.options.dry_run:
                shutil.rmtree(self.dest, ignore_errors=True)
            raise ConfigError(f"{self.options.source} holds no objects{shard}")
        r = self.result
        r.files_total = len(listed.objects)
        r.bytes_total = sum(i.size for i in listed.objects.values())
        r.files_present = len(todo.present)
        r.bytes_needed = todo.bytes_needed
        r.skipped = listed.skipped
        r.keys = sorted(info.key for info in listed.objects.values())
        r.size_only = [
            self.options.prefix + k for k, e in todo.present.items() if not e.check.end_to_end
        ]
        r.room = free_space(self.dest)
        return todo

    def _dry_run(self, manifest: DirManifest) -> SyncResult:
        self._same_source(manifest)
        self._check_bucket()
        listed = list_dataset(self.store, self.options.prefix, self.options.shard)
        todo = self._count(listed, plan(self.dest, manifest, listed))
        deleted = [k for k in todo.gone if self.options.delete and k not in listed.all_keys]
        self.result.deleted = sorted(deleted)
        self.result.kept = sorted(set(todo.gone) - set(deleted))
        self.result.elapsed = time.monotonic() - self._started
        return self.result

    def _check_bucket(self) -> None:
        """The bucket answers (StoreError: no bucket, refused); an endpoint that does not
        answer at all is bad configuration, as for `mount` (exit 2)."""
        try:
            self.store.check_bucket()
        except TransientError as exc:
            where = self.options.endpoint_url or "AWS S3"
            raise ConfigError(f"cannot reach {where}: {exc}") from None

    def _check_room(self, needed: int) -> None:
        room = self.result.room
        if needed > room:
            raise NotEnoughSpaceError(
                f"{self.options.source} does not fit in {self.dest}: {human_bytes(needed)} to "
                f"download, {human_bytes(room)} free",
                needed=needed,
                available=room,
            )

    # ---- deletes -------------------------------------------------------------

    def _gone(self, todo: Plan, listed: Listed, manifest: DirManifest, journal: Journal) -> None:
        """Objects S3 no longer lists: deleted with ``delete`` (never another shard's)."""
        for rel in sorted(todo.gone):
            if not self.options.delete or rel in listed.all_keys or leaves_dest(self.dest, rel):
                self.result.kept.append(rel)
                continue
            path = self.dest / rel
            with suppress(FileNotFoundError):
                path.unlink()
            journal.deleted(rel)
            manifest.kept.pop(rel, None)
            self.result.deleted.append(rel)
            prune(path.parent, self.dest)

    # ---- fetches -------------------------------------------------------------

    def _fetch_all(self, todo: Plan, manifest: DirManifest, journal: Journal) -> None:
        for rel, info in todo.refused.items():
            self.result.failed[info.key] = f"refused: {rel}'s directory leads out of {self.dest}"
        items = [self._item(info, None) for info in todo.fetch.values()]
        for attempt in (1, 2):
            again: list[FetchItem] = []
            results = self.fetcher.fetch(items, stop=self.stop, tick=PROGRESS_EVERY)
            try:
                for res in results:
                    if res is not None:
                        retry = self._settle(res, attempt, manifest, journal)
                        if retry is not None:
                            again.append(retry)
                    self._progress()
            finally:  # an error or Ctrl-C here: the fetcher stops its workers now
                close = getattr(results, "close", None)
                if close is not None:
                    close()
            if not again or self.stop.is_set():
                break
            items = again
        self.result.stopped = self.stop.is_set()

    def _item(self, info: ObjectInfo, check: Check | None) -> FetchItem:
        self._serial += 1
        return FetchItem(info, self.state / "tmp" / f"{self._serial}.part", check)

    def _settle(
        self, res: FetchResult, attempt: int, manifest: DirManifest, journal: Journal
    ) -> FetchItem | None:
        """Commit the object if its bytes are S3's (`datasets.dircheck`); else the item to
        fetch it again with (None: committed, or recorded as failed)."""
        info = res.item.info
        fatal(res.error, self.dest, info)
        if isinstance(res.error, (StaleError, NotFoundError)) and attempt == 1:
            return self._changed(info)  # replaced or deleted since the listing
        if res.error is not None or res.check is None:
            return self._failed(info, str(res.error), attempt, res.check)
        o = self.options
        judged = verdict(
            self.store, res, etag_md5s=o.etag_md5s, require_checksums=o.require_checksums
        )
        if judged.reason is not None:
            _unlink(res.item.path)
            return self._failed(info, judged.reason, 2 if judged.final else attempt, judged.check)
        self._commit(res.item, judged.check, manifest, journal)
        return None

    def _changed(self, info: ObjectInfo) -> FetchItem | None:
        """Replaced in S3 since the listing: the version there now, fetched instead."""
        try:
            now = self.store.head(info.key)
        except NotFoundError:
            self.result.failed[info.key] = "deleted in S3 during the sync (run it again)"
            return None
        self.result.bytes_total += now.size - info.size
        self.result.bytes_needed += now.size - info.size
        return self._item(now, None)

    def _failed(
        self, info: ObjectInfo, reason: str, attempt: int, check: Check | None
    ) -> FetchItem | None:
        """Once more (first attempt) with ``check``, else recorded as failed."""
        if attempt == 1 and not self.stop.is_set():
            return self._item(info, check)
        self.result.failed[info.key] = reason
        log.info("sync: %s failed: %s", info.key, reason)  # the CLI and the API report it
        return None

    def _commit(
        self, item: FetchItem, check: Check, manifest: DirManifest, journal: Journal
    ) -> None:
        info = item.info
        rel = info.key[len(self.options.prefix) :]
        final = self.dest / rel
        if leaves_dest(self.dest, rel):  # a symlink made since the plan
            _unlink(item.path)
            self.result.failed[info.key] = f"refused: its directory leads out of {self.dest}"
            return
        try:
            os.utime(item.path, ns=(info.mtime_ns, info.mtime_ns))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(item.path, final)
        except OSError as exc:
            _unlink(item.path)
            fatal(exc, self.dest, info)
            self.result.failed[info.key] = f"cannot be put in place: {exc.strerror or exc}"
            return
        self._touched.add(final.parent)
        entry = Entry(info.size, info.etag, info.mtime_ns, check)
        journal.verified(rel, entry)
        manifest.objects[rel] = entry
        self.result.fetched += 1
        self.result.bytes_fetched += info.size
        if not check.end_to_end:
            self.result.size_only.append(info.key)

    # ---- the end -------------------------------------------------------------

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_event is None or (not force and now - self._last_event < PROGRESS_EVERY):
            return
        self._last_event = now
        elapsed = max(now - self._started, 1e-6)
        self.on_event(self.result.progress(self.fetcher.bytes_received, elapsed))

    def _finish(self, manifest: DirManifest) -> None:
        """Record what this run verified (also after an error): complete or not."""
        for folder in self._touched:
            if folder.is_dir():
                dm.fsync_dir(folder)
        r = self.result
        r.elapsed = time.monotonic() - self._started
        missing = r.files_total - r.files_present - r.fetched
        manifest.failed = dict(r.failed)
        manifest.complete = missing == 0 and not r.failed and not self.stop.is_set()
        manifest.synced_at = time.time()
        r.complete = manifest.complete
        dm.save(self.dest, manifest)
        self._progress(force=True)


def _still(manifest: DirManifest, fetch: dict[str, ObjectInfo]) -> dict[str, Entry]:
    """Files of changed objects: still in DEST (the old version) until replaced."""
    return {k: e for k, e in {**manifest.kept, **manifest.objects}.items() if k in fetch}


def _unlink(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


def s3_sync(
    options: SyncOptions,
    *,
    region: str | None = None,
    profile: str | None = None,
    jobs: int = DEFAULT_JOBS,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
) -> SyncResult:
    """A `DirSync` run over an `S3Store` and the `ThreadFetcher` (blocking)."""
    config = MountConfig(
        bucket=options.bucket,
        prefix=options.prefix,
        mountpoint=options.dest,
        cache_dir=dm.state_dir(options.dest),
        endpoint_url=options.endpoint_url,
        region=region,
        profile=profile,
        s3_concurrency=jobs,
        # The store does not check whole bodies against MD5 ETags itself: `dircheck` does,
        # from the bytes as they pass, and can then try S3's other checks (as prefetch).
        etag_md5="off",
    )
    store = S3Store(config)

    def fetcher(store: ObjectStore, planner: Callable[[ObjectInfo], Check]) -> ObjectFetcher:
        return ThreadFetcher(store, jobs, planner)

    return DirSync(options, store, fetcher, on_event=on_event, stop=stop).run()

"""Write-through: files being written are staged in the cache dir and uploaded on close.

`Writeback` is what the filesystem and the daemon use: the staged files of one
cache dir, from ``create`` to the last handle's ``release``. Its parts:
`staging.records` (a staged file and its record on disk), `staging.crashscan`
(what a crash left, found at start), `staging.uploads` (the upload engine) and
`staging.leftfiles` (the rules of ``s3cachefs staged``).

Durability: ``close()`` (the kernel's FLUSH) and ``fsync()`` upload the whole
staged file and return only once S3 has acknowledged it. Any failure is EIO, and
the data stays staged as "failed". S3 replaces an object atomically, so readers
see the old object or the new one, never a mix.

Handles: ``create`` opens a staged file with one handle (the filesystem counts
further handles of the same file on ``staged.handles``); the last ``release``
uploads what was written since the last upload and, if S3 holds the bytes,
hands the data file to the cache as the new version's copy.

Concurrency: a staged file's ``lock`` is held by an upload and by each write,
so the bytes uploaded are exactly the bytes whose CRCs are recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import Counter

import trio

from s3cachefs.base.errors import ConfigError, UploadFailedError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.staging import crashscan, leftfiles
from s3cachefs.staging.records import (
    FAILED,
    SUPERSEDED,
    UNREADABLE,
    UPLOADED,
    WRITING,
    Staged,
    disk_error,
    save_record,
)
from s3cachefs.staging.uploads import Uploads
from s3cachefs.store.types import ObjectStore

log = logging.getLogger(__name__)


class Writeback:
    """Staged files of one cache dir, their uploads, and what crashes left behind."""

    def __init__(
        self,
        cache: BlockCache,
        store: ObjectStore,
        *,
        part_size: int,
        s3_limiter: trio.CapacityLimiter,
        disk_limiter: trio.CapacityLimiter,
        parallel_parts: int = 4,
    ) -> None:
        self.cache = cache
        self.store = store
        self.part_size = part_size
        self.dir = cache.root / "staging"
        self.staged: dict[str, Staged] = {}
        self.stats: Counter[str] = Counter()
        self._disk_limiter = disk_limiter
        if part_size % cache.block_size:  # the cache dir keeps the block size it was made with
            raise ConfigError(
                f"upload part size {part_size} is not a multiple of the block size "
                f"{cache.block_size} of cache dir {cache.cache_dir}"
            )
        self.uploads = Uploads(
            store,
            part_size=part_size,
            block_size=cache.block_size,
            s3_limiter=s3_limiter,
            parallel_parts=parallel_parts,
            staging_dir=self.dir,
        )

    def open(self) -> None:
        """Find what an earlier daemon left staged (blocking; after the cache is open)."""
        for staged in crashscan.scan(self.dir):
            self.staged[staged.id] = staged

    # ---- files being written ---------------------------------------------

    async def create(self, key: str, *, create_only: bool) -> Staged:
        """A new, empty staged file for ``key``, with its record on disk first; one handle."""
        sid = uuid.uuid4().hex
        staged = Staged(
            sid, self.store.bucket, key, self.dir / f"{sid}.data", time.time(),
            create_only=create_only,
        )  # fmt: skip
        try:
            await trio.to_thread.run_sync(self._create_blocking, staged, limiter=self._disk_limiter)
        except OSError as exc:
            raise disk_error(exc, key) from None
        staged.handles = 1
        self.staged[sid] = staged
        return staged

    def _create_blocking(self, staged: Staged) -> None:
        save_record(staged)
        staged.fd = os.open(staged.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    async def write(self, staged: Staged, offset: int, data: bytes) -> int:
        async with staged.lock:  # never while an upload reads the file
            assert staged.fd is not None
            await self._dirty(staged)
            try:
                n = await trio.to_thread.run_sync(
                    os.pwrite, staged.fd, data, offset, limiter=self._disk_limiter
                )
            except OSError as exc:
                raise disk_error(exc, staged.key) from None
            staged.size = max(staged.size, offset + n)
            staged.dirty = True
            return n

    async def truncate(self, staged: Staged, size: int) -> None:
        async with staged.lock:
            assert staged.fd is not None
            await self._dirty(staged)
            try:
                await trio.to_thread.run_sync(os.ftruncate, staged.fd, size)
            except OSError as exc:
                raise disk_error(exc, staged.key) from None
            staged.size = size
            staged.dirty = True

    async def _dirty(self, staged: Staged) -> None:
        """About to change staged bytes: the record must stop saying "uploaded" first."""
        if staged.state == UPLOADED:
            staged.state = WRITING
            try:
                await trio.to_thread.run_sync(save_record, staged)
            except OSError as exc:
                raise disk_error(exc, staged.key) from None

    async def upload(self, staged: Staged) -> None:
        """Make S3 hold exactly the staged bytes; UploadFailedError (EIO) if it cannot."""
        async with staged.lock:
            if not staged.dirty:
                return
            try:
                etag, crcs = await self.uploads.send(staged)
            except Exception as exc:  # noqa: BLE001 -- any failure is EIO and keeps the data
                await self._failed(staged, exc)
                raise UploadFailedError(
                    f"s3://{staged.bucket}/{staged.key}: {staged.error}"
                ) from None
            staged.etag, staged.crcs, staged.dirty = etag, crcs, False
            staged.create_only = False  # the object is ours now: the next upload replaces it
            staged.state, staged.error = UPLOADED, ""
            self.stats["uploads"] += 1
            self.stats["upload_bytes"] += staged.size
            try:  # a crash from now on loses nothing: say so, or it would be reported
                await trio.to_thread.run_sync(save_record, staged)
            except OSError as exc:
                log.warning("cannot update staging record of %s: %s", staged.key, exc.strerror)
            await self._supersede(staged)

    async def _supersede(self, uploaded: Staged) -> None:
        """Older failed or left-over copies of a key just uploaded must not replace it later."""
        for old in self.left():
            if (
                old.key == uploaded.key
                and old.bucket == uploaded.bucket
                and old.state != UNREADABLE
            ):
                old.state = SUPERSEDED
                old.error = "this key was uploaded again since; upload only by id, knowingly"
                with contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(save_record, old)

    async def _failed(self, staged: Staged, exc: BaseException) -> None:
        reason = self.uploads.failure(staged, exc)
        staged.state, staged.error = FAILED, reason
        self.stats["upload_failures"] += 1
        log.error(
            "upload of s3://%s/%s failed: %s; the data stays staged (`s3cachefs staged`)",
            staged.bucket,
            staged.key,
            reason,
        )
        try:
            await trio.to_thread.run_sync(save_record, staged)
        except OSError as err:
            log.error("cannot update staging record of %s: %s", staged.key, err.strerror)

    async def release(self, staged: Staged) -> ObjectVersion | None:
        """One handle closed. At the last: the version now in S3, cached; None if kept staged."""
        staged.handles -= 1
        if staged.handles > 0:
            return None
        staged.closing = True
        try:
            if staged.dirty and staged.state == WRITING:  # written after the last close
                with contextlib.suppress(UploadFailedError):  # logged, and kept staged
                    await self.upload(staged)
        finally:
            if staged.fd is not None:
                os.close(staged.fd)
                staged.fd = None
            staged.closing = False
        if staged.dirty or staged.etag is None:
            return None
        return await self._finish(staged)

    async def _finish(self, staged: Staged) -> ObjectVersion:
        """Uploaded: the data becomes the cache's copy of the new version; the record goes."""
        assert staged.etag is not None
        version = ObjectVersion(staged.bucket, staged.key, staged.etag, staged.size)
        staged.final = version  # readers of the staged inode switch to the cache now
        staged.closing = True
        try:
            await self.cache.adopt(version, staged.path, staged.crcs)
            await trio.to_thread.run_sync(staged.path.unlink, True)  # if the cache did not take it
            await trio.to_thread.run_sync(staged.record_path.unlink, True)
        finally:
            staged.closing = False
            self.staged.pop(staged.id, None)
        return version

    # ---- what is left: `s3cachefs staged` ----------------------------------

    def left(self) -> list[Staged]:
        """Staged files no application has open nor is closing, oldest first."""
        return leftfiles.left(self.staged.values())

    def select(self, targets: list[str], every: bool, *, upload: bool) -> list[Staged]:
        """Left files of this mount's bucket named by id or key, or all (--all skips superseded)."""
        return leftfiles.select(
            self.staged.values(), self.store.bucket, targets, every, upload=upload
        )

    async def upload_left(self, staged: Staged, *, create_only: bool) -> ObjectVersion:
        """Upload a left-over or failed file now (an explicit user action)."""
        leftfiles.check_bucket(staged, self.store.bucket)
        staged.create_only, staged.dirty = create_only, True
        if staged.upload_id is not None:  # from the crashed attempt: S3 would keep its parts
            await self.uploads.abort(staged)
        await self.upload(staged)
        return await self._finish(staged)

    async def discard(self, staged: Staged) -> None:
        leftfiles.check_bucket(staged, self.store.bucket)
        await self.uploads.abort(staged)
        await trio.to_thread.run_sync(staged.path.unlink, True)
        await trio.to_thread.run_sync(staged.record_path.unlink, True)
        self.staged.pop(staged.id, None)
        log.warning(
            "discarded staged file s3://%s/%s (%d bytes)", staged.bucket, staged.key, staged.size
        )

"""Write-through: files being written are staged in the cache dir and uploaded on close.

Layout, beside the block cache's objects and on the same filesystem, so that a
finished upload becomes cached data with one rename::

    CACHE_DIR/v1/staging/<id>.json   {"bucket", "key", "created", "state", "error", "upload_id"}
    CACHE_DIR/v1/staging/<id>.data   the bytes written so far

The record is written (atomically) before the first byte and removed last,
after the upload succeeded and the data moved into the cache. So after a crash
every file whose upload did not complete still has its record and its data:
the daemon reports it at start and in ``status``, and only an explicit
``s3cachefs staged --upload`` or ``--discard`` acts on it. Nothing is uploaded
behind the user's back: a file a crash left half-written is not what the
application meant to publish.

Durability: ``close()`` (the kernel's FLUSH) and ``fsync()`` upload the whole
staged file and return only once S3 has acknowledged it, as one PUT or as a
multipart upload whose parts go up in parallel. Every request carries
Content-MD5 and a CRC64NVME of its body; a multipart upload is a full-object
CRC64NVME one, completed with the whole object's CRC (combined from the
parts'), so S3 checks what it assembled and keeps a checksum that later
prefetches verify the object by end to end (`daemon.checksums`). A server that
refuses additional checksums gets the upload again without them, a multipart
one from its start (`daemon.uploadchecksums`): Content-MD5 still guards every
request. Any failure is EIO, and the data stays staged as "failed". S3 replaces
an object atomically, so readers see the old object or the new one, never a mix.

Concurrency: a staged file's ``lock`` is held by an upload and by each write,
so the bytes uploaded are exactly the bytes whose CRCs are recorded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from s3cachefs.base.errors import (
    AlreadyExistsError,
    BusyError,
    ChecksumsRefusedError,
    ConfigError,
    NoSpaceError,
    StoreError,
    UploadFailedError,
)
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.store import checksums
from s3cachefs.store.s3 import ObjectStore

log = logging.getLogger(__name__)

WRITING = "writing"  # open by an application in this daemon
UPLOADED = "uploaded"  # on disk = what S3 acknowledged last (a crash now loses nothing)
FAILED = "failed"  # the last upload failed; kept until uploaded or discarded
LEFT_OVER = "left-over"  # found at start: a crash or stop came before the upload completed
SUPERSEDED = "superseded"  # failed or left over, and this key was uploaded again since
UNREADABLE = "unreadable"  # its record is damaged: the key is unknown; discard only


class StagingReadError(Exception):
    """The staged bytes could not be read back for an upload."""


@dataclass
class Staged:
    """One file being written (or left behind), and what its last upload sent."""

    id: str
    bucket: str
    key: str
    path: Path  # the .data file
    created: float
    state: str = WRITING
    error: str = ""
    upload_id: str | None = None  # a multipart upload in progress: aborted on discard
    size: int = 0
    create_only: bool = True  # upload with If-None-Match: * (never replace someone's object)
    dirty: bool = True  # bytes written since the last successful upload (new: empty file)
    etag: str | None = None  # of the last successful upload
    crcs: dict[int, int] = field(default_factory=dict)  # per block, of the bytes uploaded
    fd: int | None = None
    handles: int = 0  # open file handles writing it
    closing: bool = False  # the last handle closed: its upload and caching are under way
    final: ObjectVersion | None = None  # once uploaded and closed: the version readers read
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def record_path(self) -> Path:
        return self.path.with_suffix(".json")

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bucket": self.bucket,
            "key": self.key,
            "state": self.state,
            "size": self.size,
            "created": self.created,
            "error": self.error,
        }

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes written so far (blocking: call in a thread)."""
        if self.fd is not None:
            return os.pread(self.fd, length, offset)
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def read_for_upload(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` staged bytes, or StagingReadError (never a network error)."""
        try:
            data = self.pread(offset, length)
        except OSError as exc:
            raise StagingReadError(f"cannot read the staged data: {exc.strerror}") from None
        if len(data) != length:
            raise StagingReadError("the staged data is shorter than what was written")
        return data


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
        self._s3_limiter = s3_limiter
        self._disk_limiter = disk_limiter
        self._parallel_parts = parallel_parts
        if part_size % cache.block_size:  # the cache dir keeps the block size it was made with
            raise ConfigError(
                f"upload part size {part_size} is not a multiple of the block size "
                f"{cache.block_size} of cache dir {cache.cache_dir}"
            )

    # ---- start-up --------------------------------------------------------

    def open(self) -> None:
        """Find what an earlier daemon left staged (blocking; after the cache is open)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for data in self.dir.glob("*.data"):
            if not data.with_suffix(".json").exists():  # uploaded; its record already gone
                data.unlink(missing_ok=True)
        for record in sorted(self.dir.glob("*.json")):
            data = record.with_suffix(".data")
            try:
                size = data.stat().st_size
            except FileNotFoundError:  # the data moved into the cache; only the record was left
                record.unlink(missing_ok=True)
                continue
            try:
                meta = json.loads(record.read_text())
                bucket, key, created = str(meta["bucket"]), str(meta["key"]), float(meta["created"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error(
                    "staging record %s is damaged (%s): `s3cachefs staged` lists it", record, exc
                )
                staged = Staged(record.stem, "?", "?", data, record.stat().st_mtime, UNREADABLE)
                staged.size, staged.error = size, f"damaged staging record: {exc}"
                self.staged[staged.id] = staged
                continue
            state = str(meta.get("state"))
            if state == UPLOADED:  # S3 acknowledged exactly these bytes: nothing to keep
                log.info("staged copy of s3://%s/%s was uploaded; removed", bucket, key)
                data.unlink(missing_ok=True)
                record.unlink(missing_ok=True)
                continue
            staged = Staged(
                id=record.stem,
                bucket=bucket,
                key=key,
                path=data,
                created=created,
                state=state if state in (FAILED, SUPERSEDED) else LEFT_OVER,
                error=str(meta.get("error") or "the daemon stopped before the upload completed"),
                upload_id=meta.get("upload_id"),
                size=size,
            )
            self.staged[staged.id] = staged
            log.warning(
                "staged file s3://%s/%s (%d bytes) was never uploaded: %s; "
                "`s3cachefs staged` lists it, --upload or --discard resolves it",
                staged.bucket,
                staged.key,
                size,
                staged.error,
            )

    # ---- files being written ---------------------------------------------

    async def create(self, key: str, *, create_only: bool) -> Staged:
        """A new, empty staged file for ``key``, with its record on disk first."""
        sid = uuid.uuid4().hex
        staged = Staged(
            sid, self.store.bucket, key, self.dir / f"{sid}.data", time.time(),
            create_only=create_only,
        )  # fmt: skip
        try:
            await trio.to_thread.run_sync(self._create_blocking, staged, limiter=self._disk_limiter)
        except OSError as exc:
            raise _disk_error(exc, key) from None
        staged.handles = 1
        self.staged[sid] = staged
        return staged

    def _create_blocking(self, staged: Staged) -> None:
        self._save_blocking(staged)
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
                raise _disk_error(exc, staged.key) from None
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
                raise _disk_error(exc, staged.key) from None
            staged.size = size
            staged.dirty = True

    async def _dirty(self, staged: Staged) -> None:
        """About to change staged bytes: the record must stop saying "uploaded" first."""
        if staged.state == UPLOADED:
            staged.state = WRITING
            try:
                await trio.to_thread.run_sync(self._save_blocking, staged)
            except OSError as exc:
                raise _disk_error(exc, staged.key) from None

    async def upload(self, staged: Staged) -> None:
        """Make S3 hold exactly the staged bytes; UploadFailedError (EIO) if it cannot."""
        async with staged.lock:
            if not staged.dirty:
                return
            try:
                if staged.size <= self.part_size:
                    etag, crcs = await trio.to_thread.run_sync(
                        self._put_blocking, staged, limiter=self._s3_limiter
                    )
                else:
                    etag, crcs = await self._multipart(staged)
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
                await trio.to_thread.run_sync(self._save_blocking, staged)
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
                    await trio.to_thread.run_sync(self._save_blocking, old)

    async def _failed(self, staged: Staged, exc: BaseException) -> None:
        if isinstance(exc, AlreadyExistsError):
            reason = (
                "created in S3 by someone else meanwhile; not replaced without --allow-overwrite"
            )
        elif isinstance(exc, StoreError | StagingReadError):
            reason = str(exc)
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = f"no space left in {self.dir}: free some space on its disk and retry"
        else:
            log.error("upload of %s failed unexpectedly", staged.key, exc_info=exc)
            reason = f"unexpected error: {type(exc).__name__}: {exc}"
        staged.state, staged.error = FAILED, reason
        self.stats["upload_failures"] += 1
        log.error(
            "upload of s3://%s/%s failed: %s; the data stays staged (`s3cachefs staged`)",
            staged.bucket,
            staged.key,
            reason,
        )
        try:
            await trio.to_thread.run_sync(self._save_blocking, staged)
        except OSError as err:
            log.error("cannot update staging record of %s: %s", staged.key, err.strerror)

    def _put_blocking(self, staged: Staged) -> tuple[str, dict[int, int]]:
        data = staged.read_for_upload(0, staged.size)
        crc = checksums.crc64nvme(data)  # S3 checks it, keeps it; prefetch verifies by it
        etag = self.store.put_object(
            staged.key, data, create_only=staged.create_only, crc64nvme=crc
        )
        return etag, self._crcs(data, 0)

    def _crcs(self, data: bytes, offset: int) -> dict[int, int]:
        """CRC32 per cache block of ``data``, which starts at block-aligned ``offset``."""
        bs = self.cache.block_size
        view = memoryview(data)
        return {(offset + i) // bs: zlib.crc32(view[i : i + bs]) for i in range(0, len(data), bs)}

    async def _multipart(self, staged: Staged) -> tuple[str, dict[int, int]]:
        """One multipart upload; refused for its checksums, all of it again without them."""
        if not self.store.sends_checksums:
            return await self._multipart_once(staged, with_checksums=False)
        try:
            return await self._multipart_once(staged, with_checksums=True)
        except ChecksumsRefusedError as exc:  # that upload was aborted: nothing of it is kept
            reason = str(exc)
        result = await self._multipart_once(staged, with_checksums=False)
        self.store.checksums_refused(reason)
        return result

    async def _multipart_once(
        self, staged: Staged, *, with_checksums: bool
    ) -> tuple[str, dict[int, int]]:
        upload_id = await trio.to_thread.run_sync(
            lambda: self.store.create_multipart(staged.key, with_checksums=with_checksums),
            limiter=self._s3_limiter,
        )
        staged.upload_id = upload_id
        nparts = -(-staged.size // self.part_size)
        etags = [""] * nparts
        part_crcs = [0] * nparts  # CRC64NVME of each part (with checksums)
        crcs: dict[int, int] = {}
        errors: list[Exception] = []
        parts = trio.CapacityLimiter(self._parallel_parts)

        async def send(number: int, cancel: trio.CancelScope) -> None:
            async with parts:
                try:
                    etag, part_crc, block_crcs = await trio.to_thread.run_sync(
                        self._part_blocking,
                        staged,
                        upload_id,
                        number,
                        with_checksums,
                        limiter=self._s3_limiter,
                    )
                except Exception as exc:  # noqa: BLE001 -- re-raised after the nursery
                    errors.append(exc)
                    cancel.cancel()
                    return
                etags[number - 1], part_crcs[number - 1] = etag, part_crc
                crcs.update(block_crcs)

        try:
            # The id is on disk before any part: a crash leaves something to abort.
            await self._save_upload_id(staged)
            async with trio.open_nursery() as nursery:
                for number in range(1, nparts + 1):
                    nursery.start_soon(send, number, nursery.cancel_scope)
            if errors:
                raise errors[0]
            whole = self._whole_crc(staged.size, part_crcs) if with_checksums else None
            etag = await trio.to_thread.run_sync(
                lambda: self.store.complete_multipart(
                    staged.key,
                    upload_id,
                    etags,
                    create_only=staged.create_only,
                    part_crcs=part_crcs if with_checksums else None,
                    crc64nvme=whole,
                ),
                limiter=self._s3_limiter,
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abort(staged)
            raise
        staged.upload_id = None
        return etag, crcs

    async def _save_upload_id(self, staged: Staged) -> None:
        """Record the multipart upload id; on a full disk, upload anyway and say so.

        An upload must need no free space: it is how a full cache disk gets
        emptied (the staged data is moved into the cache or deleted once S3
        has it). Without the id on disk, a crash during the upload leaves its
        parts in S3 until a lifecycle rule removes them; the staged data itself
        stays listed for `staged --upload` as before.
        """
        try:
            await trio.to_thread.run_sync(self._save_blocking, staged)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning(
                "no space in %s to record the multipart upload of %s; uploading anyway "
                "(if the daemon stops before it completes, abort upload %s by hand)",
                self.dir,
                staged.key,
                staged.upload_id,
            )

    def _part_blocking(
        self, staged: Staged, upload_id: str, number: int, with_checksums: bool
    ) -> tuple[str, int, dict[int, int]]:
        """Upload one part: (its ETag, its CRC64NVME or 0, the CRC32 of each cache block in it)."""
        offset = (number - 1) * self.part_size
        length = min(self.part_size, staged.size - offset)
        data = staged.read_for_upload(offset, length)
        crc = checksums.crc64nvme(data) if with_checksums else 0
        etag = self.store.upload_part(
            staged.key, upload_id, number, data, crc64nvme=crc, with_checksums=with_checksums
        )
        return etag, crc, self._crcs(data, offset)

    def _whole_crc(self, size: int, part_crcs: list[int]) -> int:
        """The object's CRC64NVME from its parts': S3 checks the assembly against it."""
        whole = part_crcs[0]
        for number in range(2, len(part_crcs) + 1):
            length = min(self.part_size, size - (number - 1) * self.part_size)
            whole = checksums.combine_crc64nvme(whole, part_crcs[number - 1], length)
        return whole

    async def _abort(self, staged: Staged) -> None:
        if staged.upload_id is None:
            return
        try:
            await trio.to_thread.run_sync(
                self.store.abort_multipart, staged.key, staged.upload_id, limiter=self._s3_limiter
            )
        except StoreError as exc:  # S3 expires it by lifecycle rule, if the bucket has one
            log.warning("could not abort multipart upload of %s: %s", staged.key, exc)
        staged.upload_id = None

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
        return sorted(
            (s for s in self.staged.values() if s.handles == 0 and not s.closing),
            key=lambda s: s.created,
        )

    def select(self, targets: list[str], every: bool, *, upload: bool) -> list[Staged]:
        """Left files of this mount's bucket named by id or key, or all (--all skips superseded)."""
        left = self.left()
        mine = [s for s in left if s.bucket == self.store.bucket or s.state == UNREADABLE]
        if every:
            return [
                s for s in mine if s.state != SUPERSEDED and not (upload and s.state == UNREADABLE)
            ]
        chosen = [
            s for s in mine if s.id in targets or (s.key in targets and s.state != SUPERSEDED)
        ]
        for target in targets:
            if any(target in (s.id, s.key) for s in chosen):
                continue
            other = [s for s in left if target in (s.id, s.key) and s not in mine]
            if other:
                raise ConfigError(
                    f"{target} was written for s3://{other[0].bucket}; mount that bucket on "
                    "this cache dir to upload or discard it"
                )
            if any(target == s.key for s in self.staged.values()):
                raise BusyError(f"{target}: still open for writing, or superseded (name its id)")
            raise ConfigError(f"nothing staged as {target}")
        if upload and any(s.state == UNREADABLE for s in chosen):
            raise ConfigError("a staged file with a damaged record has no key: discard it")
        return chosen

    async def upload_left(self, staged: Staged, *, create_only: bool) -> ObjectVersion:
        """Upload a left-over or failed file now (an explicit user action)."""
        self._check_bucket(staged)
        staged.create_only, staged.dirty = create_only, True
        if staged.upload_id is not None:  # from the crashed attempt: S3 would keep its parts
            await self._abort(staged)
        await self.upload(staged)
        return await self._finish(staged)

    def _check_bucket(self, staged: Staged) -> None:
        if staged.bucket != self.store.bucket and staged.state != UNREADABLE:
            raise ConfigError(
                f"{staged.key} was written for s3://{staged.bucket}; mount that bucket on "
                "this cache dir to upload or discard it"
            )

    async def discard(self, staged: Staged) -> None:
        self._check_bucket(staged)
        await self._abort(staged)
        await trio.to_thread.run_sync(staged.path.unlink, True)
        await trio.to_thread.run_sync(staged.record_path.unlink, True)
        self.staged.pop(staged.id, None)
        log.warning(
            "discarded staged file s3://%s/%s (%d bytes)", staged.bucket, staged.key, staged.size
        )

    def _save_blocking(self, staged: Staged) -> None:
        record = {
            "bucket": staged.bucket,
            "key": staged.key,
            "created": staged.created,
            "state": staged.state,
            "error": staged.error,
            "upload_id": staged.upload_id,
            "etag": staged.etag,
        }
        tmp = staged.record_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, staged.record_path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk must not also collect empty files
            raise


def _disk_error(exc: OSError, key: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{key}: no space left for staging in the cache dir")
    return UploadFailedError(f"{key}: staging write failed: {exc.strerror}")

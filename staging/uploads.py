"""The upload engine: one staged file's bytes into S3, as one PUT or a parallel multipart upload.

Every request carries Content-MD5 and a CRC64NVME of its body; a multipart
upload is a full-object CRC64NVME one, completed with the whole object's CRC
(combined from the parts'), so S3 checks what it assembled and keeps a
checksum that later prefetches verify the object by end to end
(`store.checksums`). A server that refuses additional checksums gets the
upload again without them, a multipart one from its start
(`store.uploadchecksums`): Content-MD5 still guards every request. What went
up is returned with the CRC32 of each cache block of it, so the staged file can
become the cache's copy of the new version.

The caller holds the staged file's ``lock``: the bytes read here are exactly
the bytes whose CRCs are returned.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import trio

from s3cachefs.base.errors import AlreadyExistsError, ChecksumsRefusedError, StoreError
from s3cachefs.staging.records import Staged, StagingReadError, save_record
from s3cachefs.store import checksums
from s3cachefs.store.crc import crc32
from s3cachefs.store.types import ObjectStore

log = logging.getLogger(__name__)


class Uploads:
    """Uploads to one store, in parts of ``part_size``; CRCs per ``block_size`` block."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        part_size: int,
        block_size: int,
        s3_limiter: trio.CapacityLimiter,
        parallel_parts: int,
        staging_dir: Path,
    ) -> None:
        self.store = store
        self.part_size = part_size
        self.block_size = block_size
        self._s3_limiter = s3_limiter
        self._parallel_parts = parallel_parts
        self._dir = staging_dir  # named in messages about its free space

    async def send(self, staged: Staged) -> tuple[str, dict[int, int]]:
        """Upload the staged bytes: (the new object's ETag, the CRC32 of each cache block)."""
        if staged.size <= self.part_size:
            return await trio.to_thread.run_sync(
                self._put_blocking, staged, limiter=self._s3_limiter
            )
        return await self._multipart(staged)

    def failure(self, staged: Staged, exc: BaseException) -> str:
        """Why an upload failed, in words for `staged` and the log."""
        if isinstance(exc, AlreadyExistsError):
            return "created in S3 by someone else meanwhile; not replaced without --allow-overwrite"
        if isinstance(exc, StoreError | StagingReadError):
            return str(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left in {self._dir}: free some space on its disk and retry"
        log.error("upload of %s failed unexpectedly", staged.key, exc_info=exc)
        return f"unexpected error: {type(exc).__name__}: {exc}"

    def _put_blocking(self, staged: Staged) -> tuple[str, dict[int, int]]:
        data = staged.read_for_upload(0, staged.size)
        crc = checksums.crc64nvme(data)  # S3 checks it, keeps it; prefetch verifies by it
        etag = self.store.put_object(
            staged.key, data, create_only=staged.create_only, crc64nvme=crc
        )
        return etag, self._crcs(data, 0)

    def _crcs(self, data: bytes, offset: int) -> dict[int, int]:
        """CRC32 per cache block of ``data``, which starts at block-aligned ``offset``."""
        bs = self.block_size
        view = memoryview(data)
        return {(offset + i) // bs: crc32(view[i : i + bs]) for i in range(0, len(data), bs)}

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
                await self.abort(staged)
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
            await trio.to_thread.run_sync(save_record, staged)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning(
                "no space in %s to record the multipart upload of %s; uploading anyway "
                "(if the daemon stops before it completes, abort upload %s by hand)",
                self._dir,
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

    async def abort(self, staged: Staged) -> None:
        """Abort the multipart upload ``staged`` has in progress, if any (S3 would keep parts)."""
        if staged.upload_id is None:
            return
        try:
            await trio.to_thread.run_sync(
                self.store.abort_multipart, staged.key, staged.upload_id, limiter=self._s3_limiter
            )
        except StoreError as exc:  # S3 expires it by lifecycle rule, if the bucket has one
            log.warning("could not abort multipart upload of %s: %s", staged.key, exc)
        staged.upload_id = None

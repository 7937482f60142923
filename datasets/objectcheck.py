"""Whether a complete object in the cache is the object S3 has, end to end (for prefetch).

Each object, once all its blocks are in, is re-read from disk: every block's
CRC, and the whole object against a digest S3 computed (`store.checksums`: the
MD5 ETag, an additional checksum, or the multipart ETag over the part layout).
An object S3 gives nothing to check against passes "size-checked only". A
32-hex ETag the bytes do not match is taken for no MD5 (size-checked only) only
when S3 says so (SSE-KMS, SSE-C) or the mount has ``--etag-md5 off``;
otherwise the object fails. On a mismatch: another check of the same bytes if
S3 offers one, else the object is fetched again once, then decided.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.store import checkplan, checksums
from s3cachefs.store.checksums import Check
from s3cachefs.store.responses import etag_md5
from s3cachefs.store.types import ObjectInfo, ObjectStore


class ObjectFailed(Exception):
    """The object is not S3's, or cannot be kept in the cache (the message says which)."""


class ObjectCheck:
    """Checks complete cached objects of one store against S3's digests."""

    def __init__(self, store: ObjectStore, cache: BlockCache, *, etag_md5s: bool) -> None:
        self.store = store
        self.cache = cache
        # False (--etag-md5 off): a 32-hex ETag is no MD5; S3 is asked for a checksum instead.
        self.etag_md5s = etag_md5s

    async def first_check(self, info: ObjectInfo) -> Check:
        """The check `check` starts with (HEADs only if the ETag is not taken as an MD5),
        for a digest computed while the bytes are written (`cache.bulk`)."""
        return await self._plan(info, ask_s3=not self.etag_md5s)

    async def check(self, info: ObjectInfo, version: ObjectVersion) -> Check:
        """The check the complete object passed; ObjectFailed (or StoreError) if none did."""
        check = await self._plan(info, ask_s3=not self.etag_md5s)
        asked = check.kind != "md5"  # whether S3 was asked for its checksum
        refetched, first = False, ""
        while True:
            await self.cache.drain_object(version)
            intact, digest = await self.cache.verify_object(version, check)
            if intact:
                return checksums.resolved(check, digest)
            if not self.cache.missing_blocks(version):  # CRC-clean, yet not S3's digest
                other = await self._other_check(info, check, asked)
                asked, changed = (
                    True,
                    (other.kind, other.value, other.parts)
                    != (
                        check.kind,
                        check.value,
                        check.parts,
                    ),
                )
                check = other
                if changed:
                    continue
                if refetched:
                    raise await self._mismatch(version, check, same_bytes=digest == first)
                first = digest
            elif refetched:
                raise ObjectFailed("could not be kept in the cache (disk full or failing?)")
            if not await self.cache.refetch(version):
                raise ObjectFailed(f"content does not match {check.describe()} in S3")
            refetched = True

    async def _other_check(self, info: ObjectInfo, check: Check, asked: bool) -> Check:
        """The same bytes, checked another way S3 offers, or ``check`` again."""
        if check.guessed:  # equal parts were assumed: ask S3 for every part
            check = await self._s3(checkplan.confirmed, self.store, info, check)
        elif not asked:  # an ETag that looks like an MD5 may not be one (SSE-KMS)
            # S3's checksum; "size" only if S3 says the ETag is no MD5; else the MD5 again.
            return await self._plan(info, ask_s3=True)
        return check

    async def _mismatch(
        self, version: ObjectVersion, check: Check, *, same_bytes: bool
    ) -> ObjectFailed:
        """Fetched twice, CRC-clean, and still not S3's digest: failed.

        The same bytes twice against an MD5 ETag are not taken for a non-MD5 ETag: S3
        did not say so (`checkplan.plan`), and a proxy or server that corrupts the same
        way every time looks just the same.
        """
        # Its blocks' CRCs are of wrong bytes: dropped before the failure is reported (the
        # job may end at once), and whole even if the job is being cancelled.
        with trio.CancelScope(shield=True):
            await self.cache.forget_object(version)
        reason = f"content does not match {check.describe()} in S3"
        if check.kind == "md5" and same_bytes:
            reason += (
                ", twice over with the same bytes (S3 gives no other checksum for it): "
                "if this server's ETags are not MD5s, mount with --etag-md5 off"
            )
        return ObjectFailed(reason)

    async def _plan(self, info: ObjectInfo, *, ask_s3: bool) -> Check:
        md5 = etag_md5(info.etag)
        if md5 is not None and not ask_s3:  # `checkplan.plan` asks S3 nothing: no thread
            return Check("md5", md5)
        plan = functools.partial(checkplan.plan, ask_s3=ask_s3, etag_md5s=self.etag_md5s)
        return await self._s3(plan, self.store, info)

    async def _s3(self, fn: Callable[..., Check], *args: Any) -> Check:
        """A blocking call that asks S3 (HEADs), in a thread under the S3 limiter."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.cache.s3_limiter)

"""Which object version an inode and a file handle serve, and when that may change.

A version is (key, ETag, size). The rules (README, "Consistency"):

- An inode is one version. The kernel caches pages per inode, so an inode
  that returned bytes of one version must never return bytes of another:
  `VersionGuard.served` checks every read before its bytes leave. A
  re-listing that shows another version for a name gives the name a new inode
  (`Tree._child`); the old inode stays valid for its open handles until the
  kernel forgets it.
- A file handle reads the version it was bound to at open, clipped at that
  version's size. GETs are conditional on its ETag; a refusal (`StaleError`)
  ends in ESTALE for the handle, never in bytes of another version.
- Except when nothing was served yet: some gateways list one ETag and answer
  GET/HEAD with another (issue 11, row 7), and a fresh open may race a
  replacement. A handle that has returned no byte, on an inode that has
  returned none either, is re-validated with one HEAD: if the size is the
  node's and the ETag differs, one WARNING names both ETags, the node and the
  handle are re-bound to HEAD's version in place (no kernel page of the inode
  can exist, so the inode may stay) and the read is retried once. Anything
  else (another size, a deleted key, a HEAD that failed, an inode that served
  bytes) is ESTALE, and the node is retired.

Concurrency: everything here changes on the trio thread; `served` and the
checks after each ``await`` in `rebind` must not await.
"""

from __future__ import annotations

import logging

import trio

from s3cachefs.base.errors import NotFoundError, StaleError, StoreError
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.fs.nodes import FileHandle, Node
from s3cachefs.store.types import ObjectStore

log = logging.getLogger(__name__)


class VersionGuard:
    """Keeps every inode and handle on one version; re-binds only what served nothing."""

    def __init__(self, store: ObjectStore, s3_limiter: trio.CapacityLimiter) -> None:
        self._store = store
        self._s3_limiter = s3_limiter
        self._checking: dict[int, trio.Event] = {}  # inode -> its HEAD in progress

    def served(self, handle: FileHandle, version: ObjectVersion) -> None:
        """Bytes of ``version`` are about to leave through ``handle``. Must not await.

        Raises StaleError when the inode already returned bytes of another
        version (a read that raced a re-bind): those pages may be in the
        kernel's cache, so these bytes must not join them.
        """
        node = handle.node
        if node.served_etag is None:
            node.served_etag = version.etag
        elif node.served_etag != version.etag:
            raise StaleError(f"{node.key}: this inode served ETag {node.served_etag} already")
        handle.served = True

    async def rebind(self, handle: FileHandle, stale: ObjectVersion) -> bool:
        """After S3 refused ``stale``: whether ``handle`` now names another version to retry."""
        node = handle.node
        if handle.served or node.retired or handle.staged is not None:
            return False
        if node.etag == stale.etag:  # nobody has re-checked the node since this handle opened
            if node.served_etag is not None:  # the kernel may hold its pages: no new bytes here
                return False
            pending = self._checking.get(node.ino)
            if pending is not None:
                await pending.wait()
            else:
                await self._check(node, stale)
        if node.etag == stale.etag or node.retired or node.served_etag not in (None, node.etag):
            return False
        handle.version = ObjectVersion(stale.bucket, node.key, node.etag, node.size)
        handle.readahead_until = 0
        return True

    async def _check(self, node: Node, stale: ObjectVersion) -> None:
        """HEAD the key; re-bind ``node`` in place if only the ETag differs (same size)."""
        done = self._checking[node.ino] = trio.Event()
        try:
            info = await trio.to_thread.run_sync(
                self._store.head, node.key, limiter=self._s3_limiter
            )
        except NotFoundError:
            return  # deleted: ESTALE, and the re-listing drops the name
        except StoreError as exc:
            # Unconfirmed (S3 unavailable, access denied): S3 refused the version all the
            # same, so ESTALE and a retired node, as for a replaced object; never EIO with
            # the stale inode left in place for the next open.
            log.info("key=%s: re-checking its version failed (%s): ESTALE", node.key, exc)
            return
        finally:
            del self._checking[node.ino]
            done.set()
        if info.size != node.size or info.etag == stale.etag:
            return  # replaced by another size (or a refusal HEAD does not explain): ESTALE
        if node.etag != stale.etag or node.served_etag is not None or node.retired:
            return  # something changed while HEAD was out: do not guess
        log.warning(
            "key=%s: the listing gave ETag %s, the server answers ETag %s for the same size %d;"
            " serving the server's version",
            node.key,
            node.listed_etag or stale.etag,
            info.etag,
            node.size,
        )
        node.etag, node.mtime_ns = info.etag, info.mtime_ns
        node.opened_etag = info.etag  # no page of this inode exists: the kernel may keep new ones

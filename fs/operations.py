"""The pyfuse3 adapter: converts types, maps errors to errno, nothing else.

Every handler runs its core call inside `_errno_mapped`, the one place where
s3cachefs errors become errno. Unexpected exceptions become EIO plus one
ERROR log line (which Sentry, when configured, picks up).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyfuse3

from s3cachefs.daemon.errors import (
    AccessDeniedError,
    BadHandleError,
    IsADirError,
    NotADirError,
    NotFoundError,
    S3CacheFSError,
    StaleError,
    TransientError,
)
from s3cachefs.fs.core import FsCore, Node

if TYPE_CHECKING:
    from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, ReaddirToken, RequestContext

log = logging.getLogger(__name__)

# Most specific class first: the first match wins.
ERRNO_TABLE: tuple[tuple[type[S3CacheFSError], int], ...] = (
    (NotFoundError, errno.ENOENT),
    (AccessDeniedError, errno.EACCES),
    (StaleError, errno.ESTALE),
    (TransientError, errno.EIO),
    (NotADirError, errno.ENOTDIR),
    (IsADirError, errno.EISDIR),
    (BadHandleError, errno.EBADF),
)


def errno_for(exc: S3CacheFSError) -> int:
    for cls, code in ERRNO_TABLE:
        if isinstance(exc, cls):
            return code
    return errno.EIO


@contextlib.contextmanager
def _errno_mapped(op: str) -> Iterator[None]:
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except S3CacheFSError as exc:
        code = errno_for(exc)
        if code == errno.EIO:
            log.warning("op=%s failed: %s", op, exc)
        raise pyfuse3.FUSEError(code) from None
    except Exception:
        log.exception("op=%s failed unexpectedly", op)
        raise pyfuse3.FUSEError(errno.EIO) from None


class Operations(pyfuse3.Operations):
    """Read-only pyfuse3 operations over an `FsCore`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, core: FsCore, *, uid: int, gid: int, block_size: int) -> None:
        super().__init__()
        self.core = core
        self.counts: Counter[str] = Counter()  # FUSE requests by operation (stats, tests)
        self.uid = uid
        self.gid = gid
        self.block_size = block_size

    def invalidate(self, entries: list[tuple[int, str]]) -> None:
        """Make the kernel forget these directory entries (queued: safe inside a handler)."""
        for parent, name in entries:
            pyfuse3.invalidate_entry_async(
                pyfuse3.InodeT(parent), pyfuse3.FileNameT(os.fsencode(name)), ignore_enoent=True
            )

    @contextlib.contextmanager
    def _op(self, name: str) -> Iterator[None]:
        self.counts[name] += 1
        with _errno_mapped(name):
            yield

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.InodeT(node.ino)
        attrs.generation = 0
        attrs.entry_timeout = attrs.attr_timeout = self.core.timeout(node)
        if node.is_dir:
            attrs.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
            attrs.st_nlink = 2
        else:
            attrs.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
            attrs.st_nlink = 1
        attrs.st_size = node.size
        attrs.st_blksize = self.block_size
        attrs.st_blocks = -(-node.size // 512)
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        return attrs

    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        with self._op("lookup"):
            node = await self.core.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = pyfuse3.InodeT(0)  # tells the kernel to cache the miss
            negative.entry_timeout = self.core.metadata_ttl
            return negative
        return self._attrs(node)

    async def getattr(self, inode: InodeT, ctx: RequestContext) -> pyfuse3.EntryAttributes:
        with self._op("getattr"):
            return self._attrs(await self.core.getattr(inode))

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        with self._op("opendir"):
            return pyfuse3.FileHandleT(await self.core.opendir(inode))

    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        with self._op("readdir"):
            for name, node, next_id in self.core.readdir(fh, start_id):
                if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), next_id):
                    break

    async def releasedir(self, fh: FileHandleT) -> None:
        self.counts["releasedir"] += 1
        self.core.releasedir(fh)

    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        with self._op("open"):
            fh, keep_cache = await self.core.open(inode)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=keep_cache)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        self.counts["read_bytes_asked"] += size
        with self._op("read"):
            return await self.core.read(fh, off, size)

    async def release(self, fh: FileHandleT) -> None:
        self.counts["release"] += 1
        self.core.release(fh)

    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        cache = self.core.cache
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = cache.block_size
        data.f_blocks = cache.cache_size // cache.block_size
        free = max(0, cache.cache_size - cache.used_bytes)
        data.f_bfree = data.f_bavail = free // cache.block_size
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # Every modifying operation: the kernel refuses them already on an "ro"
    # mount; these make the answer EROFS even if a request gets through.
    async def setattr(self, *args: object, **kwargs: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

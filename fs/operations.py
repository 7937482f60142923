"""The pyfuse3 adapter: converts types, maps errors to errno, nothing else.

Every decision (modes, timeouts, negative entries, statfs, what a write or a
rename may do) is the core's (`fs.core`); here pyfuse3 types become core
calls and core answers become pyfuse3 types.

Every handler runs its core call inside `_errno_mapped`, the one place where
s3cachefs errors become errno. Unexpected exceptions become EIO plus one
ERROR log line (which Sentry, when configured, picks up). An expected EIO (S3
failing) is a WARNING, each distinct one at most once per `EIO_LOG_INTERVAL`
(`ThrottledWarnings`): a broken server fails every read, and the store names
its behaviour once already.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import pyfuse3

from s3cachefs.base.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BadHandleError,
    BusyError,
    CrossDeviceError,
    ExistsError,
    IsADirError,
    NoSpaceError,
    NotADirError,
    NotEmptyError,
    NotFoundError,
    NotPermittedError,
    ReadOnlyError,
    S3CacheFSError,
    StaleError,
    TransientError,
    UnsupportedError,
)
from s3cachefs.fs.attributes import Attributes
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import Node
from s3cachefs.fs.passthrough import Passthrough

if TYPE_CHECKING:
    from pyfuse3 import (
        FileHandleT,
        FileNameT,
        FlagT,
        InodeT,
        ModeT,
        ReaddirToken,
        RequestContext,
        SetattrFields,
    )

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
    (ReadOnlyError, errno.EROFS),
    (NotPermittedError, errno.EPERM),
    (ExistsError, errno.EEXIST),
    (AlreadyExistsError, errno.EEXIST),
    (NotEmptyError, errno.ENOTEMPTY),
    (BusyError, errno.EBUSY),
    (UnsupportedError, errno.EOPNOTSUPP),
    (CrossDeviceError, errno.EXDEV),
    (NoSpaceError, errno.ENOSPC),
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
# The same failure of the same operation (the message names the object) is logged at
# most once per this many seconds; the next line says how many were not.
EIO_LOG_INTERVAL = 10.0
_THROTTLE_ENTRIES = 1024  # distinct failures remembered before expired ones are dropped


class ThrottledWarnings:
    """WARNING lines for failed operations: each distinct (op, message) at most once per
    ``interval``, the first always; the next one logged carries the count suppressed.

    Used from the trio thread only.
    """

    def __init__(
        self, interval: float = EIO_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # -> (logged at, suppressed)

    def warning(self, op: str, message: str) -> None:
        now = self._clock()
        key = (op, message)
        logged_at, suppressed = self._seen.get(key, (None, 0))
        if logged_at is not None and now - logged_at < self.interval:
            self._seen[key] = (logged_at, suppressed + 1)
            return
        if len(self._seen) >= _THROTTLE_ENTRIES:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
        self._seen[key] = (now, 0)
        if suppressed and logged_at is not None:
            log.warning(
                "op=%s failed: %s (%d more like it in the last %.0f s not logged)",
                op,
                message,
                suppressed,
                now - logged_at,
            )
        else:
            log.warning("op=%s failed: %s", op, message)


_eio_warnings = ThrottledWarnings()


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
            _eio_warnings.warning(op, str(exc))
        raise pyfuse3.FUSEError(code) from None
    except Exception:
        log.exception("op=%s failed unexpectedly", op)
        raise pyfuse3.FUSEError(errno.EIO) from None


class Operations(pyfuse3.Operations):
    """pyfuse3 operations over an `FsCore`: every decision is the core's."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, core: FsCore) -> None:
        super().__init__()
        self.core = core
        self.counts: Counter[str] = Counter()  # FUSE requests by operation (stats, tests)
        core.on_invalidate(self.invalidate)
        # --passthrough (`daemon.passthroughing` decides): needs the patched pyfuse3.
        self.passthrough: Passthrough | None = None
        self.passthrough_off: str | None = None  # why it is None (status)

    def use_passthrough(self, passthrough: Passthrough) -> None:
        """Pass files complete in the cache through (before `pyfuse3.init`: its INIT
        asks the kernel for FUSE_CAP_PASSTHROUGH when ``enable_passthrough`` is set)."""
        self.passthrough = passthrough
        self.enable_passthrough = True

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

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """``node``'s attributes, for an entry the kernel now holds (a lookup)."""
        self.core.remember(node)
        return _fuse_attributes(self.core.attributes(node))

    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        with self._op("lookup"):
            node = await self.core.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            return _fuse_attributes(self.core.entry(None))
        return self._entry(node)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        self.counts["forget"] += 1
        for inode, nlookup in inode_list:
            self.core.forget(inode, nlookup)

    async def getattr(self, inode: InodeT, ctx: RequestContext) -> pyfuse3.EntryAttributes:
        with self._op("getattr"):
            return _fuse_attributes(self.core.attributes(await self.core.getattr(inode)))

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        with self._op("opendir"):
            return pyfuse3.FileHandleT(await self.core.opendir(inode))

    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        with self._op("readdir"):
            for name, node, next_id in self.core.readdir(fh, start_id):
                attrs = _fuse_attributes(self.core.attributes(node))
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, next_id):
                    break
                self.core.remember(node)  # readdirplus: each entry given is a lookup

    async def releasedir(self, fh: FileHandleT) -> None:
        self.counts["releasedir"] += 1
        self.core.releasedir(fh)

    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            with self._op("open_write"):
                fh = await self.core.open_write(inode, truncate=bool(flags & os.O_TRUNC))
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh))
        with self._op("open"):
            fh, keep_cache = await self.core.open(inode)
            backing_id = 0
            if self.passthrough is not None:
                self._check_granted(self.passthrough)
                backing_id = await self.passthrough.open(fh, self.core.file_handle(fh))
        if backing_id:  # the kernel reads the cache file: no page cache of ours to keep
            self.counts["open_passthrough"] += 1
            info = pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=False)
            setattr(info, "backing_id", backing_id)  # noqa: B010 (absent from stock stubs)
            return info
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=keep_cache)

    @staticmethod
    def _check_granted(passthrough: Passthrough) -> None:
        """Off (one line) if the kernel did not grant passthrough at INIT."""
        if passthrough.enabled and not getattr(pyfuse3, "passthrough_enabled", False):
            passthrough.turn_off("the kernel did not offer it at INIT")

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        self.counts["read_bytes_asked"] += size
        with self._op("read"):
            return await self.core.read(fh, off, size)

    async def release(self, fh: FileHandleT) -> None:
        with self._op("release"):
            if self.passthrough is not None:
                self.passthrough.release(fh)
            await self.core.close(fh)

    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        stats = self.core.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = stats.block_size
        data.f_blocks = stats.blocks
        data.f_bfree = data.f_bavail = stats.free_blocks
        data.f_files = stats.files
        data.f_ffree = data.f_favail = stats.free_files
        data.f_namemax = stats.name_max
        return data

    # ---- writes --------------------------------------------------------------

    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        with self._op("create"):
            fh, node = await self.core.create(parent_inode, os.fsdecode(name))
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh)), self._entry(node)

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        self.counts["write_bytes"] += len(buf)
        with self._op("write"):
            return await self.core.write(fh, off, buf)

    async def flush(self, fh: FileHandleT) -> None:
        if self.core.writer is None:
            # Nothing to flush on a read-only mount: after one ENOSYS the kernel sends no
            # FLUSH on this mount again, a round trip less on every close (issue 12, W3).
            self.counts["flush_unsupported"] += 1
            raise pyfuse3.FUSEError(errno.ENOSYS)
        with self._op("flush"):
            await self.core.flush(fh)

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        with self._op("fsync"):
            await self.core.flush(fh)

    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> pyfuse3.EntryAttributes:
        with self._op("setattr"):
            size = attr.st_size if fields.update_size else None
            return _fuse_attributes(self.core.attributes(await self.core.setattr(inode, size=size)))

    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        with self._op("mkdir"):
            node = await self.core.mkdir(parent_inode, os.fsdecode(name))
        return self._entry(node)

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        with self._op("unlink"):
            await self.core.unlink(parent_inode, os.fsdecode(name))

    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        with self._op("rmdir"):
            await self.core.rmdir(parent_inode, os.fsdecode(name))

    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        with self._op("rename"):
            self.core.rename(
                parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new)
            )


def _fuse_attributes(attributes: Attributes) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = pyfuse3.InodeT(attributes.ino)
    attrs.generation = 0
    attrs.entry_timeout = attrs.attr_timeout = attributes.timeout
    attrs.st_mode = pyfuse3.ModeT(attributes.mode)
    attrs.st_nlink = attributes.nlink
    attrs.st_size = attributes.size
    attrs.st_blksize = attributes.block_size
    attrs.st_blocks = attributes.blocks
    attrs.st_uid = attributes.uid
    attrs.st_gid = attributes.gid
    attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = attributes.mtime_ns
    return attrs

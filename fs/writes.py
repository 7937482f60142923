"""The tree side of write-through: what a writable mount lets applications change.

- New files: created empty, written at any offset (the whole file is staged
  locally), uploaded on every ``close()`` and ``fsync()`` that follows a
  write. Without ``--allow-overwrite`` the upload is create-only
  (If-None-Match: *), so a key someone else created meanwhile is not replaced.
- Existing objects: replaced only with ``--allow-overwrite`` and only whole
  (opened with O_TRUNC); rewriting part of an object is refused (EOPNOTSUPP).
- Directories: ``mkdir`` stores a ``dir/`` marker object; ``rmdir`` of an
  empty directory deletes it (``--allow-delete``).
- ``unlink`` deletes the object, only with ``--allow-delete``.
- Never: rename (EXDEV, so ``mv`` copies then deletes), links, changes inside
  a pinned dataset (EROFS).

Each refusal logs one line that names the flag it needs.
"""

from __future__ import annotations

import logging
import time

import trio

from s3cachefs.base.errors import (
    AlreadyExistsError,
    BadHandleError,
    BusyError,
    ExistsError,
    IsADirError,
    NotADirError,
    NotEmptyError,
    NotFoundError,
    NotPermittedError,
    ReadOnlyError,
    UnsupportedError,
)
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.fs.handles import Handles
from s3cachefs.fs.nodes import FileHandle, Node
from s3cachefs.fs.tree import Tree
from s3cachefs.staging.records import Staged
from s3cachefs.staging.writeback import Writeback
from s3cachefs.store.keys import valid_name

log = logging.getLogger(__name__)

# close() returns before the kernel's RELEASE of that handle arrives, and a release
# hands the file to the cache before the name is free: a delete right after a write
# waits this long for it before it is refused as busy.
RELEASE_WAIT = 2.0


class Writer:
    """Create, write, upload and delete in a `Tree`, under the mount's flags."""

    def __init__(
        self,
        tree: Tree,
        handles: Handles,
        writeback: Writeback,
        *,
        allow_overwrite: bool,
        allow_delete: bool,
        s3_limiter: trio.CapacityLimiter,
    ) -> None:
        self.tree = tree
        self.handles = handles
        self.writeback = writeback
        self.allow_overwrite = allow_overwrite
        self.allow_delete = allow_delete
        self._s3_limiter = s3_limiter
        self._released = trio.Event()  # set (and replaced) after each release of a written file

    def _url(self, key: str) -> str:
        return f"s3://{self.tree.store.bucket}/{key}"

    def _check_target(self, node: Node, what: str) -> None:
        if self.tree.in_pinned(node):
            log.warning("refused %s %s: it is inside a pinned dataset", what, self._url(node.key))
            raise ReadOnlyError(f"{node.key}: pinned datasets are read-only")

    async def _parent(self, parent_ino: int, name: str, what: str) -> tuple[Node, dict[str, int]]:
        parent = self.tree.node(parent_ino)
        if not parent.is_dir:
            raise NotADirError(f"{parent.key}: not a directory")
        self._check_target(parent, what)
        if not valid_name(name):
            raise UnsupportedError(f"{name!r} is not a name s3cachefs can store")
        return parent, await self.tree.children(parent)

    # ---- files -----------------------------------------------------------

    async def create(self, parent_ino: int, name: str) -> tuple[int, Node]:
        parent, children = await self._parent(parent_ino, name, "creating in")
        if name in children:
            raise ExistsError(f"{parent.key}{name}: exists")
        staged = await self.writeback.create(
            parent.key + name, create_only=not self.allow_overwrite
        )
        node = self.tree.add_node(parent, name, is_dir=False)
        return self._writing(node, staged), node

    async def open(self, ino: int, *, truncate: bool) -> int:
        """Open an existing file for writing."""
        node = self.tree.node(ino)
        if node.is_dir:
            raise IsADirError(f"{node.key}: is a directory")
        self._check_target(node, "writing")
        staged = node.staged
        if staged is not None and staged.handles > 0:  # being written here already
            if truncate:
                await self.writeback.truncate(staged, 0)
                node.size = 0
            staged.handles += 1
            return self._writing(node, staged)
        if not self.allow_overwrite:
            log.warning(
                "refused to overwrite %s: mount with --allow-overwrite", self._url(node.key)
            )
            raise NotPermittedError(f"{node.key}: overwrite needs --allow-overwrite")
        if not truncate:
            log.warning(
                "refused to rewrite part of %s: objects are replaced whole (open with O_TRUNC)",
                self._url(node.key),
            )
            raise UnsupportedError(f"{node.key}: partial rewrite of an object")
        staged = await self.writeback.create(node.key, create_only=False)
        return self._writing(node, staged)

    def _writing(self, node: Node, staged: Staged) -> int:
        node.staged = staged
        node.size = staged.size
        node.opened_etag = ""  # the kernel's pages of this file must not outlive the write
        node.served_etag = None  # and the inode serves the written version from now on
        node.listed_etag = ""  # the listing's old ETag no longer names this inode's version
        version = ObjectVersion(self.tree.store.bucket, node.key, "", 0)
        return self.handles.add_handle(FileHandle(node, version, staged=staged, writable=True))

    def _write_handle(self, fh: int) -> FileHandle:
        handle = self.handles.file_handle(fh)
        if not handle.writable or handle.staged is None:
            raise BadHandleError(f"file handle {fh}: not open for writing")
        return handle

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._write_handle(fh)
        assert handle.staged is not None
        written = await self.writeback.write(handle.staged, offset, data)
        handle.node.size = handle.staged.size
        return written

    async def flush(self, fh: int) -> None:
        """close() and fsync(): return once S3 holds what was written (UploadFailedError)."""
        handle = self.handles.file_handle(fh)
        if not handle.writable or handle.staged is None:
            return  # a reader's close
        await self.writeback.upload(handle.staged)
        handle.node.etag = handle.staged.etag or ""
        handle.node.mtime_ns = time.time_ns()

    async def release(self, fh: int) -> None:
        """The last close of a handle; of a written file: keep the new version cached, or
        drop the name (the upload failed: the kernel forgets its entry)."""
        handle = self.handles.release(fh)
        if handle is None or not handle.writable or handle.staged is None:
            return
        try:
            await self._release_written(handle)
        finally:
            self._released.set()
            self._released = trio.Event()

    async def _release_written(self, handle: FileHandle) -> None:
        assert handle.staged is not None
        staged, node = handle.staged, handle.node
        version = await self.writeback.release(staged)
        if staged.handles > 0 or node.staged is not staged:  # reopened (and rewritten) since
            return
        node.staged = None
        parent = self.tree.node(node.parent)
        if version is None:  # not in S3 (or the old object is): let a listing say what is
            self.tree.relist(parent)
            self.tree.invalidate([(parent.ino, node.name)])
            return
        node.etag, node.size = version.etag, version.size

    async def truncate(self, ino: int, size: int) -> Node:
        node = self.tree.node(ino)
        if node.staged is None or node.staged.handles == 0:
            log.warning("refused to truncate %s: not open for writing here", self._url(node.key))
            raise UnsupportedError(f"{node.key}: truncate of a file not being written")
        await self.writeback.truncate(node.staged, size)
        node.size = size
        return node

    # ---- names -----------------------------------------------------------

    async def mkdir(self, parent_ino: int, name: str) -> Node:
        parent, children = await self._parent(parent_ino, name, "creating in")
        if name in children:
            raise ExistsError(f"{parent.key}{name}: exists")
        key = parent.key + name + "/"
        try:
            await trio.to_thread.run_sync(
                lambda: self.tree.store.put_object(key, b"", create_only=True),
                limiter=self._s3_limiter,
            )
        except AlreadyExistsError:  # made elsewhere meanwhile: its contents are not listed yet
            self.tree.relist(parent)
            raise ExistsError(f"{key}: exists") from None
        node = self.tree.add_node(parent, name, is_dir=True)
        self.tree.relist(node)  # the prefix may hold objects already (a stale parent listing)
        return node

    async def _existing(self, parent_ino: int, name: str, what: str) -> tuple[Node, Node]:
        parent, children = await self._parent(parent_ino, name, what)
        if name not in children:
            raise NotFoundError(f"{parent.key}{name}: not found")
        node = self.tree.node(children[name])
        if not self.allow_delete:
            log.warning("refused to delete %s: mount with --allow-delete", self._url(node.key))
            raise NotPermittedError(f"{node.key}: delete needs --allow-delete")
        return parent, node

    async def unlink(self, parent_ino: int, name: str) -> None:
        parent, node = await self._existing(parent_ino, name, "deleting in")
        if node.is_dir:
            raise IsADirError(f"{node.key}: is a directory")
        with trio.move_on_after(RELEASE_WAIT):
            while node.staged is not None:
                await self._released.wait()
        if node.staged is not None:
            raise BusyError(f"{node.key}: still being written")
        await trio.to_thread.run_sync(
            self.tree.store.delete_object, node.key, limiter=self._s3_limiter
        )
        self.tree.remove_name(parent, name)
        version = ObjectVersion(self.tree.store.bucket, node.key, node.etag, node.size)
        await self.handles.cache.free({version.oid})

    async def rmdir(self, parent_ino: int, name: str) -> None:
        parent, node = await self._existing(parent_ino, name, "deleting in")
        if not node.is_dir:
            raise NotADirError(f"{node.key}: not a directory")
        self.tree.relist(node)  # emptiness is decided by S3, not by an old listing
        if await self.tree.children(node):
            raise NotEmptyError(f"{node.key}: directory not empty")
        await trio.to_thread.run_sync(
            self.tree.store.delete_object, node.key, limiter=self._s3_limiter
        )
        self.tree.remove_name(parent, name)

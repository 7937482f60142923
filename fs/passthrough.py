"""FUSE passthrough of files complete in the cache (issue 13, option 2): a spike.

Off unless ``S3CACHEFS_PASSTHROUGH=1`` and pyfuse3 is the patched build
(`packaging/build-passthrough.sh`: libfuse 3.17 + `pyfuse3.passthrough_open`).
An open of a file whose blocks are all on disk, each passing its CRC read
through the very descriptor handed over, gives the kernel that descriptor as
the backing file: its READs (and mmap) then never reach the daemon. The
daemon still answers every LOOKUP and OPEN, so an object changed in S3 gets a
new inode after the TTL (`fs.tree`), and an open of it is checked again.

The kernel's rules shape the bookkeeping (fs/fuse/iomode.c, Linux >= 6.9):
- one backing file per inode: every handle of an inode passing through shares
  one backing id, closed when its last handle is released;
- an inode is either passed through or cached, never both at once (ETXTBSY
  for the open): an open while other handles of the inode are open in cached
  mode stays cached, and opens of one inode are settled one at a time;
- FOPEN_KEEP_CACHE and FOPEN_DIRECT_IO are not combined with it (the adapter
  clears them): the pages live in the cache file's page cache.

Held while passed through: the object version is held in the pin store
(eviction punches holes: a reader would see zeros). A real hold needs a
counted hold in the ledger (``PinStore.release`` re-derives the whole pinned
set); see the spike's report.

Concurrency: state changes on the trio thread only; `_verify` runs in a
worker thread on plain values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion, block_span
from s3cachefs.datasets.pins import PinStore
from s3cachefs.fs.nodes import FileHandle
from s3cachefs.store.crc import crc32

log = logging.getLogger(__name__)

ENV = "S3CACHEFS_PASSTHROUGH"


@dataclass
class Backing:
    backing_id: int
    oid: str
    handles: int = 1


class Passthrough:
    """Backing ids of passed-through inodes, registered and closed by given callables."""

    def __init__(
        self,
        cache: BlockCache,
        pins: PinStore,
        register: Callable[[int], int],
        unregister: Callable[[int], None],
    ) -> None:
        self.cache = cache
        self.pins = pins
        self.register = register  # fd -> backing id (pyfuse3.passthrough_open)
        self.unregister = unregister
        self.enabled = True
        self._inodes: dict[int, Backing] = {}
        self._by_fh: dict[int, int] = {}  # fh -> inode, handles passed through
        self._settling: dict[int, trio.Event] = {}  # inode -> its open being settled
        self.counts = {"opens": 0, "refused": 0}

    async def open(self, fh: int, handle: FileHandle) -> int:
        """The backing id to answer this open with, or 0 (the CRC-checked FUSE path)."""
        node = handle.node
        while (settling := self._settling.get(node.ino)) is not None:
            await settling.wait()
        if not self.enabled or handle.staged is not None or handle.fd is not None:
            return 0
        backing = self._inodes.get(node.ino)
        if backing is None:
            if node.handles > 1 or not self._complete(handle.version):
                return 0  # cached handles are open (the kernel would refuse), or not all here
            backing = await self._start(node.ino, handle.version)
            if backing is None:
                return 0
        elif backing.oid != handle.version.oid:
            return 0  # cannot happen (an inode is one version); the kernel would refuse
        else:
            backing.handles += 1
        self._by_fh[fh] = node.ino
        self.counts["opens"] += 1
        return backing.backing_id

    async def _start(self, ino: int, version: ObjectVersion) -> Backing | None:
        """Hold, check and register ``version``'s cache file for inode ``ino``."""
        done = self._settling[ino] = trio.Event()
        owner = f"passthrough:{ino}"
        self.pins.hold(owner, version.oid)  # before the check: nothing evicted after it
        try:
            backing_id = await self._register_verified(version)
        finally:
            del self._settling[ino]
            done.set()
        if backing_id == 0:
            self.pins.release(owner)
            self.counts["refused"] += 1
            return None
        backing = self._inodes[ino] = Backing(backing_id, version.oid)
        return backing

    def release(self, fh: int) -> None:
        """A handle's RELEASE: the inode's backing id goes with its last one. Must not await."""
        ino = self._by_fh.pop(fh, None)
        if ino is None:
            return
        backing = self._inodes[ino]
        backing.handles -= 1
        if backing.handles == 0:
            del self._inodes[ino]
            try:
                self.unregister(backing.backing_id)
            except OSError as exc:
                log.warning("passthrough: closing backing id failed: %s", exc.strerror)
            self.pins.release(f"passthrough:{ino}")

    def _complete(self, version: ObjectVersion) -> bool:
        return (
            version.size > 0
            and version.oid in self.cache.ledger
            and not (self.cache.missing_blocks(version))
        )

    async def _register_verified(self, version: ObjectVersion) -> int:
        crcs = self.cache.block_crcs(version)
        path = str(self.cache.object_path(version.oid))
        try:
            fd = await trio.to_thread.run_sync(
                _verified_fd,
                path,
                version.size,
                self.cache.block_size,
                crcs,
                limiter=self.cache.disk_limiter,
            )
        except OSError as exc:
            log.warning("passthrough: cannot open %s: %s", version.key, exc.strerror)
            return 0
        if fd is None:  # a block failed its CRC: the FUSE path reads, drops and refetches it
            return 0
        try:
            return self.register(fd)
        except OSError as exc:  # not root, or the kernel said no: stop trying
            log.warning("passthrough: off: registering a backing file failed: %s", exc.strerror)
            self.enabled = False
            return 0
        finally:
            os.close(fd)


def _verified_fd(path: str, size: int, block_size: int, crcs: dict[int, int]) -> int | None:
    """A read-only descriptor of a cache file whose every block passed its CRC through it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            os.close(fd)
            return None
        for idx in range(-(-size // block_size)):
            start, end = block_span(idx, block_size, size)
            data = os.pread(fd, end - start, start)
            if idx not in crcs or len(data) != end - start or crc32(data) != crcs[idx]:
                os.close(fd)
                return None
    except BaseException:
        os.close(fd)
        raise
    return fd

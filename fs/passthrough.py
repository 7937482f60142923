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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion, block_span
from s3cachefs.datasets.pins import PinStore
from s3cachefs.fs.nodes import FileHandle
from s3cachefs.store.crc import crc32

log = logging.getLogger(__name__)

# "1": read and check the whole file at every open; "memo": once per file as it is on
# disk (device, inode, size, mtime, CRCs); "keep": as "memo", and its descriptor and
# backing id are kept for the next open (up to KEEP_MAX), so that open makes no syscall
# but an fstat.
ENV = "S3CACHEFS_PASSTHROUGH"
KEEP_MAX = 4096

# A cache file as checked: device, inode, size, mtime, and the CRCs it was checked against.
Identity = tuple[int, int, int, int, int]


@dataclass
class Backing:
    backing_id: int
    oid: str
    handles: int = 1
    kept: bool = False  # in `Passthrough._kept`: its id outlives its handles


@dataclass
class Kept:
    fd: int
    backing_id: int
    identity: Identity


class Passthrough:
    """Backing ids of passed-through inodes, registered and closed by given callables."""

    def __init__(
        self,
        cache: BlockCache,
        pins: PinStore,
        register: Callable[[int], int],
        unregister: Callable[[int], None],
        *,
        mode: str = "1",
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
        self.memo = mode in ("memo", "keep")
        self.keep = mode == "keep"
        self._verified: dict[str, Identity] = {}  # oid -> identity of its file when checked
        self._kept: OrderedDict[str, Kept] = OrderedDict()  # oid -> checked, registered

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
        kept = self._reuse(version)
        if kept is not None:
            del self._settling[ino]
            done.set()
            backing = self._inodes[ino] = Backing(kept.backing_id, version.oid, kept=True)
            return backing
        try:
            backing_id, fd, identity = await self._register_verified(version)
        finally:
            del self._settling[ino]
            done.set()
        if backing_id == 0:
            self.pins.release(owner)
            self.counts["refused"] += 1
            return None
        if self.keep:
            self._keep(version.oid, Kept(fd, backing_id, identity))
        else:
            os.close(fd)
        backing = self._inodes[ino] = Backing(backing_id, version.oid, kept=self.keep)
        return backing

    def _reuse(self, version: ObjectVersion) -> Kept | None:
        """A kept registration of ``version``'s file if that file is still as checked."""
        kept = self._kept.get(version.oid)
        if kept is None:
            return None
        try:  # an fstat of an open descriptor: no disk I/O
            now = _identity(kept.fd, self.cache.block_crcs(version))
        except OSError:
            now = None
        if now == kept.identity:
            self._kept.move_to_end(version.oid)
            return kept
        self._forget(version.oid)
        return None

    def _keep(self, oid: str, kept: Kept) -> None:
        self._forget(oid)
        self._kept[oid] = kept
        in_use = {b.oid for b in self._inodes.values()} | {oid}
        for old in [o for o in self._kept if o not in in_use][: max(0, len(self._kept) - KEEP_MAX)]:
            self._forget(old)

    def _forget(self, oid: str) -> None:
        """Close a kept registration (files opened with it keep theirs)."""
        kept = self._kept.pop(oid, None)
        if kept is not None:
            os.close(kept.fd)
            self._unregister(kept.backing_id)

    def _unregister(self, backing_id: int) -> None:
        try:
            self.unregister(backing_id)
        except OSError as exc:
            log.warning("passthrough: closing backing id failed: %s", exc.strerror)

    def release(self, fh: int) -> None:
        """A handle's RELEASE: the inode's backing id goes with its last one. Must not await."""
        ino = self._by_fh.pop(fh, None)
        if ino is None:
            return
        backing = self._inodes[ino]
        backing.handles -= 1
        if backing.handles == 0:
            del self._inodes[ino]
            if not backing.kept:
                self._unregister(backing.backing_id)
            self.pins.release(f"passthrough:{ino}")

    def _complete(self, version: ObjectVersion) -> bool:
        return (
            version.size > 0
            and version.oid in self.cache.ledger
            and not (self.cache.missing_blocks(version))
        )

    async def _register_verified(self, version: ObjectVersion) -> tuple[int, int, Identity]:
        """A backing id of ``version``'s checked file (0: not passed through), its
        descriptor (to close) and its identity."""
        crcs = self.cache.block_crcs(version)
        path = str(self.cache.object_path(version.oid))
        # "memo": a file verified once by this process, same inode, size, mtime and CRCs,
        # is not read again (the kernel-served trees' policy); else every open reads it.
        known = self._verified.get(version.oid) if self.memo else None
        try:
            fd, identity = await trio.to_thread.run_sync(
                _verified_fd,
                path,
                version.size,
                self.cache.block_size,
                crcs,
                known,
                limiter=self.cache.disk_limiter,
            )
        except OSError as exc:
            log.warning("passthrough: cannot open %s: %s", version.key, exc.strerror)
            return 0, -1, identity_none()
        if fd is None:  # a block failed its CRC: the FUSE path reads, drops and refetches it
            self._verified.pop(version.oid, None)
            return 0, -1, identity
        if self.memo:
            self._verified[version.oid] = identity
        try:
            return self.register(fd), fd, identity
        except OSError as exc:  # not root, or the kernel said no: stop trying
            log.warning("passthrough: off: registering a backing file failed: %s", exc.strerror)
            self.enabled = False
            os.close(fd)
            return 0, -1, identity


def _verified_fd(
    path: str, size: int, block_size: int, crcs: dict[int, int], known: Identity | None
) -> tuple[int | None, Identity]:
    """A read-only descriptor of a cache file whose every block passed its CRC through it
    (or whose identity is ``known``: checked so before), and the file's identity."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        identity = _identity(fd, crcs)
        if identity == known:
            return fd, identity
        if identity[2] != size:
            os.close(fd)
            return None, identity
        for idx in range(-(-size // block_size)):
            start, end = block_span(idx, block_size, size)
            data = os.pread(fd, end - start, start)
            if idx not in crcs or len(data) != end - start or crc32(data) != crcs[idx]:
                os.close(fd)
                return None, identity
    except BaseException:
        os.close(fd)
        raise
    return fd, identity


def _identity(fd: int, crcs: dict[int, int]) -> Identity:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, hash(frozenset(crcs.items())))


def identity_none() -> Identity:
    return (0, 0, 0, 0, 0)

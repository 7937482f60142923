"""FUSE passthrough of files complete in the cache (``--passthrough``, issue 13).

An open of a file whose blocks are all on disk, each passing its CRC read through
the very descriptor handed over, gives the kernel that file as the backing file:
its READs (and mmap) then never reach the daemon. The daemon still answers every
LOOKUP and OPEN, so an object changed in S3 gets a new inode (and oid) after the
TTL (`fs.tree`), and an open of it is checked on its own.

Never zeros, never wrong bytes:
- while any handle of a passed-through inode is open, its version is held in the
  ledger (`Ledger.hold`, counted): eviction, which punches holes, never takes it;
- an open takes the hold, then waits for that object's deletes taken off the books
  before (`cache.deleting`), then needs the ledger to have every block, then reads
  every block's CRC through the descriptor it registers;
- a registration outlives its handles (kept, up to KEEP_MAX, least recently used
  first out), unheld: the next open re-uses it only if, under a new hold, the ledger
  has every block, its record is the one checked and none of its blocks was taken
  off the books since (`Record.taken`: eviction and drops count), and the cache file
  at its path is the inode checked, same size and times. Else it is checked anew.

The kernel's rules shape the bookkeeping (fs/fuse/iomode.c, Linux >= 6.9):
- one backing file per inode: every handle of an inode passing through shares
  one backing id, and every later open of the inode is answered with that id, so
  it stays registered while that inode uses it (a closed id is EIO to open(2)): an
  id is counted, one for its kept registration and one per inode using it, and
  closed at zero;
- an inode is either passed through or cached, never both at once (ETXTBSY for
  the open): an open while other handles of the inode are open in cached mode
  stays cached, and opens of one inode, and of one oid (two inodes of one object
  version: a retired node looked up again), are settled one at a time;
- FOPEN_KEEP_CACHE and FOPEN_DIRECT_IO are not combined with it (`fs.operations`
  answers keep_cache=0): the pages live in the cache file's page cache.

Concurrency: state changes on the trio thread only; `_verified_fd` runs in a
worker thread on plain values.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion, block_span
from s3cachefs.cache.ledger import Record
from s3cachefs.fs.nodes import FileHandle
from s3cachefs.store.crc import crc32

log = logging.getLogger(__name__)

# Registrations kept for the next open: a kernel file reference each (no descriptor).
KEEP_MAX = 4096

# A cache file as checked: device, inode, size, mtime, ctime.
Identity = tuple[int, int, int, int, int]


@dataclass
class Backing:
    """An inode passed through: its backing id and how many of its handles are open."""

    backing_id: int
    oid: str
    handles: int = 1


@dataclass
class Kept:
    """A checked, registered cache file; valid while the ledger took none of its blocks."""

    backing_id: int
    record: Record
    taken: int
    identity: Identity


class Passthrough:
    """Backing ids of passed-through inodes, registered and closed by given callables."""

    def __init__(
        self,
        cache: BlockCache,
        register: Callable[[int], int],
        unregister: Callable[[int], None],
        *,
        keep_max: int = KEEP_MAX,
    ) -> None:
        self.cache = cache
        self.ledger = cache.ledger
        self.register = register  # fd -> backing id (pyfuse3.passthrough_open)
        self.unregister = unregister  # backing id -> None (pyfuse3.passthrough_close)
        self.keep_max = keep_max
        self.enabled = True
        self._inodes: dict[int, Backing] = {}
        self._by_fh: dict[int, int] = {}  # fh -> inode, handles passed through
        self._settling: dict[int | str, trio.Event] = {}  # inode, oid -> an open settling
        self._refs: Counter[int] = Counter()  # backing id -> kept (1) + inodes using it
        self._kept: OrderedDict[str, Kept] = OrderedDict()  # oid -> checked, registered
        # opens passed through; files checked (read whole); refused (not complete, a
        # failed check); kept registrations re-used
        self.counts = {"opens": 0, "checked": 0, "refused": 0, "reused": 0}
        self.ledger.deleting.on_begin = self._let_go

    def _let_go(self, oid: str) -> None:
        """A delete of ``oid`` begins (eviction, a free, a dropped block): its kept
        registration goes (its id stays while an open inode uses it). Kept, the kernel
        would hold the file on the disk (and its flock would keep eviction's punch away)
        while the ledger counts its room free."""
        self._forget(oid)  # an inode using its id keeps it registered

    def describe(self) -> dict[str, int | bool]:
        """For `status --json`."""
        return {
            "enabled": self.enabled,
            **self.counts,
            "open_inodes": len(self._inodes),
            "kept": len(self._kept),
        }

    async def open(self, fh: int, handle: FileHandle) -> int:
        """The backing id to answer this open with, or 0 (the CRC-checked FUSE path)."""
        node, oid = handle.node, handle.version.oid
        while (settling := self._settling.get(node.ino) or self._settling.get(oid)) is not None:
            await settling.wait()
        backing = self._inodes.get(node.ino)
        if backing is not None:  # the inode passes through: so must every open of it
            backing.handles += 1
        elif (
            not self.enabled
            or handle.staged is not None
            or handle.fd is not None
            or handle.writable
            or node.handles > 1  # cached handles are open: the kernel would refuse
            or node.served_etag not in (None, handle.version.etag)  # ESTALE on the FUSE path
            or not self._complete(handle.version)
        ):
            return 0
        else:
            backing = await self._start(node.ino, handle.version)
            if backing is None:
                return 0
        self._by_fh[fh] = node.ino
        self.counts["opens"] += 1
        # The kernel reads it without a READ here: served, as a READ marks it
        # (`VersionGuard.served`): never re-bound in place to another version.
        node.served_etag = handle.version.etag
        handle.served = True
        return backing.backing_id

    def release(self, fh: int) -> None:
        """A handle's RELEASE: the hold goes with the inode's last one. Must not await."""
        ino = self._by_fh.pop(fh, None)
        if ino is None:
            return
        backing = self._inodes[ino]
        backing.handles -= 1
        if backing.handles == 0:
            del self._inodes[ino]
            self._unref(backing.backing_id)
            self.ledger.release(backing.oid)

    async def _start(self, ino: int, version: ObjectVersion) -> Backing | None:
        """Hold, check and register ``version``'s cache file for inode ``ino``."""
        oid = version.oid
        done = self._settling[ino] = self._settling[oid] = trio.Event()
        self.ledger.hold(oid)  # from here on no block of it is taken to make room
        backing_id = 0
        try:
            # Deletes taken off the books before the hold land first: after them, what
            # the ledger holds is on disk (`cache.deleting`).
            await self.ledger.deleting.settled([(oid, None)])
            record = self.ledger.record(oid)
            if record is not None and self._complete(version):
                backing_id = self._reuse(oid, record) or await self._check(version, record)
        finally:
            del self._settling[ino], self._settling[oid]
            done.set()
            if not backing_id:
                self.ledger.release(oid)
        if not backing_id:
            self.counts["refused"] += 1
            return None
        self._refs[backing_id] += 1
        backing = self._inodes[ino] = Backing(backing_id, oid)
        return backing

    def _reuse(self, oid: str, record: Record) -> int:
        """The kept registration of ``oid`` if its file is still as checked, else 0."""
        kept = self._kept.get(oid)
        if kept is None:
            return 0
        try:  # a stat of a cached dentry: no disk I/O
            now = _identity(os.stat(self.cache.object_path(oid)))
        except OSError:
            now = None
        if kept.record is record and kept.taken == record.taken and now == kept.identity:
            self._kept.move_to_end(oid)
            self.counts["reused"] += 1
            return kept.backing_id
        self._forget(oid)
        return 0

    async def _check(self, version: ObjectVersion, record: Record) -> int:
        """Read every block of ``version``'s file through one descriptor, check its CRC,
        register that descriptor: its backing id, kept; 0 if it is not passed through."""
        crcs, taken = dict(record.blocks), record.taken
        path = str(self.cache.object_path(version.oid))
        self.counts["checked"] += 1
        try:
            fd, identity = await trio.to_thread.run_sync(
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
            if self.ledger.record(version.oid) is not record or record.taken != taken:
                return 0  # a block was dropped while it was read (held: not evicted)
            backing_id = self.register(fd)
        except OSError as exc:  # not root, the cache dir on overlayfs: stop trying
            log.warning("passthrough off: registering a backing file failed: %s", exc.strerror)
            self.enabled = False
            return 0
        finally:
            os.close(fd)  # the kernel holds its own reference
        self._forget(version.oid)
        self._kept[version.oid] = Kept(backing_id, record, taken, identity)
        self._refs[backing_id] += 1
        in_use = {b.oid for b in self._inodes.values()} | {version.oid}
        extra = len(self._kept) - self.keep_max
        for old in [o for o in self._kept if o not in in_use][: max(0, extra)]:
            self._forget(old)
        return backing_id

    def _forget(self, oid: str) -> None:
        """Let a kept registration go (its id stays while an inode uses it)."""
        kept = self._kept.pop(oid, None)
        if kept is not None:
            self._unref(kept.backing_id)

    def _unref(self, backing_id: int) -> None:
        """One use of ``backing_id`` less; the last closes it."""
        self._refs[backing_id] -= 1
        if self._refs[backing_id] > 0:
            return
        del self._refs[backing_id]
        try:
            self.unregister(backing_id)
        except OSError as exc:
            log.warning("passthrough: closing backing id failed: %s", exc.strerror)

    def _complete(self, version: ObjectVersion) -> bool:
        ledger = self.ledger
        return version.size > 0 and version.oid in ledger and not ledger.missing_blocks(version)


def _verified_fd(
    path: str, size: int, block_size: int, crcs: dict[int, int]
) -> tuple[int | None, Identity]:
    """A read-only descriptor of a cache file whose every block passed its CRC through it
    (None if one failed), and the file's identity as it was read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Held for as long as the kernel holds this open file (past our close, and past a
        # kill -9 of this daemon): eviction never punches a file locked so (`cache.layout`).
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a punch is under way: not this time
            os.close(fd)
            return None, (0, 0, 0, 0, 0)
        identity = _identity(os.fstat(fd))
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


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

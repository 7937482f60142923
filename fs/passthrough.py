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
- a file over ``check_max`` (``--passthrough-check-max``) is not read whole inside
  its OPEN (a big file opened for a few bytes paid a read of all of it): that open
  takes the FUSE path, and a background check (BACKGROUND_CHECKS at a time, under
  the disk limiter, stopped at unmount) registers it, kept, for the next open;
- held bytes are bounded (``held_max``: half of what the cache can hold at the
  decision, ``--cache-size`` or less where ``--min-free`` leaves less): held blocks
  cannot be evicted, so long-lived readers (data loaders, mmapped shards) could
  otherwise hold the whole cache and leave the FUSE path's fetches and prefetch no
  room; half leaves the other half to the LRU. An open that would go over it (or a
  background check) takes the FUSE path;
- a registration outlives its handles (kept, `fs.passthroughkept`), unheld: the
  next open re-uses it only if the file is still as checked; kept ones go at a stop
  and when idle (a kept file outlives a kill -9 while any file of the mount is open).

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

Concurrency: state changes on the trio thread only; `verified_fd` runs in a
worker thread on plain values.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion, block_count
from s3cachefs.cache.ledger import Record
from s3cachefs.fs import passthroughcheck, passthroughkept
from s3cachefs.fs.nodes import FileHandle
from s3cachefs.fs.passthroughcheck import Identity
from s3cachefs.fs.passthroughkept import Registration

log = logging.getLogger(__name__)

# Big files checked in the background at once (each reads its file whole), and waiting
# at most (more are dropped: a later open asks again).
BACKGROUND_CHECKS = 2
BACKGROUND_QUEUE = 64


@dataclass
class Backing:
    """An inode passed through: its backing id and how many of its handles are open."""

    backing_id: int
    oid: str
    handles: int = 1


class Passthrough:
    """Backing ids of passed-through inodes, registered and closed by given callables."""

    def __init__(
        self,
        cache: BlockCache,
        register: Callable[[int], int],
        unregister: Callable[[int], None],
        *,
        keep_max: int = passthroughkept.KEEP_MAX,
        check_max: int = 1 << 62,
        held_max: int | None = None,
        asked: bool = False,
    ) -> None:
        self.cache = cache
        self.ledger = cache.ledger
        self.register = register  # fd -> backing id (pyfuse3.passthrough_open)
        self.check_max = check_max  # bigger files are checked in the background
        self.held_max = held_max  # None: half of what the cache can hold (`_over_held`)
        self.enabled = True
        self.asked = asked  # --passthrough given: turning off is a warning, else info
        self.why_off: str | None = None
        self._inodes: dict[int, Backing] = {}
        self._by_fh: dict[int, int] = {}  # fh -> inode, handles passed through
        self._settling: dict[int | str, trio.Event] = {}  # inode, oid -> an open settling
        self._kept = passthroughkept.Kept(unregister, keep_max)  # and every id's count
        # Background checks: waiting or running (oids); their nursery (`run`); set at
        # unmount, it stops a check's read between two blocks.
        self._later: set[str] = set()
        self._later_ended = trio.Event()  # set (and replaced) as each one ends
        self._later_limiter = trio.CapacityLimiter(BACKGROUND_CHECKS)
        self._nursery: trio.Nursery | None = None
        self._stop = threading.Event()
        # opens passed through; files checked (read whole); refused (not complete, a
        # failed check); kept registrations re-used; opens of big files left to the FUSE
        # path while a background check runs; opens over ``held_max``
        names = ("opens", "checked", "refused", "reused", "deferred", "over_held")
        self.counts = dict.fromkeys(names, 0)
        self.ledger.deleting.on_begin = self._let_go

    def _let_go(self, oid: str) -> None:
        """A delete of ``oid`` begins (eviction, a free, a dropped block): its kept
        registration goes (its id stays while an open inode uses it). Kept, the kernel
        would hold the file on the disk (and its flock would keep eviction's punch away)
        while the ledger counts its room free."""
        self._kept.forget(oid)  # an inode using its id keeps it registered

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery background checks run in, until cancelled (unmount)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sweep)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                self.stop()

    def stop(self, why: str = "unmount") -> None:
        """Unmount begins (a signal, `s3cachefs unmount`, the FUSE loop ended): nothing
        is registered from now on (an open of an inode not passing through answers 0 at
        once: no hold, no check), a check stops before its next chunk, and every
        kept registration no open inode uses is closed now, while the connection is
        ours. Kept, each would hold its cache file allocated (and flocked: never punched)
        for as long as any file of this mount stays open, past this daemon (review #1)."""
        self._stop.set()
        kept = len(self._kept)
        self._kept.close_unused()
        if kept:  # which stop let them go: the first one, before the unmount (tests)
            log.info("passthrough stopped (%s): %d kept registrations let go", why, kept)

    async def _sweep(self) -> None:
        """Close kept registrations idle over KEEP_IDLE (review #1b: a kill -9 cannot
        close them; this bounds what it leaves the kernel)."""
        while True:
            await trio.sleep(passthroughkept.KEEP_IDLE / 4)
            before = trio.current_time() - passthroughkept.KEEP_IDLE
            self._kept.close_idle(before, (b.oid for b in self._inodes.values()))

    def resume(self) -> None:
        """The unmount failed (busy): registering again."""
        self._stop.clear()

    def describe(self) -> dict[str, int | bool | str | None]:
        """For `status --json`."""
        return {
            "enabled": self.enabled,
            "why_off": self.why_off,
            **self.counts,
            "open_inodes": len(self._inodes),
            "kept": len(self._kept),
        }

    async def open(self, fh: int, handle: FileHandle) -> int:
        """The backing id to answer this open with, or 0 (the CRC-checked FUSE path)."""
        node, oid = handle.node, handle.version.oid
        while (settling := self._settling_of(node.ino, oid)) is not None:
            await settling.wait()
        backing = self._inodes.get(node.ino)
        if backing is not None:  # the inode passes through: so must every open of it
            backing.handles += 1
        elif (
            not self.enabled
            or self._stop.is_set()  # unmounting: no hold, no check (review of 43f360f, #2)
            or handle.staged is not None
            or handle.fd is not None
            or handle.writable
            or node.handles > 1  # cached handles are open: the kernel would refuse
            or node.served_etag not in (None, handle.version.etag)  # ESTALE on the FUSE path
            or not self._complete(handle.version)
        ):
            return 0
        elif self._over_held(handle.version):
            self.counts["over_held"] += 1
            return 0
        else:
            backing = await self._start(node.ino, handle.version)
            if backing is None:
                return 0
        self._by_fh[fh] = node.ino
        self.counts["opens"] += 1
        # Its reads are not counted as hits (the daemon sees none): its opens are.
        self.cache.stats.counts["passthrough_opens"] += 1
        self.cache.stats.counts["passthrough_bytes_opened"] += handle.version.size
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
            self._kept.idle_from_now(backing.oid)
            self._kept.unref(backing.backing_id)
            self._release(backing.oid)

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
                backing_id = self._kept.reuse(oid, record)
                if not backing_id and (seen := self._kept.seen(oid, record)) is not None:
                    backing_id = await self._check(version, record, seen.identity)
                self.counts["reused"] += bool(backing_id)
                if not backing_id and version.size <= self.check_max:
                    backing_id = await self._check(version, record)
                elif not backing_id:
                    self.counts["deferred"] += 1
                    self._check_later(version)
        finally:
            del self._settling[ino], self._settling[oid]
            done.set()
            if not backing_id:
                self._release(oid)
        if not backing_id:
            self.counts["refused"] += 1
            return None
        self._kept.refs[backing_id] += 1
        backing = self._inodes[ino] = Backing(backing_id, oid)
        return backing

    def _settling_of(self, ino: int, oid: str) -> trio.Event | None:
        """The open of this inode, or of this oid, being settled (an Event is no bool)."""
        settling = self._settling.get(ino)
        return self._settling.get(oid) if settling is None else settling

    def _release(self, oid: str) -> None:
        """One hold of ``oid`` less; a free that waited for its last one runs now (its
        blocks stay out of the LRU until it does; with no nursery they rejoin it)."""
        if self.ledger.release(oid, self._nursery is not None) and self._nursery is not None:
            self._nursery.start_soon(self.cache.free, {oid})

    def _over_held(self, version: ObjectVersion) -> bool:
        """Whether holding ``version`` would take the held bytes over ``held_max``: half
        of what the cache can hold now (review #6: where the disk binds before
        --cache-size, half of --cache-size could be all the cache that fits)."""
        ledger = self.ledger
        held = ledger.held_bytes
        held_max = self.held_max
        if held_max is None:
            held_max = ledger.disk_room(self.cache.bounds) // 2
        return not ledger.is_kept(version.oid) and held + version.size > held_max

    def _check_later(self, version: ObjectVersion) -> None:
        """Check ``version``'s file in the background (one at a time per oid), so that a
        later open re-uses its registration."""
        oid = version.oid
        if self._nursery is None or self._stop.is_set():  # unmounting
            return
        if oid in self._later or len(self._later) >= BACKGROUND_QUEUE:
            return
        self._later.add(oid)
        self._nursery.start_soon(self._background, version)

    async def _background(self, version: ObjectVersion) -> None:
        oid = version.oid
        try:
            async with self._later_limiter:
                if not self.enabled or self._stop.is_set() or self._over_held(version):
                    return
                self.ledger.hold(oid)  # as an open's check: nothing taken while it reads
                try:
                    await self.ledger.deleting.settled([(oid, None)])
                    record = self.ledger.record(oid)
                    fresh = record is not None and self._complete(version)
                    if fresh and record is not None and not self._kept.valid(oid, record):
                        await self._check(version, record)
                finally:
                    self._release(oid)
        finally:
            self._later.discard(oid)
            self._later_ended.set()
            self._later_ended = trio.Event()

    async def drain(self) -> None:
        """Wait until no background check is waiting or running (tests)."""
        while self._later:
            await self._later_ended.wait()

    async def _check(
        self, version: ObjectVersion, record: Record, known: Identity | None = None
    ) -> int:
        """Read every block of ``version``'s file through one descriptor, check its CRC,
        register that descriptor: its backing id, kept; 0 if it is not passed through.
        With ``known`` (a check of this record whose registration was closed, `Kept.seen`):
        no read, the descriptor's file must have that identity."""
        crcs, taken = dict(record.blocks), record.taken
        path = str(self.cache.object_path(version.oid))
        size, bs = version.size, self.cache.block_size
        nblocks, per = block_count(bs, size), max(1, passthroughcheck.CHECK_CHUNK // bs)
        upto = 0 if known is not None else min(per, nblocks)
        self.counts["checked"] += known is None
        try:  # the first chunk in the call that opens it: one thread call for a small file
            fd, identity = await trio.to_thread.run_sync(
                passthroughcheck.verified_fd, path, size, bs, crcs, upto,
                limiter=self.cache.disk_limiter,
            )  # fmt: skip
        except OSError as exc:
            log.warning("passthrough: cannot open %s: %s", version.key, exc.strerror)
            return 0
        if fd is None:  # a block failed its CRC: the FUSE path reads, drops and refetches it
            return 0
        try:
            if known is not None:  # as checked: flocked now, so no punch comes after
                passed = identity == known and not self._stop.is_set()
            else:
                passed = await self._rest_passes(fd, version, crcs, range(per, nblocks, per))
            # Not after a block was dropped while it was read (held: not evicted), nor once
            # unmounting.
            current = self.ledger.record(version.oid) is record and record.taken == taken
            backing_id = self._register(fd) if passed and current else 0
        finally:
            os.close(fd)  # the kernel holds its own reference
        if backing_id:
            kept = Registration(backing_id, record, taken, identity, path, trio.current_time())
            self._kept.add(version.oid, kept, (b.oid for b in self._inodes.values()))
        return backing_id

    async def _rest_passes(
        self, fd: int, version: ObjectVersion, crcs: dict[int, int], firsts: range
    ) -> bool:
        """Whether the chunks from each of ``firsts`` pass, one thread call (and one disk
        token) each: a multi-GiB file takes no token for its whole read; False once
        unmount begins."""
        size, bs = version.size, self.cache.block_size
        for first in firsts:
            if self._stop.is_set():
                return False
            last = min(first + firsts.step, firsts.stop)
            try:
                if not await trio.to_thread.run_sync(
                    passthroughcheck.blocks_pass, fd, size, bs, crcs, first, last,
                    limiter=self.cache.disk_limiter,
                ):  # fmt: skip
                    return False
            except OSError as exc:
                log.warning("passthrough: cannot read %s: %s", version.key, exc.strerror)
                return False
        return not self._stop.is_set()

    def _register(self, fd: int) -> int:
        """``fd``'s backing id; 0 if registering fails (then passthrough turns off)."""
        try:
            return self.register(fd)
        except OSError as exc:  # not root, the cache dir on overlayfs: stop trying
            self.turn_off(f"registering a backing file failed: {exc.strerror}")
            return 0

    def turn_off(self, why: str) -> None:
        """No more opens pass through (one line: a warning if it was asked for)."""
        if not self.enabled:
            return
        self.enabled, self.why_off = False, why
        level = logging.WARNING if self.asked else logging.INFO
        log.log(level, "passthrough off: %s; files are read through FUSE", why)

    def _complete(self, version: ObjectVersion) -> bool:
        """Whether the ledger has every block: a count, not a walk over the blocks (a
        record's blocks are its version's, so as many as it has means all)."""
        record = self.ledger.record(version.oid)
        nblocks = block_count(self.ledger.block_size, version.size)
        return nblocks > 0 and record is not None and len(record.blocks) == nblocks

"""Files cached by reading, served by the kernel: one read-only overlay on the mount root.

The Python FUSE path is serial at ~1 ms a file (profiled: 5 requests a file,
trio's thread hand-off), so a second pass over small files complete in the
cache runs at ~0.2x local disk. An object that became complete by reading is
linked (a hard link to its cache file, as `datasets.kerneltrees` does) into a
tree under ``CACHE/v1/trees/read-N``, and one overlay on the mountpoint,
``ro, lowerdir=DELTA_n:...:DELTA_1:BASE:FUSE``, serves it from the cache disk;
every other name falls through to FUSE, listings are merged.

- A mounted tree is never changed (`datasets.overlay`): new objects go into a
  new small *delta* tree, swapped in on top (mounted beneath the old overlay,
  then the old one detached) once ``BATCH`` objects wait or ``DELAY`` seconds
  after the first. Past ``MAX_LAYERS`` deltas, or when a file must go, a new
  *base* holds all that stays (compaction). A tree a swap retired loses its
  file links at once but keeps its directories (``SKELETON_AGE``, or until the
  next start): a process with a cwd or dir fd in the lazily detached overlay
  still lists every name (merged with FUSE) and its lookups fall through to FUSE.
- Linked objects are held against eviction (a pin-store hold), and a hold is
  never let go without freeing the object whole (an unlink: a reader holding it
  open keeps its bytes): what leaves (`datasets.readcheck`: failed a check, over
  the hold cap) after the swap, all at stop and when a prefetch starts
  (`step_aside`), a dead daemon's at start (`readtrees.free_left`). Never punched.
- Linked only when it reads back against its CRC32s (`datasets.readcheck`) at the
  version the FUSE view names (the daemon offers a file at its last close).
- Opt-in (``--read-serve``), and only with ``--metadata-ttl indefinite``
  (`base.config`): immutable data. overlayfs turns FUSE's new inode for a name
  it looked up into ESTALE, so a changed object cannot be followed; with an
  indefinite TTL the FUSE view never lists again either, so what is linked
  stays what FUSE would serve (a deletion or change in S3 is not seen by
  either until the next mount).
- Off for ``--writable`` mounts, a daemon that is not root, while a prefetch
  runs or a pinned dataset is under this mount (its own overlay or bind there
  would sit inside this one, which a swap would hide: `suspend`); for the
  daemon's life after a failed mount or an error (`run`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets import binds, overlay, readcheck, readtrees
from s3cachefs.datasets.pins import PinStore
from s3cachefs.datasets.readcheck import Linked

log = logging.getLogger(__name__)

BATCH = 256  # objects waiting that make a swap at once
DELAY = 2.0  # seconds after the first waiting object, a swap of what waits
MAX_LAYERS = 16  # deltas above the base before a compaction
STOP_WAIT = 5.0  # seconds stop() waits for a swap it cancelled (`kernelserve`: 10 s)
SKELETON_AGE = 3600.0  # seconds a retired tree's directories stay
WATCH_INTERVAL = 1.0  # how often mountinfo is read for an overlay someone else removed
FAULT_ENV = "S3CACHEFS_TEST_READSERVE_FAULT"  # tests: an error escapes once files are linked
FAULT = bool(os.environ.get(FAULT_ENV))


class ReadServe:
    """The root overlay of one daemon: what is linked, the layers, the mount."""

    def __init__(
        self,
        *,
        mountpoint: Path,
        mount_prefix: str,
        cache: BlockCache,
        pins: PinStore,
        enabled: bool,
        allow_other: bool = False,
        verify_interval: float | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.mount_prefix = mount_prefix
        self.cache = cache
        self.pins = pins
        self.enabled = enabled
        self.allow_other = allow_other
        self.verify_interval = verify_interval
        self.trees = cache.root / "trees"
        self.note = "" if enabled else "off"
        self.served: dict[str, Linked] = {}  # rel path -> what the stack links there
        self.waiting: dict[str, Linked] = {}
        self.leaving: set[str] = set()  # served, to go at the next swap
        self.layers: list[Path] = []  # top first
        self.mount_id: int | None = None
        self.swaps = 0
        self._below: int | None = None
        self._owner: str | None = None
        self._skeletons: list[tuple[Path, float]] = []  # retired trees' dirs, since when
        self._generation = 0
        self._suspended = False
        self._prefetches = 0  # prefetches running in this daemon (`step_aside`)
        self._stuck: list[int] = []  # our overlays a swap could not detach (covered)
        self._covered = False  # its one WARNING given
        self._publishing = trio.CancelScope()
        self._wake = trio.Event()
        self.lock = trio.Lock()

    # ---- what the daemon tells it (trio thread, must not await) ------------

    def offer(self, version: ObjectVersion, mtime_ns: int) -> None:
        """A file of the FUSE view, at its current version, was read and closed."""
        if not self.enabled or self._suspended or version.size == 0:
            return
        if not version.key.startswith(self.mount_prefix):
            return
        rel = version.key[len(self.mount_prefix) :]
        linked = self.served.get(rel)
        if linked is not None and linked.version == version and rel not in self.leaving:
            return
        if rel in self.waiting:
            return
        self.waiting[rel] = Linked(version, mtime_ns)
        if linked is not None:
            self.leaving.add(rel)  # another version: the old one goes, never mixed
        if len(self.waiting) == 1 or len(self.waiting) >= BATCH:
            self._wake.set()

    def blocked(self) -> str | None:
        """Why the root overlay must not be mounted now, or None. Must not await."""
        if self._prefetches:
            return "a prefetch is running (it may need the room linked files hold)"
        if any(m.prefix.startswith(self.mount_prefix) for m in self.pins.manifests.values()):
            return "a pinned dataset is under this mount (its own kernel serving applies)"
        return None

    # ---- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        """For the daemon's life. Whatever escapes (a bug, a race) turns read-serve off, not the
        daemon: our overlays go, what was linked is freed whole, FUSE serves everything."""
        if not self.enabled:
            return
        try:
            await self._run()
        except Exception as exc:  # reported (Sentry: an ERROR line), then off
            log.error("read-serve failed; off, files are served through FUSE", exc_info=True)
            with trio.CancelScope(shield=True):
                await self._switch_off(f"failed: {exc!r}")

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.verify_interval is not None:
                nursery.start_soon(self._checks)
            nursery.start_soon(self._watch)
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                if len(self.waiting) < BATCH and not self.leaving:
                    with trio.move_on_after(DELAY):
                        while len(self.waiting) < BATCH:
                            await self._wake.wait()
                            self._wake = trio.Event()
                with trio.CancelScope() as self._publishing:
                    await self.publish()
                if self.waiting:  # files whose last blocks were not on disk yet
                    self._wake.set()

    async def publish(self) -> None:
        """Swap in what waits, and take out what leaves."""
        async with self.lock:
            if self._suspended or not self.enabled:
                return
            why = self.blocked()
            if why is not None:
                if self.note != why:
                    log.info("read-serve off: %s", why)
                self.note = why
                self.waiting.clear()
                await self._unmount(why)
                return
            self.note = ""
            await self._publish()

    async def suspend(self) -> None:
        """Before a pinned dataset under this mount is mounted: the root overlay goes (and
        stays off while one is pinned there: `blocked`)."""
        async with self.lock:
            await self._unmount("a pinned dataset is mounted")

    async def step_aside(self) -> None:
        """A prefetch starts: the overlay goes and what it linked is freed whole, so the
        prefetch's room check counts those bytes (off until `prefetch_done`, then kept off
        by `blocked` while its dataset is pinned under this mount)."""
        self._prefetches += 1
        async with self.lock:
            await self._unmount("a prefetch started")

    def prefetch_done(self) -> None:
        self._prefetches -= 1

    async def resume(self) -> None:
        """The daemon mounts again (`s3cachefs unmount` failed); files come back as read."""
        self._suspended = False

    async def stop(self) -> None:
        """Before the FUSE unmount (and at `s3cachefs unmount`): the overlay goes. A
        publish in flight is cancelled; if the lock still does not come, every overlay of
        ours on the mountpoint is detached anyway (never one left over a dead FUSE)."""
        self._suspended = True
        self._publishing.cancel()
        with trio.move_on_after(STOP_WAIT) as waited:
            async with self.lock:
                await self._unmount("daemon stopping")
        if waited.cancelled_caught:
            log.warning("read-serve: stop waited %.0fs for a swap; detaching anyway", STOP_WAIT)
        if waited.cancelled_caught or self.mount_id is not None:  # or covered
            await trio.to_thread.run_sync(readtrees.detach_ours, self.mountpoint, self.trees)

    # ---- the swaps (under the lock) --------------------------------------------

    async def _publish(self) -> None:
        if self.mount_id is not None and not await readtrees.live(self.mount_id):
            log.info("read-serve: overlay on %s gone (unmounted by someone else)", self.mountpoint)
            await self._unmount("unmounted by someone else")
        waiting, self.waiting = self.waiting, {}
        owner = f"read:{self._generation + 1}"
        fresh = await readcheck.verified(self.cache, self.pins, waiting, self.waiting, owner)
        leaving = set(self.leaving)
        cap = await trio.to_thread.run_sync(readcheck.hold_cap, self.cache)
        readcheck.within(cap, self.served, leaving, fresh)
        if not fresh and not leaving:
            self.pins.release(owner)
            return
        stay = {r: v for r, v in self.served.items() if r not in leaving and r not in fresh}
        compact = bool(leaving) or len(self.layers) >= MAX_LAYERS + 1 or not self.layers
        self._generation += 1
        tree = self.trees / f"{readtrees.PREFIX}{self._generation}"
        files = {**stay, **fresh} if compact else fresh
        for linked in stay.values():
            self.pins.hold(owner, linked.version.oid)
        gone = {self.served[r].version.oid for r in leaving if r in self.served}
        layers = [] if not files and compact else [tree] if compact else [tree, *self.layers]
        oids = {v.version.oid for v in files.values()}
        try:  # stop() may cancel while the tree is built; once mounting, the state must follow
            build = functools.partial(readtrees.build, allow_other=self.allow_other)
            await trio.to_thread.run_sync(build, tree, self._entries(files), oids)
            with trio.CancelScope(shield=True):
                await self._mount(layers)
        except (OSError, trio.Cancelled) as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(readtrees.remove, [tree])
            self.pins.release(owner)
            self.leaving |= leaving
            if isinstance(exc, trio.Cancelled):
                raise
            # Not retried: each try costs a CRC read of every file (no right to mount
            # overlays here, say, fails the same way every time).
            log.warning("read-serve: mount on %s failed: %s; off", self.mountpoint, exc)
            await self._switch_off(f"mount failed: {exc}", locked=True)
            return
        for linked in files.values():
            linked.layer = tree
        self.served = {**stay, **fresh}
        self.leaving -= leaving
        previous, self._owner = self._owner, owner
        if previous is not None:
            self.pins.release(previous)
        await self._free(gone - {v.version.oid for v in self.served.values()})
        done = (len(fresh), len(leaving), len(self.layers), " (compacted)" if compact else "")
        log.info("read-serve: %d files linked, %d left, layers=%d%s", *done)

    def _entries(self, files: dict[str, Linked]) -> list[binds.TreeEntry]:
        return [
            binds.TreeEntry(rel, self.cache.object_path(v.version.oid), v.version.size, v.mtime_ns)
            for rel, v in sorted(files.items())
        ]

    async def _mount(self, layers: list[Path]) -> None:
        """Mount (or swap in) an overlay of ``layers`` on the mountpoint; none: unmount."""
        if not layers:
            await self._unmount("nothing left to serve", free=False)
            return
        retired = [p for p in self.layers if p not in layers]
        if self.mount_id is None:
            self.mount_id = await trio.to_thread.run_sync(self._attach, layers)
        else:
            previous = self.mount_id
            self.mount_id, outcome = await trio.to_thread.run_sync(self._swap, layers)
            if outcome == "covered":  # still mounted: detached when uncovered, or at stop
                self._stuck.append(previous)
                self._warn_covered()
        self.layers = layers
        self.swaps += 1
        now = time.monotonic()
        old = [p for p, at in self._skeletons if now - at > SKELETON_AGE]
        self._skeletons = [(p, at) for p, at in self._skeletons if p not in old]
        self._skeletons += [(p, now) for p in retired]
        await trio.to_thread.run_sync(readtrees.strip, retired)
        await trio.to_thread.run_sync(readtrees.remove, old)

    def _attach(self, layers: list[Path]) -> int:
        if self._below is None:
            self._below = overlay.open_below(self.mountpoint)
        return readtrees.attach(self.mountpoint, self._below, layers)

    def _swap(self, layers: list[Path]) -> tuple[int, str]:
        assert self._below is not None and self.mount_id is not None
        return overlay.swap(layers, self._below, self.mountpoint, self.mount_id)

    async def _unmount(self, why: str, *, free: bool = True) -> None:
        """Detach the overlay, remove its trees, let go of its objects (freed whole:
        a reader of the detached overlay may still have one open)."""
        ours = [*([self.mount_id] if self.mount_id is not None else []), *self._stuck[::-1]]
        for mount_id in ours:  # top first: each swap mounts beneath what is on top
            outcome = await trio.to_thread.run_sync(binds.detach, self.mountpoint, mount_id)
            if outcome == "covered":  # still mounted: its trees, holds and state stay
                self._warn_covered()
                return
            log.info("read-serve: overlay on %s %s: %s", self.mountpoint, outcome, why)
            if mount_id in self._stuck:
                self._stuck.remove(mount_id)
        if self._below is not None:
            os.close(self._below)
            self._below = None
        skeletons = [p for p, _ in self._skeletons]
        await trio.to_thread.run_sync(readtrees.remove, [*self.layers, *skeletons])
        oids = {v.version.oid for v in self.served.values()}
        self.mount_id, self.layers, self._skeletons = None, [], []
        self.served, self.leaving = {}, set()
        if self._owner is not None:
            self.pins.release(self._owner)
            self._owner = None
        if free:
            await self._free(oids)

    def _warn_covered(self) -> None:
        self.note = "another mount is on top of the overlay: left until it goes"
        if not self._covered:
            log.warning("read-serve: %s has another mount on top; left mounted", self.mountpoint)
        self._covered = True

    async def _switch_off(self, why: str, *, locked: bool = False) -> None:
        """Off for this daemon's life (``status --json`` says ``why``): our overlays go,
        what they linked is freed whole."""
        self.enabled = False
        self.waiting.clear()
        try:
            if locked:
                await self._unmount(why)
            else:
                with trio.move_on_after(STOP_WAIT):
                    async with self.lock:
                        await self._unmount(why)
        except Exception:  # whatever the state: no overlay left over a dead FUSE
            log.exception("read-serve: unmounting after %s", why)
        await trio.to_thread.run_sync(readtrees.detach_ours, self.mountpoint, self.trees)
        self.note = f"off: {why}"

    async def _free(self, oids: set[str]) -> None:
        await self.cache.free(oids - self.cache.pinned)

    async def _watch(self) -> None:
        """Let go of an overlay someone else unmounted (``umount -R MOUNTPOINT``): the
        handle on the FUSE directory under it would keep the FUSE mount busy."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if FAULT and self.mount_id is not None:
                raise RuntimeError(f"{FAULT_ENV} (a test's fault)")
            if self.mount_id is None:
                continue
            async with self.lock:
                if self.mount_id is not None and not await readtrees.live(self.mount_id):
                    await self._unmount("unmounted by someone else")

    # ---- keeping what is served current ------------------------------------------

    async def _checks(self) -> None:
        """Every ``--verify-interval``, read every linked file back against its CRC32s: its
        cache file (the same inode, held; a swap meanwhile may remove the layer it is in)."""
        assert self.verify_interval is not None
        while True:
            await trio.sleep(self.verify_interval)
            damaged = await readcheck.damaged(self.cache, self.served)
            if damaged:
                log.warning("read-serve check: %d damaged (e.g. %s)", len(damaged), damaged[0])
                self.leaving.update(damaged)
                self._wake.set()

    def describe(self) -> dict[str, Any]:  # `status --json`
        return {
            "mounted": self.mount_id is not None,
            "files": len(self.served),
            "waiting": len(self.waiting),
            "layers": len(self.layers),
            "swaps": self.swaps,
            "note": self.note or None,
        }

"""Kernel-served pinned datasets: binding a tree of hard links over a dataset, swaps, unbinds.

A Python FUSE daemon tops out near 0.2x local disk for small files: every
open, read and release is a round trip through it. A complete, verified,
unsharded pinned dataset does not need the daemon: after a prefetch completes,
the daemon links its cache files into a tree (`datasets.kerneltrees`) and binds
that tree read-only over ``MOUNTPOINT/<dataset>``. From then on the kernel
serves the dataset like any local directory; the daemon's counters no longer
see those reads.

Rules that keep every guarantee of the FUSE path:
- Objects a tree links stay pinned while the tree exists (a hold on the pin
  store): the cache never punches holes in a linked inode. A whole-object free
  is an unlink, so readers holding a file open keep its bytes.
- A tree is built completely, ``syncfs``'d, and only then bound. A rebuild
  (re-prefetch that changed objects, a tree that no longer matches) builds a
  new tree and swaps (`datasets.binds`: beneath, then detach the old one).
  A tree a crash left unsynced is rebuilt at start (`datasets.kerneltrees`).
- Unbind before unpin: evict, a prefetch that leaves the dataset incomplete,
  and stop detach the bind (lazily if busy) before anything is freed.
- `verify` repairs a kernel-served object into a *new* file and renames it
  over the tree entry: a reader sees the old inode or the repaired one.
- Between checks the kernel serves the bytes on disk unchecked: a tree's files
  are checked before it is first bound in a daemon's life (``checked``; a first
  prefetch, which reads every object back, counts) and on a schedule while it
  is bound (`datasets.kernelcheck`); one that fails unbinds the dataset until `verify`.
- Between `s3cachefs unmount`'s ``unbind`` and its ``rebind`` nothing binds.
- Only what this daemon mounted is unmounted, by path and mount id.
- Every mount and unmount runs in a worker thread: the path lookup crosses the
  FUSE mount, which this daemon's trio thread answers.
Which datasets qualify: `datasets.kernelpolicy`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets import binds, kernelpolicy, kerneltrees
from s3cachefs.datasets.kernelcheck import KernelChecks
from s3cachefs.datasets.kerneltrees import Bind, Layout
from s3cachefs.datasets.pins import Manifest, PinStore

log = logging.getLogger(__name__)

# How long stop may spend unmounting binds before the FUSE unmount goes ahead.
STOP_TIMEOUT = 10.0


class KernelServe:
    """The binds of one daemon: which datasets the kernel serves, and their trees."""

    def __init__(
        self,
        *,
        mountpoint: Path,
        mount_prefix: str,
        bucket: str,
        cache: BlockCache,
        pins: PinStore,
        enabled: bool,
        verify_interval: float | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.mount_prefix = mount_prefix
        self.bucket = bucket
        self.cache = cache
        self.pins = pins
        self.enabled = enabled
        self.trees = cache.root / "trees"
        self.binds: dict[str, Bind] = {}
        self.notes: dict[str, str] = {}  # manifest id -> why it is not kernel-served
        self.checks = KernelChecks(self, verify_interval)
        self.lock = trio.Lock()  # held while binds change
        # Datasets whose files this daemon has read back and found intact (a check,
        # `verify`, or a first prefetch, which reads every object back): only these
        # may be bound. Files damaged while no daemon ran are never kernel-served.
        self.checked: set[str] = set()
        self.changes = 0  # bumped whenever a bind or a tree's files change (under the lock)
        self._generation = 0
        self._stopping = False
        self._paused = False  # `s3cachefs unmount` is unmounting: no bind until `resume`

    # ---- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """For the daemon's life, once the FUSE mount answers: the checks before binding
        (each eligible dataset at start, and any a refresh may not bind yet), then the binds;
        and the scheduled checks of bound datasets.

        Checked *before* binding, not after: until its check passes, the FUSE
        path serves the dataset (slower, but it checks every block on the way),
        so a file damaged while no daemon ran (a crash, a power loss, a failing
        disk) is never served by the kernel.
        """
        if not self.enabled:
            return
        await trio.to_thread.run_sync(kerneltrees.sweep, self.trees, self.pins.manifests)
        for manifest_id in list(self.pins.manifests):
            self.checks.want(manifest_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.checks.run_schedule)
            while True:
                manifest_id = await self.checks.next_wanted()
                await self._check_at_start(manifest_id)
                await self.refresh(manifest_id)

    async def _check_at_start(self, manifest_id: str) -> None:
        """The check before the first bind. A manifest replaced meanwhile (a prefetch
        saved a new one) is checked again: until a check passes, nothing binds it."""
        while not self._stopping and manifest_id not in self.checked:
            manifest = self.pins.manifests.get(manifest_id)
            if manifest is None or self._ineligible(manifest) is not None:
                return
            result = await self.checks.check(manifest, "start")
            if result is not None or self.pins.manifests.get(manifest_id) is manifest:
                return  # checked, or not checkable now (objects missing: served through FUSE)

    async def stop(self, *, final: bool = False) -> None:
        """Before the FUSE unmount: unmount every bind (trees stay for the next start).

        ``final`` (the daemon is stopping): nothing is bound again after this.
        """
        self._stopping = self._stopping or final
        self._paused = True  # set first: a refresh waiting for the lock binds nothing
        self.checks.cancel_all()
        with trio.move_on_after(STOP_TIMEOUT) as scope:
            async with self.lock:
                for bind in list(self.binds.values()):
                    await self._detach(bind, "daemon stopping" if final else "unmounting")
                    self.binds.pop(bind.manifest_id, None)
                    self.changes += 1
                    await self._release_hold(bind)
        if scope.cancelled_caught:
            log.warning(
                "kernel-serve: gave up unbinding after %.0fs; still bound: %s",
                STOP_TIMEOUT,
                ", ".join(str(b.target) for b in self.binds.values()) or "nothing",
            )

    async def resume(self) -> None:
        """`s3cachefs unmount` failed (busy): bind the datasets again."""
        if self._stopping:
            return
        self._paused = False
        for manifest_id in list(self.pins.manifests):
            await self.refresh(manifest_id)

    # ---- what changes the binds ---------------------------------------------

    async def refresh(self, manifest_id: str) -> None:
        """Make the bind of one dataset match its manifest: bind, rebuild and swap, or unbind."""
        if not self.enabled:
            return
        async with self.lock:
            await self._refresh(manifest_id)

    async def release(self, manifest: Manifest) -> None:
        """Unbind and remove the tree before the dataset is unpinned (evict)."""
        async with self.lock:
            self.checks.cancel(manifest.id)  # a check reading the files ends quietly
            bind = self.binds.get(manifest.id)
            if bind is not None:
                await self.unbind(bind, "dataset evicted")
            else:  # a tree that was never bound (bind failed, or served off)
                await trio.to_thread.run_sync(kerneltrees.remove, self.trees / manifest.id)
            self.notes.pop(manifest.id, None)
            self.checked.discard(manifest.id)
            self.checks.forget(manifest.id)

    async def repair(self, manifest: Manifest, versions: list[ObjectVersion]) -> None:
        """Before `verify` re-fetches these objects: make the fetch land in new files.

        The cache path is unlinked (the tree keeps the damaged inode meanwhile),
        so the re-fetch creates a new file; `relink` then renames it into the tree.
        """
        if manifest.id not in self.binds:
            return
        for version in versions:
            await self.cache.drain_object(version)
            await self.cache.forget_object(version)
            path = self.cache.object_path(version.oid)
            await trio.to_thread.run_sync(path.unlink, True)

    async def relink(self, manifest: Manifest, repaired: list[ObjectVersion], ok: bool) -> None:
        """After `verify`: repaired files renamed over their tree entries; unbind if not intact.

        A dataset that is not bound (a check found damage) is bound again once intact.
        """
        async with self.lock:
            bind = self.binds.get(manifest.id)
            self.changes += 1
            if ok:
                self.checks.record(
                    manifest, "verify", len(manifest.objects), manifest.total_bytes, []
                )
                self.checked.add(manifest.id)
            if bind is None:
                if ok and self.enabled:
                    await self._refresh(manifest.id)
                return
            if not ok:
                await self.unbind(bind, "verify found objects it could not repair")
                self.notes[manifest.id] = "not intact (verify failed); served through FUSE"
                return
            for version in repaired:
                rel = version.key[len(manifest.prefix) :]
                await trio.to_thread.run_sync(
                    binds.relink, self.cache.object_path(version.oid), bind.tree / rel
                )
            await trio.to_thread.run_sync(binds.syncfs, self.trees)
            await self._refresh(manifest.id)  # and check the whole tree

    # ---- status --------------------------------------------------------------

    async def describe(self) -> dict[str, dict[str, Any]]:
        """Per manifest id: whether the kernel serves it now (read from mountinfo), and where,
        and what the last check of its files found."""
        live = await trio.to_thread.run_sync(self._live_ids)
        out: dict[str, dict[str, Any]] = {}
        for manifest_id, manifest in self.pins.manifests.items():
            bind = self.binds.get(manifest_id)
            bound = bind is not None and bind.mount_id in live
            note = self.notes.get(manifest_id) or self._ineligible(manifest) or "not bound"
            out[manifest_id] = {
                "kernel_served": bound,
                "bind": str(bind.target) if bind and bound else None,
                "tree": str(bind.tree) if bind and bound else None,
                "kernel_note": None if bound else note,
                **self.checks.describe(manifest_id, bound),
            }
        return out

    def _live_ids(self) -> set[int]:
        return {e.id for e in binds.mountinfo()}

    # ---- internals (under the lock) ---------------------------------------

    def _ineligible(self, manifest: Manifest) -> str | None:
        """Why the kernel must not serve this dataset, or None. Must not await."""
        return kernelpolicy.refusal(
            manifest,
            self.pins.manifests.values(),
            enabled=self.enabled,
            bucket=self.bucket,
            mount_prefix=self.mount_prefix,
            damage=self.checks.damage_note(manifest),
        )

    async def layout(self, manifest: Manifest) -> Layout | None:
        """The tree's files and directories; None if any object is not complete in the cache.

        The same tree as the FUSE view: a file hidden by a directory of the same
        name is left out, and the manifest's directories with no file of their
        own (``dir/`` markers, or above a skipped key) are made. Computed in a
        worker thread from a snapshot (a dataset of 100k objects takes seconds):
        the trio thread keeps answering the mount.
        """
        objects, dirs = list(manifest.objects.values()), list(manifest.dirs)
        return await trio.to_thread.run_sync(
            kerneltrees.layout_of, self.cache, manifest.bucket, manifest.prefix, objects, dirs
        )

    async def _refresh(self, manifest_id: str) -> None:
        manifest = self.pins.manifests.get(manifest_id)
        bind = self.binds.get(manifest_id)
        if bind is not None and bind.mount_id not in await trio.to_thread.run_sync(self._live_ids):
            log.info("kernel-serve target=%s: bind gone (unmounted by someone else)", bind.target)
            self.binds.pop(manifest_id)
            self.changes += 1
            await self._release_hold(bind)
            bind = None
        reason = "not pinned" if manifest is None else self._ineligible(manifest)
        layout = None
        if manifest is not None and reason is None and not self._paused:
            layout = await self.layout(manifest)
            if self.pins.manifests.get(manifest_id) is not manifest:
                await self._refresh(manifest_id)  # replaced meanwhile: the new one
                return
            if layout is None:
                reason = "not every object is in the cache; served through FUSE"
            elif bind is None and manifest_id not in self.checked:
                reason = "its files are checked before it is bound; served through FUSE meanwhile"
                self.checks.want(manifest_id)
        if self._paused:  # also set while the layout was computed
            reason = "the daemon is stopping" if self._stopping else "unmounting"
        if reason is not None or manifest is None or layout is None:
            if bind is not None:
                await self.unbind(bind, reason or "not pinned")
            if reason and manifest is not None and self.notes.get(manifest_id) != reason:
                log.info("kernel-serve dataset=%s off: %s", manifest.prefix, reason)
            if reason is not None:
                self.notes[manifest_id] = reason
            return
        self.notes.pop(manifest_id, None)
        tree = self.trees / manifest_id
        if await trio.to_thread.run_sync(kerneltrees.current, tree, layout):
            if bind is None:
                await self._bind(manifest, tree, layout, previous=None)
            return
        await self._bind(manifest, tree, layout, previous=bind)

    async def _bind(
        self,
        manifest: Manifest,
        tree: Path,
        layout: Layout,
        previous: Bind | None,
    ) -> None:
        """Build (if needed) and bind ``tree``; with ``previous``, swap it in under the old bind."""
        rel = manifest.prefix[len(self.mount_prefix) :].rstrip("/")
        target = self.mountpoint / rel
        self._generation += 1
        owner = f"kernel:{manifest.id}:{self._generation}"
        oids = layout.oids
        for oid in oids:
            self.pins.hold(owner, oid)
        staged = kerneltrees.next_path(tree)
        try:
            fresh = await trio.to_thread.run_sync(kerneltrees.stage, tree, layout)
            source = staged if fresh else tree
            ready = await trio.to_thread.run_sync(binds.target_ready, target, previous is not None)
            if not ready:
                raise OSError(f"{target} is not a directory of the mount")
            if previous is None:
                mount_id = await trio.to_thread.run_sync(binds.attach_ro, source, target)
            else:
                mount_id = await self._swap(source, target, previous)
            if fresh:
                await trio.to_thread.run_sync(kerneltrees.promote, tree)
        except OSError as exc:
            self.pins.release(owner)
            self.notes[manifest.id] = f"bind failed: {exc}"
            log.warning(
                "kernel-serve dataset=%s bind on %s failed: %s", manifest.prefix, target, exc
            )
            await trio.to_thread.run_sync(kerneltrees.discard, staged)
            return
        self.binds[manifest.id] = Bind(manifest.id, target, tree, mount_id, owner, oids)
        self.changes += 1
        log.info(
            "kernel-serve bound dataset=%s target=%s files=%d%s",
            manifest.prefix,
            target,
            len(layout.entries),
            " (swapped)" if previous is not None else "",
        )
        if previous is not None:
            await self._release_hold(previous)

    async def _swap(self, source: Path, target: Path, previous: Bind) -> int:
        """Mount the new tree beneath the old bind, then detach the old one."""
        try:
            mount_id = await trio.to_thread.run_sync(
                lambda: binds.attach_ro(source, target, beneath=True)
            )
        except binds.BeneathUnsupported:
            # Old kernel: for a moment the FUSE view (same bytes, through the daemon) answers.
            await self._detach(previous, "swapping (no MOVE_MOUNT_BENEATH)")
            return await trio.to_thread.run_sync(binds.attach_ro, source, target)
        await self._detach(previous, "swapped for a new tree")
        return mount_id

    async def _detach(self, bind: Bind, why: str) -> None:
        outcome = await trio.to_thread.run_sync(binds.detach, bind.target, bind.mount_id)
        if outcome == "covered":
            log.warning("kernel-serve target=%s has another mount on top; left alone", bind.target)
        else:
            log.info("kernel-serve unbound target=%s (%s): %s", bind.target, outcome, why)

    async def unbind(self, bind: Bind, why: str) -> None:
        await self._detach(bind, why)
        self.binds.pop(bind.manifest_id, None)
        self.changes += 1
        await trio.to_thread.run_sync(kerneltrees.remove, bind.tree)
        await self._release_hold(bind)

    async def _release_hold(self, bind: Bind) -> None:
        """Objects only the old tree kept pinned are freed whole (unlinked): a reader that
        still holds one open keeps its bytes; the cache never punches holes in it."""
        self.pins.release(bind.owner)
        pinned = self.cache.pinned
        await self.cache.free(set(bind.oids) - pinned)

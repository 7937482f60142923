"""Kernel-served pinned datasets: when a tree is mounted over a dataset, swapped, unmounted.

A Python FUSE daemon tops out near 0.2x local disk for small files: every
open, read and release is a round trip through it. A complete, verified,
pinned dataset does not need the daemon: after a prefetch completes, the
daemon links its cache files into a tree (`datasets.kerneltrees`) and mounts
that tree read-only over ``MOUNTPOINT/<dataset>`` (the mountpoint itself for a
dataset at the mount root): an overlay whose lower layers are the tree, then
the FUSE directory, or a bind of the tree where overlays cannot be made
(`datasets.kernelmounts`). The shards of one dataset pinned here share one
tree. From then on the kernel serves the tree's files like any local
directory; the daemon's counters no longer see those reads. Through an
overlay, every other name (the other shards' files) is looked up and read
through FUSE, lazily, and listings show the whole dataset.

Rules that keep every guarantee of the FUSE path:
- Objects a tree links stay pinned while the tree exists (a hold on the pin
  store): the cache never punches holes in a linked inode. A whole-object free
  is an unlink, so readers holding a file open keep its bytes.
- A tree is built completely, and only then mounted; it is ``syncfs``'d and
  recorded as synced after (`datasets.kernelseal`), off the prefetch's reply; a
  failed ``syncfs`` unmounts it (the FUSE view serves). A mounted
  tree is never changed (an overlay's lower layer must not change): a rebuild
  (re-prefetch that changed objects, another shard, a tree that no longer
  matches, `verify`'s repairs) builds a new tree and swaps (beneath, then
  detach the old one). A tree a crash left unsynced is rebuilt at start.
- Unmount before unpin: evict, a prefetch that leaves the dataset incomplete,
  and stop detach the mount (lazily if busy) before anything is freed.
- `verify` repairs a kernel-served object into a *new* file (the tree keeps
  the damaged inode meanwhile) and swaps in a tree that links it.
- Between checks the kernel serves the bytes on disk unchecked: a tree's files
  are checked before it is first mounted in a daemon's life (``checked``; a first
  prefetch, which reads every object back, counts) and on a schedule while it
  is mounted (`datasets.kernelcheck`); one that fails unmounts the dataset until `verify`.
- Between `s3cachefs unmount`'s ``unbind`` and its ``rebind`` nothing is mounted.
- Only what this daemon mounted is unmounted, by path and mount id.
- Every mount and unmount runs in a worker thread: the path lookup crosses the
  FUSE mount, which this daemon's trio thread answers.
Which datasets qualify: `datasets.kernelpolicy`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets import kerneltrees
from s3cachefs.datasets.kerneldirs import DatasetMounts
from s3cachefs.datasets.kernelprestage import OnPin
from s3cachefs.datasets.kerneltrees import Bind
from s3cachefs.datasets.pins import Manifest

log = logging.getLogger(__name__)

# How long stop may spend unmounting before the FUSE unmount goes ahead.
STOP_TIMEOUT = 10.0
# How often mountinfo is read for mounts someone else removed.
WATCH_INTERVAL = 1.0


class KernelServe(DatasetMounts):
    """The kernel-served datasets of one daemon: which the kernel serves, their trees, mounts."""

    # ---- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """For the daemon's life, once the FUSE mount answers: the checks before mounting
        (each eligible dataset at start, and any a refresh may not mount yet), then the
        mounts; and the scheduled checks of mounted datasets.

        Checked *before* mounting, not after: until its check passes, the FUSE
        path serves the dataset (slower, but it checks every block on the way),
        so a file damaged while no daemon ran (a crash, a power loss, a failing
        disk) is never served by the kernel.
        """
        async with trio.open_nursery() as nursery:
            if self.readserve is not None:  # files cached by reading (`datasets.readserve`)
                nursery.start_soon(self.readserve.run)
            await self._run_pinned()

    async def _run_pinned(self) -> None:
        if not self.enabled:
            return
        if self.no_overlays:
            log.info(
                "kernel-serve: binds instead of overlays (%s): only complete, unsharded datasets"
                " below the mount root are kernel-served",
                self.no_overlays,
            )
        groups = {self.group_id(m.prefix) for m in self.pins.manifests.values()}
        await trio.to_thread.run_sync(kerneltrees.sweep, self.trees, groups)
        for manifest_id_ in list(self.pins.manifests):
            self.checks.want(manifest_id_)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.checks.run_schedule)
            nursery.start_soon(self._watch_mounts)
            nursery.start_soon(self.seals.run)
            nursery.start_soon(self.prestages.run)
            while True:
                wanted = await self.checks.next_wanted()
                await self._check_at_start(wanted)
                await self.refresh(wanted)

    async def _watch_mounts(self) -> None:
        """Forget the mounts someone else unmounted (``umount -R MOUNTPOINT``): the handle an
        overlay keeps on its FUSE directory would keep the FUSE mount, and this daemon, alive."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if not self.binds:
                continue
            async with self.lock:  # read under the lock: a swap changes the ids
                live = await trio.to_thread.run_sync(self._live_ids)
                for bind in self._mounted():
                    if bind.mount_id not in live:
                        await self._forget_gone(bind)

    async def _check_at_start(self, manifest_id_: str) -> None:
        """The check before the first mount. A manifest replaced meanwhile (a prefetch
        saved a new one) is checked again: until a check passes, nothing mounts it."""
        while not self._stopping and manifest_id_ not in self.checked:
            manifest = self.pins.manifests.get(manifest_id_)
            if manifest is None or self._ineligible(manifest) is not None:
                return
            result = await self.checks.check(manifest, "start")
            if result is not None or self.pins.manifests.get(manifest_id_) is manifest:
                return  # checked, or not checkable now (objects missing: served through FUSE)

    async def stop(self, *, final: bool = False) -> None:
        """Before the FUSE unmount: unmount every tree (trees stay for the next start).

        ``final`` (the daemon is stopping): nothing is mounted again after this.
        """
        self._stopping = self._stopping or final
        self._paused = True  # set first: a refresh waiting for the lock mounts nothing
        if self.readserve is not None:
            with trio.move_on_after(STOP_TIMEOUT):
                await self.readserve.stop()
        self.checks.cancel_all()
        with trio.move_on_after(STOP_TIMEOUT) as scope:
            async with self.lock:
                for bind in self._mounted():
                    await self._detach(bind, "daemon stopping" if final else "unmounting")
                    self._drop(bind)
                    await self._release_hold(bind)
                await self._close_handles()  # of covered overlays and failed mounts too
            await self.seals.now()  # the trees stay for the next start: current if sealed
        if scope.cancelled_caught:
            log.warning(
                "kernel-serve: gave up unmounting after %.0fs; still mounted: %s",
                STOP_TIMEOUT,
                ", ".join(str(b.target) for b in self._mounted()) or "nothing",
            )

    async def resume(self) -> None:
        """`s3cachefs unmount` failed (busy): mount the datasets again."""
        if self._stopping:
            return
        self._paused = False
        if self.readserve is not None:
            await self.readserve.resume()
        for manifest_id_ in list(self.pins.manifests):
            await self.refresh(manifest_id_)

    # ---- what changes the mounts ---------------------------------------------

    def prestage(self, manifest: Manifest) -> OnPin | None:
        """What a first prefetch calls for each object it pins: its file is linked into the
        tree's ``.pre`` meanwhile (`datasets.kernelprestage`); None where the dataset, once
        complete, would not be kernel-served."""
        whole = Manifest(manifest.bucket, manifest.prefix, manifest.shard, complete=True)
        if self._paused or self._ineligible(whole) is not None:
            return None
        prefix = manifest.prefix
        return self.prestages.on_pin(self.trees / self.group_id(prefix), prefix)

    async def prestaged(self, manifest: Manifest) -> None:
        """A first prefetch ended, however: its ``.pre`` goes (its refresh used it, or none
        will: its links would keep files the cache evicts on disk, outside its accounting)."""
        await self.prestages.drop(self.trees / self.group_id(manifest.prefix))

    async def refresh(self, manifest_id_: str) -> None:
        """Make the mount of one dataset's directory match its manifests: mount, rebuild
        and swap, or unmount."""
        if not self.enabled:
            return
        async with self.lock:
            await self._refresh(manifest_id_)
            manifest = self.pins.manifests.get(manifest_id_)
            if manifest is None:
                return
            nested = {  # a new dataset inside (or around) a mounted one: that one goes too
                m.prefix
                for m in self.pins.manifests.values()
                if m.prefix != manifest.prefix
                and (m.prefix.startswith(manifest.prefix) or manifest.prefix.startswith(m.prefix))
            }
            for prefix in sorted(nested):
                await self._refresh_dir(prefix)

    async def release(self, manifest: Manifest) -> None:
        """Unmount and remove the tree before the dataset is unpinned (evict)."""
        async with self.lock:
            self.checks.cancel(manifest.id)  # a check reading the files ends quietly
            bind = self.binds.get(manifest.id)
            if bind is not None:
                await self.unbind(bind, "dataset evicted")
            else:  # a tree that is not mounted (mount failed, or served off)
                tree = self.trees / self.group_id(manifest.prefix)
                await self.remove_tree(tree)
            self.notes.pop(manifest.id, None)
            self.checked.discard(manifest.id)
            self.checks.forget(manifest.id)

    async def repair(self, manifest: Manifest, versions: list[ObjectVersion]) -> None:
        """Before `verify` re-fetches these objects: make the fetch land in new files.

        The cache path is unlinked (the mounted tree keeps the damaged inode
        meanwhile), so the re-fetch creates a new file; `relink` then swaps in a
        new tree that links it.
        """
        if manifest.id not in self.binds:
            return
        for version in versions:
            await self.cache.drain_object(version)
            await self.cache.forget_object(version)
            path = self.cache.object_path(version.oid)
            await trio.to_thread.run_sync(path.unlink, True)

    async def relink(self, manifest: Manifest, repaired: list[ObjectVersion], ok: bool) -> None:
        """After `verify`: a new tree with the repaired files swapped in; unmount if not intact.

        A dataset that is not mounted (a check found damage) is mounted again once intact.
        """
        async with self.lock:
            bind = self.binds.get(manifest.id)
            self.changes += 1
            if ok:
                self.checks.record(
                    manifest, "verify", len(manifest.objects), manifest.total_bytes, []
                )
                self.checked.add(manifest.id)
            if bind is not None and not ok:
                await self.unbind(bind, "verify found objects it could not repair")
                self.notes[manifest.id] = "not intact (verify failed); served through FUSE"
                return
            if self.enabled and (ok or repaired):
                await self._refresh(manifest.id)  # the tree no longer matches: rebuilt, swapped

    # ---- status --------------------------------------------------------------

    async def describe(self) -> dict[str, dict[str, Any]]:
        """Per manifest id: whether the kernel serves it now (read from mountinfo), and where,
        how, and what the last check of its files found."""
        live = await trio.to_thread.run_sync(self._live_ids)
        out: dict[str, dict[str, Any]] = {}
        for manifest_id_, manifest in self.pins.manifests.items():
            bind = self.binds.get(manifest_id_)
            bound = bind is not None and bind.mount_id in live
            note = self.notes.get(manifest_id_) or self._ineligible(manifest) or "not mounted"
            out[manifest_id_] = {
                "kernel_served": bound,
                "bind": str(bind.target) if bind and bound else None,
                "kernel_mount": bind.kind if bind and bound else None,
                "tree": str(bind.tree) if bind and bound else None,
                # directories the overlay never asks FUSE about (`datasets.kernelopaque`)
                "opaque_dirs": opaque_dirs(bind) if bind and bound else None,
                "kernel_note": None if bound else note,
                **self.checks.describe(manifest_id_, bound),
            }
        return out


def opaque_dirs(bind: Bind) -> int | str:
    return "unsupported" if bind.opaque is None else len(bind.opaque)

"""The mount of one dataset directory's tree: which manifests' files it merges, and
mounting, swapping and unmounting it (the state and the steps `datasets.kernelserve` uses).

Every method here runs under ``lock`` (the caller's): mounts and trees change
one at a time. A dataset directory has one tree, ``trees/<group id>`` (the id of
its whole manifest), holding the complete, checked files of every manifest
pinned there that may be kernel-served: a whole dataset, or its shards merged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets import binds, kernelopaque, kernelpolicy, kerneltrees, overlay
from s3cachefs.datasets.kernelcheck import KernelChecks
from s3cachefs.datasets.kernelmounts import OVERLAY, KernelMounts, choose
from s3cachefs.datasets.kernelprestage import PreStages
from s3cachefs.datasets.kernelseal import Seals
from s3cachefs.datasets.kerneltrees import Bind, Layout
from s3cachefs.datasets.pins import Manifest, PinStore, manifest_id
from s3cachefs.datasets.readserve import ReadServe

log = logging.getLogger(__name__)


class DatasetMounts:
    """The state of a daemon's kernel-served datasets, and the steps that change it."""

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
        kind, self.no_overlays = choose(enabled)
        self.mounts = KernelMounts(kind)
        # manifest id -> the mount that serves it (the shards of one dataset share one)
        self.binds: dict[str, Bind] = {}
        self.notes: dict[str, str] = {}  # manifest id -> why it is not kernel-served
        self.checks = KernelChecks(self, verify_interval)
        self.lock = trio.Lock()  # held while mounts change
        # Datasets whose files this daemon has read back and found intact (a check,
        # `verify`, or a first prefetch, which reads every object back): only these
        # may be mounted. Files damaged while no daemon ran are never kernel-served.
        self.checked: set[str] = set()
        self.changes = 0  # bumped whenever a mount or a tree's files change (under the lock)
        self._generation = 0
        self._stopping = False
        self._paused = False  # `s3cachefs unmount` is unmounting: no mount until `resume`
        self._told_unmarked = False  # the warning that marks cannot be held: once a life
        self.seals = Seals(self)  # trees promoted, not yet synced and sealed
        self.prestages = PreStages(cache)  # first prefetches' files, linked as pinned
        # The root overlay of files cached by reading: it goes before a dataset under this
        # mount is mounted (a mount inside it would be hidden by its next swap).
        self.readserve: ReadServe | None = None

    def _live_ids(self) -> set[int]:
        return {e.id for e in binds.mountinfo()}

    # ---- internals (under the lock) ---------------------------------------

    def group_id(self, prefix: str) -> str:
        """The id of the tree of a dataset's directory (its whole manifest's id)."""
        return manifest_id(self.bucket, prefix, None)

    def _mounted(self) -> list[Bind]:
        return list({id(b): b for b in self.binds.values()}.values())

    def _drop(self, bind: Bind) -> None:
        for member in bind.ids:
            if self.binds.get(member) is bind:
                del self.binds[member]
        self.changes += 1

    async def _close_handles(self) -> None:
        """Close the FUSE handles no mount of ours needs (one left open keeps the FUSE
        mount busy: a non-lazy unmount fails)."""
        targets = {b.target for b in self._mounted()}
        await trio.to_thread.run_sync(self.mounts.keep_only, targets)

    async def _forget_gone(self, bind: Bind) -> None:
        log.info("kernel-serve target=%s: mount gone (unmounted by someone else)", bind.target)
        self._drop(bind)
        await trio.to_thread.run_sync(self.mounts.forget, bind.target)
        await self._release_hold(bind)

    def _ineligible(self, manifest: Manifest) -> str | None:
        """Why the kernel must not serve this dataset, or None. Must not await."""
        return kernelpolicy.refusal(
            manifest,
            self.pins.manifests.values(),
            enabled=self.enabled,
            bucket=self.bucket,
            mount_prefix=self.mount_prefix,
            damage=self.checks.damage_note(manifest),
            overlays=self.mounts.kind == OVERLAY,
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
        others = list(manifest.listing or ())  # a shard's: the rest of the dataset's keys
        return await trio.to_thread.run_sync(
            kerneltrees.layout_of,
            self.cache,
            manifest.bucket,
            manifest.prefix,
            objects,
            dirs,
            others,
        )

    async def _refresh(self, manifest_id_: str) -> None:
        manifest = self.pins.manifests.get(manifest_id_)
        bind = self.binds.get(manifest_id_)
        prefix = manifest.prefix if manifest is not None else bind.prefix if bind else None
        if prefix is None:
            return
        await self._refresh_dir(prefix)

    async def _refresh_dir(self, prefix: str) -> None:
        """Mount, swap or unmount the tree of one dataset directory: the complete files of
        every manifest pinned there that may be kernel-served."""
        await self._refresh_tree(prefix)
        await self.prestages.drop(self.trees / self.group_id(prefix))  # used, or not needed

    async def _refresh_tree(self, prefix: str) -> None:
        gid = self.group_id(prefix)
        bind = next((b for b in self._mounted() if b.manifest_id == gid), None)
        if bind is not None and bind.mount_id not in await trio.to_thread.run_sync(self._live_ids):
            await self._forget_gone(bind)
            bind = None
        members = sorted(
            (m for m in self.pins.manifests.values() if m.prefix == prefix),
            key=lambda m: (m.shard is not None, -(m.verified_at or 0)),  # whole, then newest
        )
        chosen: list[tuple[Manifest, Layout]] = []
        reason: str | None = "not pinned"
        for manifest in members:
            reason, layout = await self._eligible(manifest, bind)
            if self.pins.manifests.get(manifest.id) is not manifest:
                await self._refresh_dir(prefix)  # replaced meanwhile: the new one
                return
            if self._paused:  # also set while the layout was computed
                reason = "the daemon is stopping" if self._stopping else "unmounting"
            if reason is None and layout is not None:
                self.notes.pop(manifest.id, None)
                chosen.append((manifest, layout))
                continue
            if reason and self.notes.get(manifest.id) != reason:
                log.info("kernel-serve dataset=%s off: %s", manifest.prefix, reason)
            self.notes[manifest.id] = reason or ""
        if not chosen:
            if bind is not None:
                await self.unbind(bind, reason or "not pinned")
            return
        layout = kerneltrees.merge([layout for _, layout in chosen])
        if self.mounts.kind == OVERLAY:
            layout = await self._with_opaque(prefix, layout)
        ids = frozenset(m.id for m, _ in chosen)
        tree = self.trees / gid
        unsealed = self.seals.record(tree)
        if await trio.to_thread.run_sync(kerneltrees.current, tree, layout, unsealed) is not None:
            if bind is not None:
                self._drop(bind)
                bind.members = ids
                self.binds.update(dict.fromkeys(ids, bind))
                return
            await self._bind(prefix, ids, tree, layout, previous=None)
            return
        await self._bind(prefix, ids, tree, layout, previous=bind)

    async def _with_opaque(self, prefix: str, layout: Layout) -> Layout:
        """The layout with the directories to mark opaque: those holding every name the FUSE
        view lists in and below them (`datasets.kernelopaque`); the overlay never asks FUSE
        about them. Listings read now: a manifest saved meanwhile refreshes again."""
        dirs = await trio.to_thread.run_sync(binds.tree_dirs, layout.entries, layout.dirs)
        listings = {rel: self.pins.listing(f"{prefix}{rel}/") for rel in dirs}
        files = [e.rel for e in layout.entries]
        opaque = await trio.to_thread.run_sync(kernelopaque.opaque_dirs, files, listings)
        return layout._replace(opaque=opaque)

    async def _eligible(
        self, manifest: Manifest, bind: Bind | None
    ) -> tuple[str | None, Layout | None]:
        """(why not, None), or (None, its layout)."""
        reason = self._ineligible(manifest)
        if reason is not None or self._paused:
            return reason, None
        layout = await self.layout(manifest)
        if layout is None:
            return "not every object is in the cache; served through FUSE", None
        if manifest.id not in self.checked and (bind is None or manifest.id not in bind.ids):
            self.checks.want(manifest.id)
            return "its files are checked before it is bound; served through FUSE meanwhile", None
        return None, layout

    async def _bind(
        self,
        prefix: str,
        ids: frozenset[str],
        tree: Path,
        layout: Layout,
        previous: Bind | None,
    ) -> None:
        """Build (if needed) and mount ``tree``; with ``previous``, swap it in under the old one."""
        rel = prefix[len(self.mount_prefix) :].rstrip("/")
        target = self.mountpoint / rel if rel else self.mountpoint
        self._generation += 1
        owner = f"kernel:{tree.name}:{self._generation}"
        oids = layout.oids
        for oid in oids:
            self.pins.hold(owner, oid)
        staged = kerneltrees.next_path(tree)
        unsealed = self.seals.record(tree)
        try:
            async with self.prestages.flushed(tree):  # its .pre (if any): every file pinned
                fresh, record = await trio.to_thread.run_sync(
                    kerneltrees.stage, tree, layout, unsealed
                )
            if fresh and previous is None:  # nothing mounts the tree: its final name first
                await self._promote(tree, record)
                fresh = False
            source = staged if fresh else tree
            ready = await trio.to_thread.run_sync(self.mounts.ready, target, previous is not None)
            if not ready:
                raise OSError(f"{target} is not a directory of the mount")
            if previous is None:
                if self.readserve is not None:
                    await self.readserve.suspend()
                mount_id = await trio.to_thread.run_sync(self.mounts.attach, source, target)
            else:
                mount_id = await self._swap(source, previous)
            if fresh:
                await self._promote(tree, record)
        except OSError as exc:
            self.pins.release(owner)
            for member in ids:
                self.notes[member] = f"mount failed: {exc}"
            log.warning("kernel-serve dataset=%s mount on %s failed: %s", prefix, target, exc)
            await trio.to_thread.run_sync(kerneltrees.discard, staged)
            if previous is not None and previous.opaque:
                # Its opaque directories may lack a name the dataset has now (a new key),
                # which the overlay would hide: the FUSE view answers until a rebuild works.
                await self.unbind(previous, "its tree is out of date and the new one failed")
            await self._close_handles()
            return
        self._tell_unmarked(record, layout)
        kind, marks = self.mounts.kind, record.opaque
        bind = Bind(tree.name, target, tree, mount_id, owner, oids, ids, kind, prefix, marks)
        if previous is not None:
            self._drop(previous)
        self.binds.update(dict.fromkeys(ids, bind))
        self.changes += 1
        log.info(
            "kernel-serve bound dataset=%s target=%s files=%d via=%s%s",
            prefix,
            target,
            len(layout.entries),
            self.mounts.kind,
            " (swapped)" if previous is not None else "",
        )
        if previous is not None:
            await self._release_hold(previous)

    async def _promote(self, tree: Path, record: kerneltrees.Synced) -> None:
        self.seals.forget(tree)
        await trio.to_thread.run_sync(kerneltrees.promote, tree)
        self.seals.add(tree, record)

    def _tell_unmarked(self, record: kerneltrees.Synced, layout: Layout) -> None:
        if record.opaque is None and layout.opaque and not self._told_unmarked:
            self._told_unmarked = True
            log.warning(
                "kernel-serve: the cache's file system cannot hold opaque marks (%s): every"
                " directory of a kernel-served dataset is merged with the FUSE view (a walk"
                " asks the daemon about each one: about half the speed)",
                record.why,
            )

    async def _swap(self, source: Path, previous: Bind) -> int:
        """Mount the new tree beneath the old mount, then detach the old one."""
        try:
            mount_id, outcome = await trio.to_thread.run_sync(self.mounts.swap, source, previous)
        except (binds.BeneathUnsupported, overlay.OverlayUnsupported):
            # Old kernel: for a moment the FUSE view (same bytes, through the daemon) answers.
            await self._detach(previous, "swapping (no MOVE_MOUNT_BENEATH)")
            return await trio.to_thread.run_sync(self.mounts.attach, source, previous.target)
        self._log_detach(previous, outcome, "swapped for a new tree")
        return mount_id

    async def _detach(self, bind: Bind, why: str) -> None:
        outcome = await trio.to_thread.run_sync(self.mounts.detach, bind)
        self._log_detach(bind, outcome, why)

    @staticmethod
    def _log_detach(bind: Bind, outcome: str, why: str) -> None:
        if outcome == "covered":
            log.warning("kernel-serve target=%s has another mount on top; left alone", bind.target)
        else:
            log.info("kernel-serve unbound target=%s (%s): %s", bind.target, outcome, why)

    async def unbind(self, bind: Bind, why: str) -> None:
        await self._detach(bind, why)
        self._drop(bind)
        await self._close_handles()  # also when another mount covers the overlay
        await self.remove_tree(bind.tree)
        await self._release_hold(bind)

    async def remove_tree(self, tree: Path) -> None:
        self.seals.forget(tree)
        await self.prestages.drop(tree)
        await trio.to_thread.run_sync(kerneltrees.remove, tree)

    async def _release_hold(self, bind: Bind) -> None:
        """Objects only the old tree kept pinned are freed whole (unlinked): a reader that
        still holds one open keeps its bytes; the cache never punches holes in it."""
        self.pins.release(bind.owner)
        pinned = self.cache.pinned
        await self.cache.free(set(bind.oids) - pinned)

"""When the files of kernel-served datasets are checked, what a check found, and what follows.

Between checks the kernel serves a bound tree's bytes unchecked (the FUSE path
checks every block it serves). So every block of every file is read back
against its CRC32 (`datasets.treecheck`, low priority) before a tree is bound at
start, and every ``--verify-interval`` while it is bound. A file that fails
unbinds the dataset and drops its bad blocks: the FUSE path serves it (and
fetches those blocks again) until `verify` has repaired it, which binds it
again. The results go to `status`, the metrics (`Metrics` reads ``results``
and ``counts`` from its own thread: a result is immutable and replaced whole)
and, through ``on_change``, systemd's STATUS= line.

`KernelChecks` belongs to a `KernelServe` and acts on its binds under its lock;
it sees its owner as `Served` (what it needs of it), so this module does not
import `datasets.kernelserve`, which imports it.
"""

from __future__ import annotations

import collections
import datetime
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.kerneltrees import Bind, Layout
from s3cachefs.datasets.pins import Manifest, PinStore
from s3cachefs.datasets.treecheck import CheckResult, FileCheck, Stopped, check_files

log = logging.getLogger(__name__)


class Served(Protocol):
    """What the checks use of the `KernelServe` they belong to."""

    enabled: bool
    mount_prefix: str
    cache: BlockCache
    pins: PinStore
    lock: trio.Lock  # held while binds change
    binds: dict[str, Bind]
    notes: dict[str, str]
    checked: set[str]
    changes: int

    async def layout(self, manifest: Manifest) -> Layout | None: ...

    async def unbind(self, bind: Bind, why: str) -> None: ...


class KernelChecks:
    def __init__(self, kernel: Served, interval: float | None) -> None:
        self.kernel = kernel
        self.interval = interval
        self.results: dict[str, CheckResult] = {}  # manifest id -> its last check
        self.counts: collections.Counter[str] = collections.Counter()  # by result
        self.next_at: float | None = None
        self.on_change: Callable[[], None] | None = None  # a check ended: systemd's STATUS=
        # Datasets waiting for the check before their first bind (`KernelServe.run`).
        self._want_send, self._want_receive = trio.open_memory_channel[str](math.inf)
        self._wanted: set[str] = set()
        self._running: dict[str, set[trio.CancelScope]] = {}  # manifest id -> running checks

    def want(self, manifest_id: str) -> None:
        """Ask for the check before a dataset's first bind (once, however often asked)."""
        if manifest_id not in self._wanted:
            self._wanted.add(manifest_id)
            self._want_send.send_nowait(manifest_id)

    async def next_wanted(self) -> str:
        manifest_id = await self._want_receive.receive()
        self._wanted.discard(manifest_id)
        return manifest_id

    def cancel(self, manifest_id: str) -> None:
        """End the checks of a dataset quietly (evicted): its files are going away."""
        for scope in self._running.get(manifest_id, ()):
            scope.cancel()

    def cancel_all(self) -> None:
        for manifest_id in list(self._running):
            self.cancel(manifest_id)

    async def run_schedule(self) -> None:
        """Check the files of every bound dataset every ``interval`` seconds."""
        kernel = self.kernel
        if not kernel.enabled or self.interval is None:
            return
        while True:
            self.next_at = time.time() + self.interval
            await trio.sleep(self.interval)
            for manifest_id in list(kernel.binds):
                manifest = kernel.pins.manifests.get(manifest_id)
                if manifest is not None and manifest_id in kernel.binds:
                    await self.check(manifest, "scheduled")

    async def check(self, manifest: Manifest, trigger: str) -> CheckResult | None:
        """Read back every file of a dataset (its tree when bound, else its cache files).

        The long reads run unlocked, on snapshots: all files, then again those
        that failed, as they are now (a `verify` or a swap may have replaced
        them). The lock is held only to decide, after making sure nothing
        changed since that second read, and to unbind whatever bind is live then.
        None if the dataset changed or went away under the check, or the check
        was cancelled (evict, stop).
        """
        with trio.CancelScope() as scope:
            self._running.setdefault(manifest.id, set()).add(scope)
            try:
                return await self._check(manifest, trigger)
            except Stopped:  # the tree went away under the scan (unbound, evicted)
                return None
            finally:
                running = self._running.get(manifest.id, set())
                running.discard(scope)
                if not running:
                    self._running.pop(manifest.id, None)
        return None  # cancelled

    async def _check(self, manifest: Manifest, trigger: str) -> CheckResult | None:
        kernel = self.kernel
        idle = trigger != "start"
        snapshot = await self._snapshot(manifest, None)
        if snapshot is None:
            return None
        changes, root, files = snapshot
        damaged = await check_files(files, kernel.cache.block_size, idle=idle, root=root)
        while True:
            if damaged:  # read again, as they are now, what failed
                again = await self._snapshot(manifest, set(damaged))
                if again is None:  # blocks dropped meanwhile (`verify`): not this check's to say
                    return None
                changes, root, recheck = again
                damaged = await check_files(recheck, kernel.cache.block_size, idle=idle, root=root)
            # Shielded: a stop that cancels the check must not cut an unbind in half.
            with trio.CancelScope(shield=True):
                async with kernel.lock:
                    if kernel.pins.manifests.get(manifest.id) is not manifest:
                        return None
                    if damaged and kernel.changes != changes:
                        continue  # a bind or a file changed since that read: read again
                    total = sum(f.size for f in files)
                    result = self.record(manifest, trigger, len(files), total, damaged)
                    if not damaged:
                        kernel.checked.add(manifest.id)
                        return result
                    kernel.checked.discard(manifest.id)
                    bind = kernel.binds.get(manifest.id)  # whatever is live now, not the snapshot's
                    if bind is not None:
                        await kernel.unbind(bind, f"{len(damaged)} files failed the check")
                        for other in bind.ids - {manifest.id}:  # other shards: mounted again
                            self.want(other)
                    kernel.notes[manifest.id] = self.damage_note(manifest) or ""
            break
        # Drop the bad blocks so the FUSE path fetches them again. Unlocked: the
        # damage recorded keeps the dataset from being bound until `verify`.
        for key in damaged:
            info = manifest.objects[key]
            version = ObjectVersion(manifest.bucket, key, info.etag, info.size)
            await kernel.cache.verify_object(version, manifest.check(key))
        return result

    async def _snapshot(
        self, manifest: Manifest, keys: set[str] | None
    ) -> tuple[int, Path | None, list[FileCheck]] | None:
        """What to read (``keys`` only, if given), computed in a worker thread, and the
        `KernelServe.changes` it matches; None if an object is not complete in the cache."""
        kernel = self.kernel
        while True:
            changes = kernel.changes
            bind = kernel.binds.get(manifest.id)
            layout = await kernel.layout(manifest)
            if layout is None:
                return None
            tree = bind.tree if bind is not None else None
            files = await trio.to_thread.run_sync(self._files, layout, tree, keys)
            if kernel.changes == changes:
                return changes, tree, files

    def _files(self, layout: Layout, tree: Path | None, keys: set[str] | None) -> list[FileCheck]:
        """Each non-empty file the tree has. Blocking (a worker thread): lookups only."""
        out = []
        cache = self.kernel.cache
        for entry, version in zip(layout.entries, layout.versions, strict=True):
            if version is None or entry.source is None:
                continue  # an empty object: nothing to read
            if keys is not None and version.key not in keys:
                continue
            path = tree / entry.rel if tree is not None else entry.source
            out.append(FileCheck(version.key, path, entry.size, cache.block_crcs(version)))
        return out

    def record(
        self, manifest: Manifest, trigger: str, objects: int, nbytes: int, damaged: list[str]
    ) -> CheckResult:
        """Keep a check's result (also `verify`'s); one log line, WARNING if it found damage."""
        result = CheckResult(trigger, time.time(), objects, nbytes, tuple(sorted(damaged)))
        self.results[manifest.id] = result
        self.counts["intact" if result.ok else "damaged"] += 1
        log.log(
            logging.INFO if result.ok else logging.WARNING,
            "kernel-serve check dataset=%s trigger=%s files=%d bytes=%d damaged=%d%s",
            manifest.prefix,
            trigger,
            objects,
            nbytes,
            len(damaged),
            f" e.g. key={result.damaged[0]}" if damaged else "",
        )
        if self.on_change is not None:
            self.on_change()
        return result

    def forget(self, manifest_id: str) -> None:
        self.results.pop(manifest_id, None)

    # ---- what they say -------------------------------------------------------------

    def damage_note(self, manifest: Manifest) -> str | None:
        """Why a dataset whose files failed a check stays on FUSE until `verify`. Must not await."""
        check = self.results.get(manifest.id)
        if check is None or check.ok:
            return None
        name = manifest.prefix[len(self.kernel.mount_prefix) :].rstrip("/") or "."
        return (
            f"the {check.trigger} check at {_when(check.finished)} found {len(check.damaged)} "
            f"damaged files (e.g. {check.damaged[0]}); served through FUSE until "
            f"`s3cachefs verify {name}` repairs them"
        )

    def describe(self, manifest_id: str, bound: bool) -> dict[str, Any]:
        check = self.results.get(manifest_id)
        return {
            "kernel_check": check.describe() if check else None,
            "kernel_check_next": self.next_at if bound else None,
        }

    def summary(self) -> str:
        """For systemd's STATUS= line: what the kernel serves, and whether its checks passed."""
        kernel = self.kernel
        failed = [i for i, r in self.results.items() if not r.ok and i in kernel.pins.manifests]
        if failed:
            return f"kernel check FAILED for {len(failed)} datasets (served through FUSE)"
        if not kernel.binds:
            return ""
        done = [r.finished for i, r in self.results.items() if i in kernel.binds]
        if not done:
            return f"{len(kernel.binds)} kernel-served"
        return f"{len(kernel.binds)} kernel-served, last checks OK (oldest {_when(min(done))})"


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")

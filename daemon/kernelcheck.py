"""When the files of kernel-served datasets are checked, what a check found, and what follows.

Between checks the kernel serves a bound tree's bytes unchecked (the FUSE path
checks every block it serves). So every block of every file is read back
against its CRC32 (`daemon.treecheck`, low priority) before a tree is bound at
start, and every ``--verify-interval`` while it is bound. A file that fails
unbinds the dataset and drops its bad blocks: the FUSE path serves it (and
fetches those blocks again) until `verify` has repaired it, which binds it
again. The results go to `status`, the metrics (`Metrics` reads ``results``
and ``counts`` from its own thread: a result is immutable and replaced whole)
and, through ``on_change``, systemd's STATUS= line.

`KernelChecks` belongs to a `KernelServe` and acts on its binds under its lock.
"""

from __future__ import annotations

import collections
import datetime
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from s3cachefs.daemon.blockcache import ObjectVersion
from s3cachefs.daemon.pins import Manifest
from s3cachefs.daemon.treecheck import CheckResult, FileCheck, check_files, scan

if TYPE_CHECKING:
    from s3cachefs.daemon.kernelserve import Bind, KernelServe, Layout

log = logging.getLogger(__name__)


class KernelChecks:
    def __init__(self, kernel: KernelServe, interval: float | None) -> None:
        self.kernel = kernel
        self.interval = interval
        self.results: dict[str, CheckResult] = {}  # manifest id -> its last check
        self.counts: collections.Counter[str] = collections.Counter()  # by result
        self.next_at: float | None = None
        self.on_change: Callable[[], None] | None = None  # a check ended: systemd's STATUS=

    async def run_schedule(self) -> None:
        """Check the files of every bound dataset every ``interval`` seconds."""
        kernel = self.kernel
        if not kernel.enabled or self.interval is None:
            return
        while True:
            self.next_at = time.time() + self.interval
            await trio.sleep(self.interval)
            for manifest_id, bind in list(kernel.binds.items()):
                manifest = kernel.pins.manifests.get(manifest_id)
                if manifest is not None and kernel.binds.get(manifest_id) is bind:
                    await self.check(manifest, "scheduled", bind)

    async def check(
        self, manifest: Manifest, trigger: str, bind: Bind | None
    ) -> CheckResult | None:
        """Read back every file of a dataset (its tree when bound, else its cache files).

        The long read runs unlocked, on a snapshot; damage it finds is read
        again under the lock with what is current (a `verify` or a swap may
        have replaced the file meanwhile) before the dataset is unbound.
        None if the dataset changed under the check.
        """
        kernel = self.kernel
        layout = kernel.layout(manifest)
        if layout is None:
            return None
        files = self._files(manifest, layout, bind)
        damaged = await check_files(files, kernel.cache.block_size, idle=trigger != "start")
        async with kernel.lock:
            if kernel.pins.manifests.get(manifest.id) is not manifest or (
                bind is not None and kernel.binds.get(manifest.id) is not bind
            ):
                return None
            if damaged:
                layout = kernel.layout(manifest)
                if layout is None:  # blocks dropped meanwhile (`verify`): not this check's to say
                    return None
                again = [f for f in self._files(manifest, layout, bind) if f.key in damaged]
                block_size = kernel.cache.block_size
                damaged = await trio.to_thread.run_sync(lambda: scan(again, block_size))
            total = sum(f.size for f in files)
            result = self.record(manifest, trigger, len(files), total, damaged)
            if damaged:
                await self._damage_found(manifest, damaged, bind)
        return result

    def _files(self, manifest: Manifest, layout: Layout, bind: Bind | None) -> list[FileCheck]:
        """What to read for a check: each non-empty file the tree has. Must not await."""
        out = []
        for entry in layout.entries:
            if entry.source is None:
                continue
            key = manifest.prefix + entry.rel
            info = manifest.objects[key]
            version = ObjectVersion(manifest.bucket, key, info.etag, info.size)
            path = bind.tree / entry.rel if bind is not None else entry.source
            out.append(FileCheck(key, path, info.size, self.kernel.cache.block_crcs(version)))
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

    async def _damage_found(
        self, manifest: Manifest, damaged: list[str], bind: Bind | None
    ) -> None:
        """Stop the kernel serving the dataset; drop the bad blocks so the FUSE path fetches
        them again. Under the lock."""
        kernel = self.kernel
        if bind is not None:
            await kernel.unbind(bind, f"{len(damaged)} files failed the check")
        for key in damaged:
            info = manifest.objects[key]
            version = ObjectVersion(manifest.bucket, key, info.etag, info.size)
            await kernel.cache.verify_object(version, manifest.check(key))
        kernel.notes[manifest.id] = self.damage_note(manifest) or ""

    def forget(self, manifest_id: str) -> None:
        self.results.pop(manifest_id, None)

    # ---- what they say -------------------------------------------------------------

    def damage_note(self, manifest: Manifest) -> str | None:
        """Why a dataset whose files failed a check stays on FUSE until `verify`. Must not await."""
        check = self.results.get(manifest.id)
        if check is None or check.ok:
            return None
        name = manifest.prefix[len(self.kernel.mount_prefix) :].rstrip("/")
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

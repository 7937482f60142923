"""Sealing kernel-served trees after their mount: ``syncfs``, then their ``.synced`` record.

A tree is mounted before its flush (a prefetch's reply does not wait for the
gigabytes it wrote to reach the disk); until sealed it is current for this
daemon only (`kerneltrees.current`'s ``unsealed``), and built again at start.
A failed ``syncfs`` means what the trees link may not be on disk: each tree of
that batch is unbound, the FUSE view (CRC-checked) serves, and its files are
read back before it is bound again. A record that cannot be written is tried
again later.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import trio

from s3cachefs.datasets import kerneltrees
from s3cachefs.datasets.kerneltrees import Bind

log = logging.getLogger(__name__)

SEAL_RETRY = 30.0  # seconds before a tree whose record was not written is sealed again


class Sealed(Protocol):
    """What the seals use of the `DatasetMounts` they belong to."""

    trees: Path
    lock: trio.Lock  # held while binds change
    binds: dict[str, Bind]
    notes: dict[str, str]
    checked: set[str]

    async def unbind(self, bind: Bind, why: str) -> None: ...


class Unsealed:
    """A promoted tree's record until it is sealed; compared by identity (a tree promoted
    again while its sync ran is not sealed by that sync)."""

    def __init__(self, record: kerneltrees.Synced) -> None:
        self.record = record


class Seals:
    """The trees built and promoted, not yet synced and sealed."""

    def __init__(self, kernel: Sealed) -> None:
        self.kernel = kernel
        self.unsealed: dict[Path, Unsealed] = {}
        self.retry = SEAL_RETRY
        self._wanted = trio.Event()

    def record(self, tree: Path) -> kerneltrees.Synced | None:
        """The record of ``tree`` if it is promoted and not sealed yet."""
        entry = self.unsealed.get(tree)
        return None if entry is None else entry.record

    def add(self, tree: Path, record: kerneltrees.Synced) -> None:
        self.unsealed[tree] = Unsealed(record)
        self._wanted.set()

    def forget(self, tree: Path) -> None:
        self.unsealed.pop(tree, None)

    async def run(self) -> None:
        """For the daemon's life: seal the trees promoted since the last pass."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            if not await self.now():  # a record not written: tried again later
                await trio.sleep(self.retry)
                self._wanted.set()

    async def now(self) -> bool:
        """Sync the trees' file system, then record each tree promoted before the sync and
        not replaced or removed since. One that stays unsealed is built again at start.
        False if a record could not be written (that tree stays unsealed, to seal again)."""
        pending = dict(self.unsealed)
        if not pending:
            return True
        kernel = self.kernel
        try:  # abandoned when cancelled (stop's budget): the trees stay unsealed
            await trio.to_thread.run_sync(kerneltrees.sync, kernel.trees, abandon_on_cancel=True)
        except OSError as exc:
            await self._sync_failed(pending, exc)
            return True
        sealed = True
        async with kernel.lock:
            for tree, entry in pending.items():
                if self.unsealed.get(tree) is not entry:
                    continue
                try:
                    await trio.to_thread.run_sync(kerneltrees.seal, tree, entry.record)
                except OSError as exc:
                    log.warning("kernel-serve tree %s: record not written: %s", tree, exc)
                    sealed = False
                else:
                    del self.unsealed[tree]
        return sealed

    async def _sync_failed(self, pending: dict[Path, Unsealed], exc: OSError) -> None:
        """Each tree of the batch still mounted is unbound, as a failed mount leaves it."""
        kernel = self.kernel
        log.warning("kernel-serve: syncfs of %s failed: %s", kernel.trees, exc)
        async with kernel.lock:
            for tree, entry in pending.items():
                if self.unsealed.get(tree) is not entry:
                    continue
                bind = next((b for b in kernel.binds.values() if b.tree == tree), None)
                if bind is None:  # not mounted (stop): left unsealed, built again at start
                    del self.unsealed[tree]
                    continue
                await kernel.unbind(bind, f"syncfs failed: {exc}")  # forgets the tree
                for member in bind.ids:  # read back before it is bound again
                    kernel.checked.discard(member)
                    kernel.notes[member] = f"mount failed: syncfs of its tree failed: {exc}"

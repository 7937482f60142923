"""Which files `datasets.readserve` may link, and which linked ones still may stay.

Linked files are held against eviction, at most ``HOLD_FRACTION`` of what
the cache can hold (`within`: the oldest leave first).

A file is linked only when every block is on disk and reads back against its
CRC32 (`datasets.treecheck`); every ``--verify-interval`` each linked file is
read back again, from its cache file (the same inode, held: a swap meanwhile
may remove the layer it is in). What fails goes back to the FUSE path, which
checks every block it serves and fetches again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.pins import PinStore
from s3cachefs.datasets.treecheck import FileCheck, check_files

log = logging.getLogger(__name__)

TRIES = 3  # swaps a file waits for its last blocks to be on disk
HOLD_FRACTION = 0.5  # of what the cache can hold (`hold_cap`) that linked objects may hold


@dataclass
class Linked:
    version: ObjectVersion
    mtime_ns: int
    layer: Path | None = None  # the tree it is linked in; None while waiting
    at: float = field(default_factory=time.monotonic)
    tries: int = 0  # swaps it waited for its last blocks to be written


def _check(cache: BlockCache, rel: str, version: ObjectVersion) -> FileCheck:
    path = cache.object_path(version.oid)
    return FileCheck(rel, path, version.size, cache.block_crcs(version))


async def verified(
    cache: BlockCache,
    pins: PinStore,
    waiting: dict[str, Linked],
    again: dict[str, Linked],
    owner: str,
) -> dict[str, Linked]:
    """Those of ``waiting`` complete in the cache whose every block reads back against its
    CRC32; held (under ``owner``) first, so no eviction takes a block meanwhile. One
    whose last blocks are not on disk yet goes back into ``again`` (``TRIES`` swaps)."""
    checks, keep = [], {}
    for rel, linked in waiting.items():
        version = linked.version
        pins.hold(owner, version.oid)
        if cache.missing_blocks(version):  # blocks still being written, or evicted
            linked.tries += 1
            if linked.tries < TRIES and rel not in again:
                again[rel] = linked
            continue
        checks.append(_check(cache, rel, version))
        keep[rel] = linked
    try:
        damaged = await check_files(checks, cache.block_size, idle=False) if checks else []
    except trio.Cancelled:  # by stop()
        pins.release(owner)
        raise
    for rel in damaged:  # the FUSE path checks every block it serves: it fetches again
        log.warning("read-serve: key=%s failed its check; served through FUSE", rel)
        keep.pop(rel, None)
    return keep


def hold_cap(cache: BlockCache) -> float:
    """``HOLD_FRACTION`` of what the cache can hold: ``--cache-size``, or less where
    ``--min-free`` leaves the disk less room. Blocking (a statvfs)."""
    disk = cache.used_bytes + cache.bounds.disk_free() - cache.bounds.min_free
    return HOLD_FRACTION * max(0, min(cache.bounds.cache_size, disk))


def within(
    cap: float, served: dict[str, Linked], leaving: set[str], fresh: dict[str, Linked]
) -> None:
    """Add to ``leaving`` the oldest served, then drop from ``fresh``, until what stays
    holds at most ``cap`` bytes (more than the cap read at once: the rest stays on FUSE)."""
    held = sum(v.version.size for r, v in served.items() if r not in leaving)
    held += sum(v.version.size for v in fresh.values())
    for rel, linked in sorted(served.items(), key=lambda item: item[1].at):
        if held <= cap:
            break
        if rel not in leaving:
            leaving.add(rel)
            held -= linked.version.size
    while held > cap and fresh:
        held -= fresh.popitem()[1].version.size


async def damaged(cache: BlockCache, served: dict[str, Linked]) -> list[str]:
    """The files linked in ``served`` (as it is now) that fail their scheduled check and
    are still served as they were checked (a swap meanwhile may have replaced one)."""
    checked = {r: v for r, v in served.items() if v.layer is not None}
    checks = [_check(cache, rel, v.version) for rel, v in checked.items()]
    failed = await check_files(checks, cache.block_size, idle=True)
    return [r for r in failed if served.get(r) is checked[r]]

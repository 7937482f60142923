"""A cached object's bytes taken in as another version's: a verified copy inside the cache.

Versioned datasets share most of their content under other keys (v3 to v4 with
a few files changed). When the same content is cached whole under another key
(`datasets.contentindex` finds it by digest and size), `copy_verified` makes the
new version's file from it, with no GET:

- **A copy, never a hard link.** Two keys on one inode would share their blocks:
  evicting one key's block (a hole punched) would take it from the other, and a
  kernel-served tree, which sets each linked file's mtime to its own key's
  (`datasets.binds`), would change the other's. So each version keeps its own
  file, the cheapest way the filesystem offers (`cache.copies.WAYS`, in order):
  a reflink (``FICLONE``: shared extents, copy on write, no more disk, where
  btrfs, XFS or bcachefs offer it), ``copy_file_range`` (the bytes stay in the
  kernel; some filesystems share extents or copy server-side), else read and
  write. Copies run under a limiter of their own (`cache.copies`), so large
  ones never hold the disk slots foreground reads wait for.
- **Single flight.** Every block of the new version is claimed (a flight, as a
  bulk job's) before anything awaits: a reader waits for the copy, no fetch
  starts one of them; the claims end once the copy is kept or given up (a
  reader then fetches). A block already cached or in flight: no copy.
- **Verified as it is taken.** The copy is read back block by block before it is
  kept: every block must match the CRC32 recorded for the source's block, and
  the CRCs of the bytes written become the new version's. A block that does not
  match is a miss: nothing is kept, the source is checked again (a bad block of
  it is dropped, as any read of it would), and the caller downloads the object.
- **Kept whole or not at all.** Its room is reserved before a byte is written
  (given back if it is not kept). The copy is a temporary file beside the
  object's place (a crash leaves a stray that the next start sweeps,
  `cache.index`), taken in by `Integrity.adopt` as a finished upload is: moved
  into place, every row in one transaction. Any error on the way is one
  warning, everything given back, and the caller downloads the object.
"""

from __future__ import annotations

import logging

import trio

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.flights import Flight
from s3cachefs.store.checksums import Check

log = logging.getLogger(__name__)


async def copy_verified(cache: BlockCache, source: ObjectVersion, target: ObjectVersion) -> bool:
    """Make ``target``'s file a verified copy of cached ``source`` (the same content).

    True once ``target`` is cached whole from it; False if it is not (something of it
    cached or in flight, no room, a source block that failed its CRC): the caller
    downloads it.
    """
    same = source.size == target.size > 0 and source.oid != target.oid
    # Not if something of it is cached or on its way already (a reader was first), or
    # the source is not whole.
    keys = [(target.oid, idx) for idx in range(-(-target.size // cache.block_size))]
    if (
        not same
        or target.oid in cache.ledger
        or any(key in cache.flights for key in keys)
        or cache.missing_blocks(source)
    ):
        return False
    # Single flight: every block of the target is claimed before the first await, so a
    # reader waits for the copy and no fetch (or bulk job) starts one of them; ended
    # once the copy is adopted, or given up (a reader then fetches it).
    flights = [cache.flights.start(key, Flight(remember=False)) for key in keys]
    try:
        return await _copy_claimed(cache, source, target)
    except Exception as exc:  # noqa: BLE001  any disk or index error: S3 has the bytes
        cache.stats.counts["disk_errors"] += 1
        log.warning(
            "cache copy of key=%s for key=%s failed (%s); downloaded instead",
            source.key,
            target.key,
            exc.strerror if isinstance(exc, OSError) else str(exc) or repr(exc),
        )
        return False
    finally:
        for key, flight in zip(keys, flights, strict=True):
            flight.finish(None)  # no data: a waiting reader looks again (disk, or a GET)
            cache.flights.end(key)


async def _copy_claimed(cache: BlockCache, source: ObjectVersion, target: ObjectVersion) -> bool:
    crcs = cache.block_crcs(source)
    # Room before a byte is written (a reflink takes none, but the books count it):
    # given back if the copy is not kept.
    if not await cache.integrity.reserve_whole(target):
        return False
    try:
        made = await trio.to_thread.run_sync(
            cache.integrity.copies.copy_and_check,
            cache.object_path(source.oid),
            cache.object_path(target.oid),
            crcs,
            cache.block_size,
            target.size,
            limiter=cache.integrity.copies.limiter,  # not the reads' disk limiter
        )
    except BaseException:  # the source gone (freed meanwhile), a full disk: logged above
        cache.ledger.unreserve(target.size)
        raise
    if isinstance(made, int):
        cache.ledger.unreserve(target.size)
        log.warning(
            "cache copy of key=%s block=%d failed its CRC; key=%s is downloaded instead",
            source.key,
            made,
            target.key,
        )
        # The source's bad blocks are dropped (CRCs only: a "size" check reads no digest).
        await cache.verify_object(source, Check("size"))
        return False
    path, how = made
    # Cached meanwhile another way (an upload's adopt; the flights keep fetches out):
    # `adopt` drops the copy and says whether the object is whole, but it is no reuse.
    mine = target.oid not in cache.ledger
    with trio.CancelScope(shield=True):  # placed and indexed whole, or not at all
        if not await cache.integrity.adopt(target, path, crcs, reserved=True) or not mine:
            return False
    counts = cache.stats.counts
    counts["reused_objects"] += 1
    counts["reused_bytes"] += target.size
    counts[f"reused_by_{how.replace('-', '_')}"] += 1
    return True

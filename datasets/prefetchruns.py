"""One prefetch run onto disk: by a bulk worker process (`cache.bulk`), else in the daemon.

A run that is a whole object goes to a worker with the check S3 offers for it
(`datasets.objectcheck`); the worker computes the digest from the bytes it
writes, so a match is the object's end-to-end check and the object is pinned
without reading it back (one MD5 and one CRC pass per byte, not two). Anything
else (part of a large object, no match, workers off or lost) is checked from
disk as before, once the object is complete.
"""

from __future__ import annotations

from s3cachefs.base.errors import TransientError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.datasets.objectcheck import ObjectCheck
from s3cachefs.store import checksums
from s3cachefs.store.checksums import Check
from s3cachefs.store.types import ObjectInfo


async def download_run(
    cache: BlockCache,
    objects: ObjectCheck,
    info: ObjectInfo,
    run: range,
    runs_left: int,
    *,
    asked: Check | None = None,
) -> tuple[int, Check | None]:
    """Fetch ``run`` of ``info`` onto disk: (bytes fetched, the check its digest passed).

    ``runs_left``: the object's runs still to fetch, this one included. ``asked``:
    ``objects.first_check(info)`` if it was asked already. Raises StoreError (S3
    refused it).
    """
    version = ObjectVersion(cache.store.bucket, info.key, info.etag, info.size)
    whole = runs_left == 1 and run.start == 0 and run.stop * cache.block_size >= info.size
    check = (asked or await objects.first_check(info)) if whole else None
    try:
        done = await cache.bulk.fetch(version, run, check)
    except TransientError:
        # The worker's attempts ran out on throttling, 5xx or a cut body: the run gets the
        # in-daemon path's own attempts, as a dead worker's run does (before the bulk
        # engine, a prefetch through such a flaky S3 completed).
        done = None
    if done is not None:
        proven = checksums.resolved(check, done.digest) if check and done.matches else None
        return done.end - done.start, proven
    cache.start_fetch(version, run, persist=True)  # the in-daemon path
    fetched = 0
    for idx in run:
        fetched += len(await cache.get_block(version, idx))
    return fetched, None

"""Starting while S3 is unreachable: serve what is pinned, reach S3 again once it answers.

A node that reboots during an S3 outage must still serve the datasets it
prefetched: they are complete in the cache, and their manifests answer every
lookup and listing. So an *unreachable* S3 at start (network errors, 5xx,
throttling after retries) is one WARNING, not a refusal, when the cache holds
a complete pinned dataset under this mount; with nothing to serve the mount
is still refused (systemd restarts it until S3 answers). A bucket that does
not exist, or credentials S3 refuses, are refused at start either way: those
are not outages, and one clear line then is what the user needs.

Once started, the start-up check of the bucket is retried in the background
(it also sets up the lean GET path, `S3Store.check_bucket`); meanwhile
everything outside the pinned datasets fails with EIO in bounded time, as with
any S3 outage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from s3cachefs.base.errors import StoreError, TransientError
from s3cachefs.datasets.pins import Manifest, PinStore
from s3cachefs.store.types import ObjectStore

log = logging.getLogger(__name__)

# Retries of the bucket check: first after this many seconds, doubling up to the cap.
FIRST_RETRY = 2.0
MAX_RETRY = 60.0


@dataclass
class S3State:
    """Whether the daemon has reached S3 since it started (`status`, systemd's STATUS=)."""

    unreachable_since: float | None = None
    reason: str = ""

    def describe(self) -> dict[str, object]:
        return {
            "reachable": self.unreachable_since is None,
            "unreachable_since": self.unreachable_since,
            "reason": self.reason or None,
        }


def servable(pins: PinStore, bucket: str, mount_prefix: str) -> list[Manifest]:
    """Pinned datasets that serve reads and listings with no S3 request (complete, whole)."""
    return [
        m
        for m in pins.manifests.values()
        if m.complete
        and m.shard is None
        and m.bucket == bucket
        and m.prefix.startswith(mount_prefix)
    ]


async def reconnect(store: ObjectStore, state: S3State, limiter: trio.CapacityLimiter) -> None:
    """Retry the bucket check until S3 answers; then the daemon is as if started online."""
    delay = FIRST_RETRY
    while state.unreachable_since is not None:
        await trio.sleep(delay)
        try:
            await trio.to_thread.run_sync(store.check_bucket, limiter=limiter)
        except TransientError as exc:
            state.reason = str(exc)
            delay = min(MAX_RETRY, delay * 2)
            continue
        except StoreError as exc:  # it answers, but refuses: reads will say so too
            log.error("S3 answers again but refuses the bucket: %s", exc)
            state.reason = str(exc)
            return
        log.info(
            "S3 reachable again after %.0fs; serving everything",
            time.time() - state.unreachable_since,
        )
        state.unreachable_since = None
        state.reason = ""

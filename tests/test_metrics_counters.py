"""Every cache counter a status shows is exported as a Prometheus counter too."""

from __future__ import annotations

from s3cachefs.daemon.metrics import Snapshot, _daemon_metrics


def _snapshot(counts: dict[str, int]) -> Snapshot:
    return Snapshot(
        cache_counts=counts,
        used_bytes=0,
        limit_bytes=0,
        pinned_bytes=0,
        in_flight=0,
        s3_requests={},
        fuse_counts={},
        jobs=[],
        datasets=[],
        writes={},
        staged=0,
        kernel=[],
        kernel_checks={},
    )


def test_blocks_served_uncached_for_a_pending_delete_are_exported() -> None:
    """`store_skipped_deleting` (cache.fetcher: a read's block not kept while a delete of
    it is pending) was counted in status only."""
    samples = {
        s.name: s.value
        for family in _daemon_metrics(_snapshot({"store_skipped_deleting": 3, "evictions": 2}))
        for s in family.samples
    }
    assert samples["s3cachefs_cache_store_skipped_deleting_total"] == 3
    assert samples["s3cachefs_cache_evictions_total"] == 2

"""Prometheus metrics at ``--metrics-address HOST:PORT`` (``/metrics``), off by default.

Counters the daemon keeps anyway (cache, FUSE, S3 requests) are read at
scrape time by a collector, so the read path pays nothing for metrics; only
S3 latency is observed per request, into a histogram. The collector runs in
the HTTP server's thread: it asks the trio thread for a snapshot
(``trio.from_thread``) and never iterates the daemon's structures itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import trio
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from s3cachefs.base.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Metric

    from s3cachefs.daemon.commands import Daemon

log = logging.getLogger(__name__)


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad metrics address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9108")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class Snapshot:
    """The daemon's numbers, copied on the trio thread: the HTTP thread reads only this."""

    cache_counts: dict[str, int]
    used_bytes: int
    limit_bytes: int
    pinned_bytes: int
    in_flight: int
    s3_requests: dict[str, int]
    fuse_counts: dict[str, int]
    jobs: list[tuple[str, int, int, int, int]]  # dataset, files done/total, bytes done/total
    datasets: list[tuple[str, bool]]  # pinned dataset, complete
    writes: dict[str, int]
    staged: int
    # kernel-served datasets: name, bound, last check's end (or None), files it found damaged
    kernel: list[tuple[str, bool, float | None, int]]
    kernel_checks: dict[str, int]  # checks by result (intact, damaged)


def take_snapshot(d: Daemon) -> Snapshot:
    """Copy what a scrape shows. Runs on the trio thread, which alone changes these
    structures (sets, dicts of blocks, staged files): iterating them from the HTTP
    thread raised "changed size during iteration" under load. Must not await."""
    cache = d.cache
    jobs = []
    for job in d.jobs.values():
        p = job.progress
        name = d.dataset_name(job.prefix)
        jobs.append((name, p.files_done, p.files_total, p.bytes_done, p.bytes_total))
    return Snapshot(
        cache_counts=dict(cache.stats.counts),
        used_bytes=cache.used_bytes,
        limit_bytes=cache.cache_size,
        pinned_bytes=cache.pinned_bytes,
        in_flight=cache.in_flight,
        s3_requests=d.store.request_counts(),
        fuse_counts=dict(d.ops.counts),
        jobs=jobs,
        datasets=[(d.dataset_name(m.prefix), m.complete) for m in d.pins.manifests.values()],
        writes=dict(d.writeback.stats),
        staged=len(d.writeback.left()),
        kernel=_kernel_rows(d),
        kernel_checks=dict(d.kernel.checks.counts) if d.kernel is not None else {},
    )


def _kernel_rows(d: Daemon) -> list[tuple[str, bool, float | None, int]]:
    if d.kernel is None:
        return []
    rows = []
    for manifest in d.pins.manifests.values():
        check = d.kernel.checks.results.get(manifest.id)
        rows.append(
            (
                d.dataset_name(manifest.prefix),
                manifest.id in d.kernel.binds,
                check.finished if check is not None else None,
                len(check.damaged) if check is not None else 0,
            )
        )
    return rows


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.process = psutil.Process()
        self.trio_token: trio.lowlevel.TrioToken | None = None  # set once trio runs

    def snapshot(self) -> Snapshot | None:
        """A snapshot taken on the trio thread; None before it runs or once it ended."""
        if self.trio_token is None:
            return None
        try:
            return trio.from_thread.run_sync(take_snapshot, self.daemon, trio_token=self.trio_token)
        except trio.RunFinishedError:
            return None

    def collect(self) -> Iterator[Metric]:
        # The process and the disk are asked directly: no daemon structure is touched.
        for name, value, doc in (
            (
                "s3cachefs_disk_free_bytes",
                psutil.disk_usage(str(self.daemon.cache.cache_dir)).free,
                "Free space on the cache dir's filesystem",
            ),
            (
                "s3cachefs_process_resident_memory_bytes",
                self.process.memory_info().rss,
                "Daemon RSS",
            ),
            (
                "s3cachefs_process_cpu_seconds",
                sum(self.process.cpu_times()[:2]),
                "Daemon CPU time (user + system)",
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        snap = self.snapshot()
        if snap is not None:
            yield from _daemon_metrics(snap)


def _daemon_metrics(snap: Snapshot) -> Iterator[Metric]:
    counts = snap.cache_counts
    hits = CounterMetricFamily(
        "s3cachefs_cache_hits", "Block reads served from the cache", labels=["tier"]
    )
    hits.add_metric(["memory"], counts.get("hits_memory", 0))
    hits.add_metric(["disk"], counts.get("hits_disk", 0))
    yield hits
    for name, key, doc in (
        ("s3cachefs_cache_misses", "misses", "Block reads that waited for S3"),
        (
            "s3cachefs_cache_blocks_from_s3",
            "blocks_from_s3",
            "Blocks fetched from S3 (reads, readahead, prefetch)",
        ),
        ("s3cachefs_cache_bytes_from_s3", "bytes_from_s3", "Bytes fetched from S3"),
        ("s3cachefs_cache_evictions", "evictions", "Blocks evicted"),
        (
            "s3cachefs_cache_passthrough_opens",
            "passthrough_opens",
            "Opens of complete cached files the kernel reads itself (their reads: no hits)",
        ),
        (
            "s3cachefs_cache_passthrough_bytes_opened",
            "passthrough_bytes_opened",
            "File sizes of the opens passed through",
        ),
        ("s3cachefs_cache_corrupt_blocks", "corrupt_blocks", "Blocks that failed their CRC"),
        ("s3cachefs_cache_disk_errors", "disk_errors", "Failed cache writes"),
        (
            "s3cachefs_cache_store_skipped_deleting",
            "store_skipped_deleting",
            "Blocks read served uncached: a delete of them was pending",
        ),
    ):
        yield CounterMetricFamily(name, doc, value=counts.get(key, 0))
    for name, value, doc in (
        ("s3cachefs_cache_used_bytes", snap.used_bytes, "Bytes in the cache"),
        ("s3cachefs_cache_limit_bytes", snap.limit_bytes, "--cache-size"),
        ("s3cachefs_cache_pinned_bytes", snap.pinned_bytes, "Bytes of pinned datasets"),
        ("s3cachefs_cache_in_flight_blocks", snap.in_flight, "Blocks being fetched"),
    ):
        yield GaugeMetricFamily(name, doc, value=value)
    requests = CounterMetricFamily(
        "s3cachefs_s3_requests", "S3 requests sent", labels=["operation"]
    )
    for op, n in sorted(snap.s3_requests.items()):
        requests.add_metric([op], n)
    yield requests
    fuse = CounterMetricFamily(
        "s3cachefs_fuse_requests", "FUSE requests served", labels=["operation"]
    )
    for op, n in sorted(snap.fuse_counts.items()):
        if op not in ("read_bytes_asked", "write_bytes"):
            fuse.add_metric([op], n)
    yield fuse
    files = GaugeMetricFamily(
        "s3cachefs_prefetch_files", "Prefetch progress in objects", labels=["dataset", "state"]
    )
    nbytes = GaugeMetricFamily(
        "s3cachefs_prefetch_bytes", "Prefetch progress in bytes", labels=["dataset", "state"]
    )
    for name, files_done, files_total, bytes_done, bytes_total in snap.jobs:
        files.add_metric([name, "done"], files_done)
        files.add_metric([name, "total"], files_total)
        nbytes.add_metric([name, "done"], bytes_done)
        nbytes.add_metric([name, "total"], bytes_total)
    yield files
    yield nbytes
    pinned = GaugeMetricFamily(
        "s3cachefs_dataset_complete", "1 if the pinned dataset is complete", labels=["dataset"]
    )
    for name, complete in snap.datasets:
        pinned.add_metric([name], 1.0 if complete else 0)
    yield pinned
    for name, key, doc in (
        ("s3cachefs_uploads", "uploads", "Files uploaded by close/fsync"),
        ("s3cachefs_upload_bytes", "upload_bytes", "Bytes uploaded by close/fsync"),
        ("s3cachefs_upload_failures", "upload_failures", "Uploads that failed (EIO)"),
    ):
        yield CounterMetricFamily(name, doc, value=snap.writes.get(key, 0))
    yield GaugeMetricFamily(
        "s3cachefs_staged_not_uploaded",
        "Written files whose upload never completed (s3cachefs staged)",
        value=snap.staged,
    )
    yield from _kernel_metrics(snap)


def _kernel_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Kernel-served datasets and the checks of their files."""
    served = GaugeMetricFamily(
        "s3cachefs_dataset_kernel_served", "1 if the kernel serves the dataset", labels=["dataset"]
    )
    last = GaugeMetricFamily(
        "s3cachefs_kernel_check_timestamp_seconds",
        "When the last check of a dataset's kernel-served files ended",
        labels=["dataset"],
    )
    damaged = GaugeMetricFamily(
        "s3cachefs_kernel_check_damaged_files",
        "Files the last check found damaged (the dataset is then served through FUSE)",
        labels=["dataset"],
    )
    for name, bound, finished, bad in snap.kernel:
        served.add_metric([name], 1.0 if bound else 0.0)
        if finished is not None:
            last.add_metric([name], finished)
            damaged.add_metric([name], bad)
    yield served
    yield last
    yield damaged
    runs = CounterMetricFamily(
        "s3cachefs_kernel_checks", "Checks of kernel-served datasets, by result", labels=["result"]
    )
    for result in ("intact", "damaged"):
        runs.add_metric([result], snap.kernel_checks.get(result, 0))
    yield runs


class Metrics:
    """The registry, the S3 latency histogram and the HTTP server."""

    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry()
        self.collector = DaemonCollector(daemon)
        self.registry.register(self.collector)
        self.s3_latency = Histogram(
            "s3cachefs_s3_request_seconds",
            "S3 request latency (to response headers)",
            ["operation", "outcome"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def attach(self) -> None:
        """Call on the trio thread once it runs: scrapes then take their snapshot there."""
        self.collector.trio_token = trio.lowlevel.current_trio_token()

    def observe_s3(self, operation: str, outcome: str, seconds: float) -> None:
        self.s3_latency.labels(operation, outcome).observe(seconds)

    def serve(self, address: str) -> None:
        host, port = parse_address(address)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror}") from None
        log.info("metrics address=%s:%d", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

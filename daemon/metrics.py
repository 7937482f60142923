"""Prometheus metrics at ``--metrics-address HOST:PORT`` (``/metrics``), off by default.

Counters the daemon keeps anyway (cache, FUSE, S3 requests) are read at
scrape time by a collector, so the read path pays nothing for metrics; only
S3 latency is observed per request, into a histogram.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from s3cachefs.daemon.errors import ConfigError

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


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.process = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        cache = d.cache
        # dict() copies in one step under the GIL: the trio thread may be counting.
        counts = dict(cache.stats.counts)
        hits = CounterMetricFamily(
            "s3cachefs_cache_hits", "Block reads served from the cache", labels=["tier"]
        )
        hits.add_metric(["memory"], counts.get("hits_memory", 0))
        hits.add_metric(["disk"], counts.get("hits_disk", 0))
        yield hits
        for name, key, doc in (
            ("s3cachefs_cache_misses", "misses", "Blocks fetched from S3"),
            ("s3cachefs_cache_bytes_from_s3", "bytes_from_s3", "Bytes fetched from S3"),
            ("s3cachefs_cache_evictions", "evictions", "Blocks evicted"),
            ("s3cachefs_cache_corrupt_blocks", "corrupt_blocks", "Blocks that failed their CRC"),
            ("s3cachefs_cache_disk_errors", "disk_errors", "Failed cache writes"),
        ):
            yield CounterMetricFamily(name, doc, value=counts.get(key, 0))
        for name, value, doc in (
            ("s3cachefs_cache_used_bytes", cache.used_bytes, "Bytes in the cache"),
            ("s3cachefs_cache_limit_bytes", cache.cache_size, "--cache-size"),
            ("s3cachefs_cache_pinned_bytes", cache.pinned_bytes, "Bytes of pinned datasets"),
            ("s3cachefs_cache_in_flight_blocks", cache.in_flight, "Blocks being fetched"),
            (
                "s3cachefs_disk_free_bytes",
                psutil.disk_usage(str(cache.cache_dir)).free,
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
        requests = CounterMetricFamily(
            "s3cachefs_s3_requests", "S3 requests sent", labels=["operation"]
        )
        for op, n in sorted(dict(d.store.requests).items()):
            requests.add_metric([op], n)
        yield requests
        fuse = CounterMetricFamily(
            "s3cachefs_fuse_requests", "FUSE requests served", labels=["operation"]
        )
        for op, n in sorted(dict(d.ops.counts).items()):
            if op not in ("read_bytes_asked", "write_bytes"):
                fuse.add_metric([op], n)
        yield fuse
        files = GaugeMetricFamily(
            "s3cachefs_prefetch_files", "Prefetch progress in objects", labels=["dataset", "state"]
        )
        nbytes = GaugeMetricFamily(
            "s3cachefs_prefetch_bytes", "Prefetch progress in bytes", labels=["dataset", "state"]
        )
        for job in list(d.jobs.values()):
            name = d.dataset_name(job.prefix)
            p = job.progress
            files.add_metric([name, "done"], p.files_done)
            files.add_metric([name, "total"], p.files_total)
            nbytes.add_metric([name, "done"], p.bytes_done)
            nbytes.add_metric([name, "total"], p.bytes_total)
        yield files
        yield nbytes
        pinned = GaugeMetricFamily(
            "s3cachefs_dataset_complete", "1 if the pinned dataset is complete", labels=["dataset"]
        )
        for manifest in list(d.pins.manifests.values()):
            pinned.add_metric([d.dataset_name(manifest.prefix)], 1.0 if manifest.complete else 0)
        yield pinned
        yield from _kernel_metrics(d)
        writes = dict(d.writeback.stats)
        for name, key, doc in (
            ("s3cachefs_uploads", "uploads", "Files uploaded by close/fsync"),
            ("s3cachefs_upload_bytes", "upload_bytes", "Bytes uploaded by close/fsync"),
            ("s3cachefs_upload_failures", "upload_failures", "Uploads that failed (EIO)"),
        ):
            yield CounterMetricFamily(name, doc, value=writes.get(key, 0))
        yield GaugeMetricFamily(
            "s3cachefs_staged_not_uploaded",
            "Written files whose upload never completed (s3cachefs staged)",
            value=len(d.writeback.left()),
        )


def _kernel_metrics(d: Daemon) -> Iterator[Metric]:
    """Kernel-served datasets and the checks of their files (copies: the trio thread writes)."""
    kernel = d.kernel
    if kernel is None:
        return
    bound = set(kernel.binds)
    checks, counts = dict(kernel.checks.results), dict(kernel.checks.counts)
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
    for manifest in list(d.pins.manifests.values()):
        name = d.dataset_name(manifest.prefix)
        served.add_metric([name], 1.0 if manifest.id in bound else 0.0)
        if (check := checks.get(manifest.id)) is not None:
            last.add_metric([name], check.finished)
            damaged.add_metric([name], len(check.damaged))
    yield served
    yield last
    yield damaged
    runs = CounterMetricFamily(
        "s3cachefs_kernel_checks", "Checks of kernel-served datasets, by result", labels=["result"]
    )
    for result in ("intact", "damaged"):
        runs.add_metric([result], counts.get(result, 0))
    yield runs


class Metrics:
    """The registry, the S3 latency histogram and the HTTP server."""

    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(daemon))
        self.s3_latency = Histogram(
            "s3cachefs_s3_request_seconds",
            "S3 request latency (to response headers)",
            ["operation", "outcome"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

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

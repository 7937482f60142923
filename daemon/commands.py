"""What the control socket can ask of a running daemon: status, prefetch, verify, evict, staged."""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import trio

from s3cachefs.base.errors import ConfigError, S3CacheFSError, StoreError
from s3cachefs.base.values import parse_shard
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.integrity import held_bytes
from s3cachefs.daemon import memory, passthroughing
from s3cachefs.daemon.control import Handler, Send
from s3cachefs.datasets.pins import Manifest, PinStore, Shard
from s3cachefs.datasets.prefetch import SIZE_ONLY_SHOWN, PrefetchJob
from s3cachefs.datasets.prefetchprogress import reused_line
from s3cachefs.staging.writeback import Writeback
from s3cachefs.store.keys import valid_name
from s3cachefs.store.types import ObjectStore

if TYPE_CHECKING:
    from s3cachefs.base.config import MountConfig
    from s3cachefs.daemon.offline import S3State
    from s3cachefs.datasets.kernelserve import KernelServe
    from s3cachefs.fs.core import FsCore
    from s3cachefs.fs.operations import Operations

log = logging.getLogger(__name__)


class RecentErrors(logging.Handler):
    """The last warnings and errors, for `status` (no object data, no credentials are logged)."""

    def __init__(self, size: int = 20) -> None:
        super().__init__(logging.WARNING)
        self.lines: collections.deque[str] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        self.lines.append(f"{stamp} {record.levelname} {record.getMessage()}")


@dataclass
class Daemon:
    config: MountConfig
    store: ObjectStore
    cache: BlockCache
    pins: PinStore
    ops: Operations
    errors: RecentErrors
    writeback: Writeback
    core: FsCore  # the filesystem: told when pins or keys change behind its back
    jobs: dict[str, PrefetchJob] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    kernel: KernelServe | None = None  # binds of kernel-served pinned datasets
    s3_state: S3State | None = None  # set when the daemon started without reaching S3

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self.status,
            "prefetch": self.prefetch,
            "verify": self.verify,
            "evict": self.evict,
            "staged": self.staged,
            "unbind": self.unbind,
            "rebind": self.rebind,
            "sentry-test": self.sentry_test,
        }

    async def sentry_test(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        """Raise on purpose: the operator's check that unexpected errors reach Sentry."""
        raise RuntimeError("s3cachefs sentry test: this error was raised on purpose")

    def summary(self) -> str:
        """One line for systemd's STATUS=: cache use, pinned datasets, hit ratio."""
        counts = self.cache.stats.counts
        hits = counts["hits_memory"] + counts["hits_disk"]
        lookups = hits + counts["misses"]
        ratio = f"{hits / lookups:.0%}" if lookups else "n/a"
        complete = sum(1 for m in self.pins.manifests.values() if m.complete)
        running = f", {len(self.jobs)} prefetching" if self.jobs else ""
        left = len(self.writeback.left())
        running += f", {left} staged files NOT UPLOADED" if left else ""
        if self.kernel is not None and self.kernel.checks.summary():
            running += f", {self.kernel.checks.summary()}"
        if self.s3_state is not None and self.s3_state.unreachable_since is not None:
            running += ", S3 UNREACHABLE since start (serving pinned datasets)"
        used, limit = self.cache.used_bytes / 2**30, self.cache.cache_size / 2**30
        return (
            f"cache {used:.2f} of {limit:.0f} GiB, "
            f"{complete} pinned datasets complete{running}, hit ratio {ratio}"
        )

    def dataset_prefix(self, dataset: str) -> str:
        """The key prefix of a dataset named relative to the mount root; "." (or "") is the
        whole mount, which is a dataset when the mount is of a prefix."""
        parts = [p for p in dataset.strip("/").split("/") if p not in ("", ".")]
        if not all(valid_name(p) for p in parts):
            raise ConfigError(f"bad dataset {dataset!r}: give a prefix like dataset-v3")
        if not parts and not self.config.prefix:
            raise ConfigError(
                "the whole bucket is no dataset: give a prefix like dataset-v3"
                " (or mount BUCKET/PREFIX and prefetch the mount)"
            )
        return self.config.prefix + "".join(p + "/" for p in parts)

    def dataset_name(self, prefix: str) -> str:
        return prefix[len(self.config.prefix) :].rstrip("/") or "."

    async def status(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        cache, counts = self.cache, self.cache.stats.counts
        hits = counts["hits_memory"] + counts["hits_disk"]
        lookups = hits + counts["misses"]
        served = await self.kernel.describe() if self.kernel is not None else {}
        readserve = self.kernel.readserve if self.kernel is not None else None
        disk = psutil.disk_usage(str(cache.cache_dir))
        proc = psutil.Process()
        return {
            "event": "done",
            "mountpoint": str(self.config.mountpoint),
            "source": self.config.source,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started),
            "cache": {
                "dir": str(cache.cache_dir),
                "used_bytes": cache.used_bytes,
                "limit_bytes": cache.cache_size,
                "min_free_bytes": cache.min_free,
                "disk_free_bytes": disk.free,
                "pinned_bytes": cache.pinned_bytes,
                "held_bytes": cache.ledger.held_bytes,  # read by the kernel now (passthrough)
                "block_size": cache.block_size,
                "hit_ratio": round(hits / lookups, 4) if lookups else None,
                "hits": hits,
                "misses": counts["misses"],
                "passthrough_opens": counts["passthrough_opens"],  # reads not in hits
                "passthrough_bytes_opened": counts["passthrough_bytes_opened"],
                "bytes_from_s3": counts["bytes_from_s3"],
                "corrupt_blocks": counts["corrupt_blocks"],
                "reused_objects": counts["reused_objects"],  # copied from the same content
                "reused_bytes": counts["reused_bytes"],
                "reused": reused_line(counts["reused_objects"], counts["reused_bytes"]),
                "evictions": counts["evictions"],
                "in_flight_blocks": cache.in_flight,
            },
            "s3": self.s3_state.describe() if self.s3_state else {"reachable": True},
            "s3_requests": self.store.request_counts(),
            "fuse_requests": dict(self.ops.counts),
            "daemon": {
                "rss_bytes": proc.memory_info().rss,
                "cpu_seconds": sum(proc.cpu_times()[:2]),
                "metrics_address": self.config.metrics_address,
                "sentry": bool(os.environ.get("SENTRY_DSN")),
            },
            "datasets": [
                {**self._dataset_status(m), **served.get(m.id, {})}
                for m in self.pins.manifests.values()
            ],
            "read_serve": readserve.describe() if readserve is not None else None,
            "passthrough": passthroughing.describe(self.config, self.ops),
            "jobs": [
                {"dataset": self.dataset_name(j.prefix), **j.progress.event("progress")}
                for j in self.jobs.values()
            ],
            "writes": {
                "writable": self.config.writable,
                "allow_overwrite": self.config.allow_overwrite,
                "allow_delete": self.config.allow_delete,
                "uploads": self.writeback.stats["uploads"],
                "upload_bytes": self.writeback.stats["upload_bytes"],
                "upload_failures": self.writeback.stats["upload_failures"],
                "open_for_writing": sum(1 for x in self.writeback.staged.values() if x.handles),
            },
            "staged": [x.describe() for x in self.writeback.left()],
            "recent_errors": list(self.errors.lines),
        }

    def _dataset_status(self, manifest: Manifest) -> dict[str, Any]:
        versions = manifest.versions()
        cached = sum(
            v.size - len(self.cache.missing_blocks(v)) * self.cache.block_size for v in versions
        )
        total = manifest.total_bytes
        size_only = manifest.size_only()
        return {
            "dataset": self.dataset_name(manifest.prefix),
            "shard": manifest.shard,
            "objects": len(versions),
            "bytes": total,
            "cached_percent": round(100 * max(0, cached) / total, 2) if total else 100.0,
            "complete": manifest.complete,
            "verified_at": manifest.verified_at,
            # objects S3 gave nothing to verify end to end against (size and CRCs only)
            "size_only": len(size_only),
            "size_only_keys": size_only[:SIZE_ONLY_SHOWN],
        }

    async def prefetch(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        prefix = self.dataset_prefix(str(request["dataset"]))
        shard = Shard(*parse_shard(request["shard"])) if request.get("shard") else None
        job = PrefetchJob(
            self.store,
            self.cache,
            self.pins,
            prefix=prefix,
            shard=shard,
            jobs=int(request.get("jobs") or self.config.prefetch_jobs),
            dry_run=bool(request.get("dry_run")),
            require_checksums=bool(request.get("require_checksums")),
            etag_md5s=self.config.etag_md5s,
        )
        job_id = f"{prefix}#{shard}"
        if job_id in self.jobs:
            raise ConfigError(f"a prefetch of {self.dataset_name(prefix)} is already running")
        self.jobs[job_id] = job
        log.info("prefetch dataset=%s shard=%s jobs=%d started", prefix, shard, job.jobs)
        readserve = self.kernel.readserve if self.kernel is not None and not job.dry_run else None
        if self.kernel is not None and not job.dry_run and job.previous is None:
            job.on_pin = self.kernel.prestage(job.manifest)  # its tree, linked while it downloads
        try:
            if readserve is not None:  # the room its linked files hold is the prefetch's
                await readserve.step_aside()
            final = await job.run(send)
        finally:
            if readserve is not None:
                readserve.prefetch_done()
            del self.jobs[job_id]
            with trio.CancelScope(shield=True):
                try:
                    if not job.dry_run:
                        self.core.pins_changed()
                        if self.kernel is not None:  # bind, swap or unbind to match the manifest
                            if job.previous is None:  # every object was read back, verified
                                self.kernel.checked.add(job.manifest.id)
                            await self.kernel.refresh(job.manifest.id)
                finally:
                    if self.kernel is not None and job.on_pin is not None:  # used or not
                        await self.kernel.prestaged(job.manifest)
                    await trio.to_thread.run_sync(memory.trim)  # its buffers go back to the OS
        log.info(
            "prefetch dataset=%s files=%d/%d bytes_fetched=%d failed=%d size_only=%d complete=%s",
            prefix,
            final["files_done"],
            final["files_total"],
            final["bytes_fetched"],
            final["failed"],
            final["size_only"],
            final["complete"],
        )
        if request.get("list_keys"):
            final["keys"] = sorted(job.listed_keys)
        final["dataset"] = self.dataset_name(prefix)
        return final

    async def verify(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        """Re-check every file of a pinned dataset; re-fetch what fails; report repairs."""
        prefix = self.dataset_prefix(str(request.get("dataset", "")))
        manifests = [m for m in self.pins.manifests.values() if m.prefix == prefix]
        if not manifests:
            raise ConfigError(f"dataset {self.dataset_name(prefix)} is not pinned: prefetch it")
        repaired: list[str] = []
        failed: dict[str, str] = {}
        checked = 0
        total = sum(len(m.objects) for m in manifests)
        for manifest in manifests:
            fixed = []
            for version in manifest.versions():
                expected = manifest.check(version.key)  # what prefetch verified it by
                intact, _ = await self.cache.verify_object(version, expected)
                if not intact:
                    try:
                        if self.kernel is not None:  # kernel-served: repair into a new file
                            await self.kernel.repair(manifest, [version])
                        await self.cache.refetch(version)
                        intact, _ = await self.cache.verify_object(version, expected)
                    except StoreError as exc:
                        failed[version.key] = str(exc)
                    else:
                        if intact:
                            repaired.append(version.key)
                            fixed.append(version)
                        else:
                            failed[version.key] = "still corrupt after re-fetching"
                checked += 1
                if checked % 100 == 0:
                    await send({"event": "progress", "files_done": checked, "files_total": total})
            if self.kernel is not None:  # repaired files into the tree, or unbind
                await self.kernel.relink(manifest, fixed, ok=not failed)
            if not failed:
                manifest.verified_at = time.time()
                await trio.to_thread.run_sync(self.pins.write, manifest)
                self.pins.install(manifest)
        size_only = sorted(k for m in manifests for k in m.size_only())
        log.info(
            "verify dataset=%s checked=%d repaired=%d failed=%d size_only=%d",
            prefix,
            checked,
            len(repaired),
            len(failed),
            len(size_only),
        )
        return {
            "event": "done",
            "ok": not failed and all(m.complete for m in manifests),
            "dataset": self.dataset_name(prefix),
            "files_checked": checked,
            "repaired": repaired,
            "failed_objects": failed,
            "complete": all(m.complete for m in manifests),
            "size_only": len(size_only),
            "size_only_keys": size_only[:SIZE_ONLY_SHOWN],
        }

    async def unbind(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        """`s3cachefs unmount`: unmount the binds so that the FUSE mount can go; kept
        passthrough registrations go too (a lazy unmount under a reader)."""
        if self.ops.passthrough is not None:
            self.ops.passthrough.stop("s3cachefs unmount")
        if self.kernel is not None:
            await self.kernel.stop()
        return {"event": "done", "ok": True}

    async def rebind(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        """`s3cachefs unmount` failed after `unbind` (busy): bind the datasets again."""
        if self.ops.passthrough is not None:
            self.ops.passthrough.resume()
        if self.kernel is not None:
            await self.kernel.resume()
        return {"event": "done", "ok": True}

    async def evict(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        prefix = self.dataset_prefix(str(request.get("dataset", "")))
        manifests = [m for m in self.pins.manifests.values() if m.prefix == prefix]
        if not manifests:
            raise ConfigError(f"dataset {self.dataset_name(prefix)} is not pinned")
        oids = {v.oid for m in manifests for v in m.versions()}
        for manifest in manifests:
            if self.kernel is not None:  # unbind before anything is unpinned or freed
                await self.kernel.release(manifest)
            self.pins.delete(manifest)
        self.core.pins_changed()
        deferred = held_bytes(self.cache.ledger, oids)  # no await before the free: exact
        freed = await self.cache.free(oids)
        log.info("evict dataset=%s freed_bytes=%d deferred_bytes=%d", prefix, freed, deferred)
        await trio.lowlevel.checkpoint()
        return {
            "event": "done",
            "ok": True,
            "dataset": self.dataset_name(prefix),
            "freed_bytes": freed,
            "deferred_bytes": deferred,  # freed at a passthrough reader's last close
        }

    async def staged(self, request: dict[str, Any], send: Send) -> dict[str, Any]:
        """Files written but never uploaded: list them, upload them now, or discard them."""
        action = str(request.get("action", "list"))
        targets = [str(t) for t in request.get("targets", [])]
        every = bool(request.get("all"))
        writeback = self.writeback
        if action == "list":
            return {"event": "done", "ok": True, "staged": [x.describe() for x in writeback.left()]}
        if action not in ("upload", "discard"):
            raise ConfigError(f"unknown staged action {action!r}")
        if not targets and not every:
            raise ConfigError(f"staged --{action} needs an ID or KEY (or --all)")
        done: list[str] = []
        failed: dict[str, str] = {}
        for staged in writeback.select(targets, every, upload=action == "upload"):
            if action == "discard":
                await writeback.discard(staged)
                done.append(staged.key)
                continue
            try:
                await writeback.upload_left(staged, create_only=not self.config.allow_overwrite)
            except S3CacheFSError as exc:
                failed[staged.key] = str(exc)
                continue
            done.append(staged.key)
            self.core.key_changed(staged.key)
            await send({"event": "uploaded", "key": staged.key})
        return {"event": "done", "ok": not failed, "action": action, "done": done, "failed": failed}

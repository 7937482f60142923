"""The daemon: wires store, cache and filesystem under one root nursery.

Start-up order matters for clear errors: every check that can fail on bad
input (bucket, credentials, endpoint, cache dir, mountpoint) runs before the
kernel mount, and the caller hears "ready" only once the mount is usable.
An unreachable S3 is not bad input: with a complete pinned dataset in the
cache the daemon starts anyway and serves it (`daemon.offline`).
Stop unwinds in reverse: FUSE loop ends (signal or external unmount), the
mount goes away (only if it is still this daemon's: `mountpoint.release_own_mount`),
the cache index closes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3
import trio

from s3cachefs.base.errors import ConfigError, TransientError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.daemon import control, memory, offline
from s3cachefs.daemon.commands import Daemon, RecentErrors
from s3cachefs.daemon.metrics import Metrics
from s3cachefs.daemon.mountpoint import (
    check_mountpoint,
    mount_at,
    release_own_mount,
    set_kernel_readahead,
)
from s3cachefs.daemon.notify import notify
from s3cachefs.daemon.passthroughing import passthrough
from s3cachefs.daemon.readserving import read_serve
from s3cachefs.daemon.reporting import flush as flush_sentry
from s3cachefs.daemon.reporting import setup_sentry
from s3cachefs.daemon.runtime import (
    MountRecord,
    control_socket_path,
    pid_namespace,
    remove_record,
    write_record,
)
from s3cachefs.datasets import readtrees
from s3cachefs.datasets.binds import MountEntry
from s3cachefs.datasets.kernelserve import KernelServe
from s3cachefs.datasets.pins import PinStore
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.operations import Operations
from s3cachefs.staging.writeback import Writeback
from s3cachefs.store.s3 import S3Store

if TYPE_CHECKING:
    from s3cachefs.base.config import MountConfig

log = logging.getLogger(__name__)

# pyfuse3's workers: enough to keep many readers' requests in flight while
# some wait on S3.
FUSE_MAX_TASKS = 64
# How often systemd's STATUS= line is refreshed.
STATUS_INTERVAL = 30.0
# At stop, how long in-flight fetches may take to land in the cache.
DRAIN_TIMEOUT = 10.0


def fuse_options(config: MountConfig) -> set[str]:
    options = {
        f"fsname=s3cachefs:{config.bucket}/{config.prefix}".rstrip("/"),
        "subtype=s3cachefs",
        "default_permissions",
        "noatime",
    }
    if not config.writable:
        options.add("ro")
    if config.allow_other:
        options.add("allow_other")
    return options


def run_daemon(config: MountConfig, on_ready: Callable[[str], None]) -> None:
    """Serve the mount until SIGTERM/SIGINT or an external unmount. Blocking.

    ``on_ready`` is called once the mount is usable, with a warning for the
    user who started it ("" if none).
    """
    memory.limit_arenas()
    check_mountpoint(config.mountpoint, config.cache_dir)  # cheapest check first: no network
    # Canonical (symlinks resolved) now: after the mount, resolving it would ask ourselves.
    canonical = os.path.realpath(config.mountpoint)
    store = S3Store(config)
    s3_state = offline.S3State()
    try:
        store.check_bucket()  # no such bucket, access denied: refused here, one line
    except TransientError as exc:
        s3_state.unreachable_since, s3_state.reason = time.time(), str(exc)
    s3_limiter = trio.CapacityLimiter(config.s3_concurrency)
    disk_limiter = trio.CapacityLimiter(8)
    cache = BlockCache.from_config(config, store, s3_limiter=s3_limiter, disk_limiter=disk_limiter)
    errors = RecentErrors()
    logging.getLogger().addHandler(errors)
    with contextlib.ExitStack() as stack:
        if setup_sentry():
            stack.callback(flush_sentry)  # last out: events of the shutdown itself
        cache.open()
        stack.callback(cache.close)
        pins = PinStore(cache.root, config.bucket, cache.ledger)
        pins.load()
        if s3_state.unreachable_since is not None:
            _start_offline(config, pins, s3_state.reason)
        # Always looked at, writable or not: what a crash left staged is reported.
        writeback = Writeback(
            cache,
            store,
            part_size=config.upload_part_size,
            s3_limiter=s3_limiter,
            disk_limiter=disk_limiter,
            parallel_parts=max(1, min(4, config.s3_concurrency // 4)),  # 4 x 8 MiB in memory
        )
        writeback.open()
        core = FsCore(
            store,
            cache,
            prefix=config.prefix,
            metadata_ttl=config.metadata_ttl,
            s3_limiter=s3_limiter,
            readahead_blocks=config.readahead_size // cache.block_size,
            keep_cache=config.keep_cache,
            pins=pins,
            writeback=writeback if config.writable else None,
            allow_overwrite=config.allow_overwrite,
            allow_delete=config.allow_delete,
        )
        ops = Operations(core)
        passthrough(config, ops, cache)  # --passthrough: before pyfuse3.init asks the kernel
        kernel = KernelServe(
            mountpoint=config.mountpoint,
            mount_prefix=config.prefix,
            bucket=config.bucket,
            cache=cache,
            pins=pins,
            enabled=config.kernel_serve_pinned,
            verify_interval=config.verify_interval,
        )
        kernel.readserve = read_serve(config, core, cache, pins)
        daemon = Daemon(
            config,
            store,
            cache,
            pins,
            ops,
            errors,
            writeback,
            core=core,
            kernel=kernel,
            s3_state=s3_state,
        )
        kernel.checks.on_change = lambda: _notify_status(daemon)
        metrics = None
        if config.metrics_address:
            metrics = Metrics(daemon)
            metrics.serve(config.metrics_address)
            stack.callback(metrics.close)
            store.observer = metrics.observe_s3
        own, socket_path = _mount(config, ops, canonical, stack)
        trio.run(_serve, daemon, socket_path, on_ready, own, s3_limiter, metrics)
        log.info("unmounting mountpoint=%s", config.mountpoint)
        log.info("stats %s", _stats_line(ops, cache, store))


def _mount(
    config: MountConfig, ops: Operations, canonical: str, stack: contextlib.ExitStack
) -> tuple[MountEntry | None, Path]:
    """The kernel mount and its runtime record; at stop, each undone only if still ours."""
    pyfuse3.init(ops, str(config.mountpoint), fuse_options(config))
    own = mount_at(canonical)
    if own is None or not own.fstype.startswith("fuse"):  # cannot tell ours: libfuse's way
        log.warning("mountpoint=%s: cannot find our mount in mountinfo", canonical)
        stack.callback(pyfuse3.close, unmount=True)
    else:
        stack.callback(_release, own)
        stack.callback(pyfuse3.close, unmount=False)  # first out: the session, then the mount
    socket_path = control_socket_path(config.mountpoint, os.getpid())
    write_record(
        MountRecord(
            os.getpid(),
            str(config.mountpoint),
            config.source,
            str(config.cache_dir),
            str(socket_path),
            device=own.device if own else "",
            mount_id=own.id if own else 0,
            pid_ns=pid_namespace(),
        )
    )
    stack.callback(remove_record, config.mountpoint, os.getpid())
    log.info(
        "mounted source=%s mountpoint=%s device=%s",
        config.source,
        config.mountpoint,
        own.device if own else "?",
    )
    return own, socket_path


def _start_offline(config: MountConfig, pins: PinStore, reason: str) -> None:
    """S3 did not answer: start if pinned datasets can be served, else refuse (one line)."""
    where = config.endpoint_url or "AWS S3"
    servable = offline.servable(pins, config.bucket, config.prefix)
    if not servable:
        raise ConfigError(
            f"cannot reach {where}: {reason} (and no complete pinned dataset to serve)"
        )
    names = ", ".join(m.prefix[len(config.prefix) :].rstrip("/") for m in servable[:5])
    log.warning(
        "S3 unreachable at start (%s: %s); serving %d pinned datasets from the cache (%s); "
        "everything else fails until S3 answers again",
        where,
        reason,
        len(servable),
        names,
    )


def _notify_status(daemon: Daemon) -> None:
    notify(f"STATUS={daemon.summary()}")


def _release(own: MountEntry) -> None:
    """Unmount our mount, if the path still leads to it: never a mount made there since."""
    try:
        outcome = release_own_mount(own)
    except (OSError, ConfigError) as exc:
        log.warning("mountpoint=%s: unmount failed: %s", own.mount_point, exc)
        return
    if outcome == "covered":
        log.warning(
            "mountpoint=%s now leads to another mount, not ours (device %s); left alone",
            own.mount_point,
            own.device,
        )
    else:
        log.info("mountpoint=%s %s", own.mount_point, outcome)


def _stats_line(ops: Operations, cache: BlockCache, store: S3Store) -> str:
    """One key=value line of what this daemon did: FUSE requests, cache, S3 requests."""
    fields = {f"fuse_{k}": v for k, v in sorted(ops.counts.items())}
    fields |= {f"cache_{k}": v for k, v in sorted(cache.stats.counts.items())}
    fields |= {f"s3_{k}": v for k, v in sorted(store.request_counts().items())}
    return " ".join(f"{k}={v}" for k, v in fields.items())


async def _serve(
    daemon: Daemon,
    socket_path: Path,
    on_ready: Callable[[str], None],
    own: MountEntry | None,
    s3_limiter: trio.CapacityLimiter,
    metrics: Metrics | None,
) -> None:
    """The root nursery: cache fetches, control socket, signals, the FUSE loop."""
    if metrics is not None:
        metrics.attach()  # scrapes take their snapshot on this thread from now on
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.cache.run)
        if daemon.ops.passthrough is not None:  # its background checks
            await nursery.start(daemon.ops.passthrough.run)
        daemon.cache.bulk.start_workers()  # warm before a prefetch comes (`cache.bulk`)
        await readtrees.free_left(daemon.cache)  # a dead daemon's, before any read
        await nursery.start(functools.partial(control.serve, socket_path, daemon.handlers()))
        nursery.start_soon(_terminate_on_signal, daemon)
        nursery.start_soon(_announce_ready, daemon, on_ready, own)
        if daemon.s3_state is not None and daemon.s3_state.unreachable_since is not None:
            nursery.start_soon(offline.reconnect, daemon.store, daemon.s3_state, s3_limiter)
        await pyfuse3.main(max_tasks=FUSE_MAX_TASKS)
        notify("STOPPING=1", "STATUS=unmounting")
        if daemon.ops.passthrough is not None:  # an external unmount: its checks stop now
            daemon.ops.passthrough.stop("the FUSE loop ended")
        with trio.move_on_after(DRAIN_TIMEOUT):  # keep what was fetched: finish disk writes
            await daemon.cache.drain()
        nursery.cancel_scope.cancel()


async def _announce_ready(
    daemon: Daemon, on_ready: Callable[[str], None], own: MountEntry | None
) -> None:
    """Say "ready" once a request has made the round trip through the kernel.

    By then the kernel has also applied the INIT reply, which resets the
    mount's readahead: only now does raising it stick.
    """
    config = daemon.config
    await trio.to_thread.run_sync(os.statvfs, config.mountpoint)
    if config.kernel_readahead_kib:
        set_kernel_readahead(own, config.kernel_readahead_kib)
    state = daemon.s3_state
    offline_now = state is not None and state.unreachable_since is not None
    on_ready(
        f"S3 unreachable ({state.reason}); serving pinned datasets" if state and offline_now else ""
    )
    notify("READY=1", f"STATUS={daemon.summary()}")
    async with trio.open_nursery() as nursery:
        if daemon.kernel is not None:  # the FUSE path serves correct bytes until then
            nursery.start_soon(_kernel_serve, daemon.kernel)
        while True:  # systemctl status shows a live summary
            await trio.sleep(STATUS_INTERVAL)
            notify(f"STATUS={daemon.summary()}")
            await trio.to_thread.run_sync(memory.trim)


async def _kernel_serve(kernel: KernelServe) -> None:
    """Check and bind the pinned datasets (the start check can take a while), then keep
    checking them on schedule."""
    await kernel.run()


async def _terminate_on_signal(daemon: Daemon) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal=%s; unmounting", signal.Signals(signum).name)
            if daemon.ops.passthrough is not None:  # kept registrations go before the unmount
                daemon.ops.passthrough.stop("signal")
            if daemon.kernel is not None:  # binds first, while the FUSE loop still answers
                await daemon.kernel.stop(final=True)
            pyfuse3.terminate()
            return

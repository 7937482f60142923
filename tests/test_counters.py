"""Counters say what happened: each read counted once, and scrapes that never race the daemon."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from s3cachefs.base.config import MountConfig
from s3cachefs.store.s3 import S3Store
from s3cachefs.testing.memorystore import MemoryStore
from tests.conftest import Bucket, Mount, Mounter, drop_page_cache, run_cli, s3cachefs_cmd
from tests.test_blockcache import BS, make_cache, run_with, version_of


def test_a_cold_read_is_one_miss_and_no_hit(tmp_path: Path) -> None:
    store = MemoryStore()
    data = os.urandom(3 * BS + 100)
    v = version_of(store, "k", data)
    cache = make_cache(tmp_path, store, memory_bytes=64 * BS)

    async def body() -> None:
        assert await cache.read(v, 10, 1000) == data[10:1010]  # waits for block 0
        assert (cache.stats["misses"], cache.stats["hits_memory"]) == (1, 0)
        assert await cache.read(v, 2000, 1000) == data[2000:3000]  # block 0, in memory now
        assert (cache.stats["misses"], cache.stats["hits_memory"]) == (1, 1)
        assert await cache.read(v, BS - 10, 2 * BS) == data[BS - 10 : 3 * BS - 10]
        assert (cache.stats["misses"], cache.stats["hits_memory"]) == (3, 2)  # 1, 2 new

    run_with(cache, body)
    cache.close()
    assert cache.stats["hits_disk"] == 0
    assert cache.stats["blocks_from_s3"] == 3  # what came from S3, reads or not


def _cache_counts(mount: Mount) -> dict[str, Any]:
    result = run_cli("status", str(mount.path), "--json")
    assert result.returncode == 0, result.stderr
    cache: dict[str, Any] = json.loads(result.stdout)["cache"]
    return cache


def test_status_counts_each_read_of_the_mount_once(bucket: Bucket, mounter: Mounter) -> None:
    body = os.urandom(50_000)  # one block, one kernel read
    bucket.put("one.bin", body)
    # The FUSE path's count: passed through, the second read never reaches the daemon
    # (tests/test_passthrough.py counts that no READ does).
    mount = mounter(bucket.name, "--no-passthrough")
    assert (mount.path / "one.bin").read_bytes() == body
    cold = _cache_counts(mount)
    assert (cold["hits"], cold["misses"], cold["hit_ratio"]) == (0, 1, 0.0)
    drop_page_cache()  # the kernel asks the daemon again
    assert (mount.path / "one.bin").read_bytes() == body
    warm = _cache_counts(mount)
    assert (warm["hits"], warm["misses"], warm["hit_ratio"]) == (1, 1, 0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_scraped_all_through_a_prefetch_always_answer(
    bucket: Bucket, mounter: Mounter
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    files = {f"ds/d{i % 7}/f{i:04d}.bin": os.urandom(700 + i) for i in range(600)}
    bucket.put_many(files)
    port = _free_port()
    mount = mounter(bucket.name, "--metrics-address", f"127.0.0.1:{port}")
    job = subprocess.Popen(
        s3cachefs_cmd("prefetch", "ds", "--mount", str(mount.path), "--jobs", "16"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    statuses: list[int | str] = []
    scraped = threading.Event()

    def scrape() -> None:  # as fast as it can, while the trio thread pins object after object
        while job.poll() is None or not scraped.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    list(text_string_to_metric_families(r.read().decode()))
                    statuses.append(r.status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
            except OSError as exc:
                statuses.append(repr(exc))
            scraped.set()

    threads = [threading.Thread(target=scrape) for _ in range(2)]
    for t in threads:
        t.start()
    _, err = job.communicate(timeout=100)
    for t in threads:
        t.join(timeout=30)
    assert job.returncode == 0, err
    assert len(statuses) > 10
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:3]
    log = mount.log_text()
    assert "changed size during iteration" not in log
    assert "Traceback" not in log
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("s3cachefs_cache_pinned_bytes", ())] == sum(map(len, files.values()))
    assert samples[("s3cachefs_dataset_complete", (("dataset", "ds"),))] == 1
    assert samples[("s3cachefs_cache_blocks_from_s3_total", ())] == len(files)
    assert samples[("s3cachefs_cache_misses_total", ())] == 0  # a prefetch is not a read


def test_a_scrape_before_and_after_the_trio_loop_is_not_an_error() -> None:
    from s3cachefs.daemon.metrics import DaemonCollector

    class NoDaemon:  # the collector asks the disk and the process only, without a loop
        class cache:
            cache_dir = Path("/")

    collector = DaemonCollector(NoDaemon())  # type: ignore[arg-type]
    names = {m.name for m in collector.collect()}
    assert "s3cachefs_process_resident_memory_bytes" in names
    assert "s3cachefs_cache_hits" not in names

    async def main() -> None:
        collector.trio_token = trio.lowlevel.current_trio_token()

    trio.run(main)
    assert collector.snapshot() is None  # the loop ended: no snapshot, no hang


def test_scrapes_never_iterate_what_the_trio_thread_changes(tmp_path: Path) -> None:
    """The race itself: the trio thread pins and unpins in a tight loop while another
    thread scrapes; iterating the pinned set from there raised "changed size"."""
    from s3cachefs.daemon.metrics import DaemonCollector

    store = MemoryStore()
    cache = make_cache(tmp_path, store)
    empty: Counter[str] = Counter()
    daemon = SimpleNamespace(
        cache=cache,
        store=store,
        ops=SimpleNamespace(counts=empty, passthrough=None),  # as Operations: None when off
        jobs={},
        pins=SimpleNamespace(manifests={}),
        writeback=SimpleNamespace(stats=empty, left=list),
        kernel=None,
        dataset_name=str,
    )
    collector = DaemonCollector(daemon)  # type: ignore[arg-type]
    errors: list[BaseException] = []
    scrapes = 0
    done = threading.Event()

    def scrape() -> None:  # the HTTP server's thread
        nonlocal scrapes
        while not done.is_set():
            try:
                list(collector.collect())
            except RuntimeError as exc:
                errors.append(exc)
            scrapes += 1

    async def main() -> None:
        collector.trio_token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(target=scrape)
        thread.start()
        try:
            # A set this large takes longer to iterate than the GIL's switch interval
            # (5 ms): the other thread is preempted in the middle of it.
            for round_ in range(8):
                for i in range(100_000):
                    cache.ledger.pin(f"{round_:02d}{i:038d}")
                    if i % 1000 == 0:
                        await trio.lowlevel.checkpoint()  # a scrape may snapshot now
                cache.ledger.set_pinned(set())
        finally:
            done.set()
            await trio.to_thread.run_sync(thread.join)

    trio.run(main)
    cache.close()
    assert errors == []
    assert scrapes > 0


class _OwnedLock:
    """A store's lock that knows which thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def __enter__(self) -> _OwnedLock:
        self._lock.acquire()
        self.owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()


class _LockedCounts(Counter[str]):
    """A store's request counter that refuses to be read whole without the store's lock:
    the first request of a new kind adds a key, which a copy racing it cannot survive.
    Its copies (``lock`` None) are anyone's to read."""

    lock: _OwnedLock | None = None

    def _check(self) -> None:
        if self.lock is not None and self.lock.owner != threading.get_ident():
            raise RuntimeError("request counts copied without the store's lock")

    def __iter__(self) -> Any:
        self._check()
        return super().__iter__()

    def keys(self) -> Any:
        self._check()
        return super().keys()

    def items(self) -> Any:
        self._check()
        return super().items()


@pytest.mark.parametrize("kind", ["s3", "memory"])
def test_request_counts_are_copied_under_the_store_lock_while_workers_count(
    tmp_path: Path, kind: str
) -> None:
    """Worker threads count requests of new kinds while the trio thread copies the counts
    for a scrape, `status` and the exit's stats line: every copy is taken under the lock."""
    from s3cachefs.daemon.app import _stats_line
    from s3cachefs.daemon.commands import Daemon
    from s3cachefs.daemon.metrics import take_snapshot

    store: S3Store | MemoryStore
    if kind == "s3":  # built offline: nothing is sent
        config = MountConfig(
            bucket="b", prefix="", mountpoint=tmp_path / "mnt", cache_dir=tmp_path / "cache"
        )
        store = S3Store(config)
    else:
        store = MemoryStore()
    lock = _OwnedLock()
    counts = _LockedCounts()
    counts.lock = lock
    store._lock = lock  # type: ignore[assignment]
    store._requests = counts
    cache = make_cache(tmp_path / "blocks", MemoryStore())
    empty: Counter[str] = Counter()
    # as Operations and MountConfig: passthrough off, and why
    ops = SimpleNamespace(counts=empty, passthrough=None, passthrough_off="--no-passthrough")
    daemon: Any = SimpleNamespace(
        config=SimpleNamespace(
            passthrough=False,
            mountpoint=tmp_path / "mnt",
            source="b",
            metrics_address=None,
            writable=False,
            allow_overwrite=False,
            allow_delete=False,
        ),
        store=store,
        cache=cache,
        ops=ops,
        jobs={},
        pins=SimpleNamespace(manifests={}),
        writeback=SimpleNamespace(stats=empty, staged={}, left=list),
        errors=SimpleNamespace(lines=[]),
        kernel=None,
        s3_state=None,
        started=0.0,
        dataset_name=str,
    )
    workers, kinds = 4, 300
    copies = 0

    def work(n: int) -> None:  # an S3 worker thread: each request of a kind never seen yet
        for i in range(kinds):
            store._count(f"op{n}-{i}")

    async def main() -> None:
        nonlocal copies
        threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
        for t in threads:
            t.start()
        try:
            while not copies or any(t.is_alive() for t in threads):
                take_snapshot(daemon)
                await Daemon.status(daemon, {}, None)  # type: ignore[arg-type]
                _stats_line(ops, cache, store)  # type: ignore[arg-type]
                copies += 1
        finally:
            for t in threads:
                await trio.to_thread.run_sync(t.join)

    trio.run(main)
    cache.close()
    assert copies > 0
    final = store.request_counts()
    assert len(final) == workers * kinds and set(final.values()) == {1}
    assert take_snapshot(daemon).s3_requests == final

"""The bulk path (issue 12): prefetch runs in worker processes, the daemon indexes and pins.

Real mounts, a real S3 server behind a proxy that counts GETs per key, can hold
the GETs of chosen keys until the test lets them go, and lies (`tests.faultproxy`).
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import botocore.credentials
import pytest
import trio

from s3cachefs.base.errors import CredentialsError
from s3cachefs.cache import ledger
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.bulk import _Waiting
from s3cachefs.cache.bulkriders import Ride
from s3cachefs.cache.bulkworker import Done, Endpoint, Job, Secrets, fetch_jobs
from s3cachefs.cache.flights import Flight
from s3cachefs.cache.index import Index
from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.store.checksums import Check
from s3cachefs.store.responses import etag_md5
from s3cachefs.store.s3 import S3Store
from tests.conftest import (
    Bucket,
    Mount,
    Mounter,
    drop_page_cache,
    make_store,
    run_cli,
    s3cachefs_cmd,
)
from tests.faultproxy import FaultProxy
from tests.test_diskfree import CountingBounds
from tests.test_prefetch import check_tree, fill, prefetch

WORKER = "s3cachefs.cache.bulkworker"


class GateProxy(FaultProxy):
    """Counts object GETs per key; holds those of ``held`` keys until ``gate`` opens.

    Lies are told only to object GETs (not listings, not HEADs); the first GET of a
    key in ``flip_first`` gets one byte flipped, the later ones the truth.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.gets: Counter[str] = Counter()
        self.held: set[str] = set()
        self.flip_first: set[str] = set()
        self.gate = threading.Event()
        self.methods = {"GET"}
        self._request = threading.local()  # this thread's request: (key, its GET number)

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        self._request.get = None
        if req.command == "GET" and "list-type" not in req.path:
            key = unquote(urlsplit(req.path).path).split("/", 2)[2]
            with self._lock:
                self.gets[key] += 1
                self._request.get = (key, self.gets[key])
            if key in self.held:
                self.gate.wait(60)
        super().handle(req)

    def _draw(self, method: str, applicable: frozenset[str] = frozenset()) -> str:
        if "listing_etag" in applicable:  # a listing: always the truth here
            return "ok"
        get = getattr(self._request, "get", None)
        if get is not None and get[0] in self.flip_first and get[1] == 1:
            with self._lock:
                self.faults["flip_byte"] += 1
            return "flip_byte"
        return super()._draw(method, applicable)


@pytest.fixture
def gate_proxy(s3_server: LocalS3) -> Iterator[GateProxy]:
    p = GateProxy(s3_server.endpoint_url)
    p.start()
    yield p
    p.gate.set()
    p.stop()


def workers_of(pid: int) -> list[int]:
    """The bulk worker processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and WORKER.encode() in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(what: str, condition: object, seconds: float = 60) -> None:
    assert callable(condition)
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def start_prefetch(mount: Mount, dataset: str = "dataset-v3") -> subprocess.Popen[str]:
    return subprocess.Popen(
        s3cachefs_cmd("prefetch", dataset, "--mount", str(mount.path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(job: subprocess.Popen[str]) -> tuple[int, str]:
    """The prefetch's exit code and stderr, once it ends."""
    _, err = job.communicate(timeout=120)
    return job.returncode, err


def all_pinned_and_exact(mount: Mount, files: dict[str, bytes]) -> None:
    """Every file pinned, and read back byte-exact from disk (page cache dropped)."""
    assert status(mount)["pinned_bytes"] == sum(map(len, files.values()))
    drop_page_cache()
    check_tree(mount, files)


def status(mount: Mount) -> dict[str, object]:
    result = run_cli("status", str(mount.path), "--json")
    assert result.returncode == 0, result.stderr
    cache: dict[str, object] = json.loads(result.stdout)["cache"]
    return cache


def read_behind_a_held_job(
    mount: Mount, gate_proxy: GateProxy, key: str
) -> tuple[subprocess.Popen[str], Callable[[], bytes | OSError]]:
    """Start a prefetch; once the worker's GET of ``key`` is held at the proxy, start a
    foreground read of ``key`` and wait until it waits in the daemon. Returns the
    prefetch and ``release``: open the gate, then the read's bytes (or its error)."""
    job = start_prefetch(mount)
    got: list[bytes | OSError] = []

    def read() -> None:
        try:
            got.append((mount.path / key).read_bytes())
        except OSError as exc:
            got.append(exc)

    try:
        wait_for(f"the worker's GET of {key}", lambda: gate_proxy.gets[key] == 1)
        assert workers_of(mount.proc.pid), "the prefetch did not go through worker processes"
        misses = int(str(status(mount)["misses"]))
        reader = threading.Thread(target=read)
        reader.start()
        wait_for(
            "the read to wait in the daemon", lambda: int(str(status(mount)["misses"])) > misses
        )
    except BaseException:
        job.kill()  # not left running behind a failed test
        job.communicate()
        raise

    def release() -> bytes | OSError:
        gate_proxy.gate.set()
        reader.join(60)
        assert len(got) == 1, "the read never completed"
        return got[0]

    return job, release


def test_a_read_waits_for_the_worker_job_that_fetches_its_block(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy
) -> None:
    """Single flight across processes: a foreground read of a block a worker is
    fetching waits for that job; the server sees one GET of the object."""
    files = fill(bucket, count=6)
    big = "dataset-v3/archive/big.tar"
    mount = mounter(bucket.name, "--no-kernel-serve-pinned", server=gate_proxy)
    gate_proxy.held = {big}
    job, release = read_behind_a_held_job(mount, gate_proxy, big)
    assert release() == files[big]
    code, err = finish(job)
    assert code == 0, err
    assert gate_proxy.gets[big] == 1, "the read and the job downloaded it twice"
    drop_page_cache()
    check_tree(mount, files)


def test_a_worker_killed_mid_job_loses_nothing_and_pins_nothing_unverified(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy
) -> None:
    """kill -9 of every worker while a job is held at the server: the daemon runs the
    lost jobs itself; the prefetch completes, byte-exact, verified."""
    files = fill(bucket, count=6)
    big = "dataset-v3/archive/big.tar"
    mount = mounter(bucket.name, server=gate_proxy)
    gate_proxy.held = {big}
    job = start_prefetch(mount)
    wait_for("the worker's GET of the big object", lambda: gate_proxy.gets[big] == 1)
    pids = workers_of(mount.proc.pid)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    gate_proxy.gate.set()
    code, err = finish(job)
    assert code == 0, err
    log = mount.log_text()
    for pid in pids:
        assert f"bulk worker pid={pid} ended (status -9)" in log
    assert gate_proxy.gets[big] == 2  # the lost job, once more (by the daemon)
    cache = status(mount)
    assert cache["pinned_bytes"] == sum(map(len, files.values()))
    assert prefetch(mount, "dataset-v3").returncode == 0  # verified: nothing fetched again
    assert gate_proxy.gets[big] == 2
    drop_page_cache()
    check_tree(mount, files)


def test_killing_the_daemon_leaves_no_worker(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy
) -> None:
    fill(bucket, count=4)
    big = "dataset-v3/archive/big.tar"
    mount = mounter(bucket.name, server=gate_proxy)
    gate_proxy.held = {big}
    job = start_prefetch(mount)
    wait_for("the worker's GET of the big object", lambda: gate_proxy.gets[big] == 1)
    pids = workers_of(mount.proc.pid)
    assert pids
    mount.kill9()
    wait_for("every worker to exit", lambda: not any(alive(p) for p in pids))
    gate_proxy.gate.set()
    finish(job)
    mount.stop()


def test_prefetch_workers_0_is_the_in_daemon_path(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, "--prefetch-workers", "0")
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert not workers_of(mount.proc.pid)
    assert "bulk worker" not in mount.log_text()
    drop_page_cache()
    check_tree(mount, files)


# A whole-object GET that is answered 200 (Range ignored) or without If-Match is
# the right answer here; the others must never reach the cache as the object.
TRUTHFUL_HERE = {"ignore_range", "strip_if_match"}


@pytest.mark.parametrize(
    "mode",
    [
        "ignore_range",
        "flip_byte",
        "short_range",
        "strip_if_match",
        "cut",
        "reset",
        "slowdown",
        "internal",
    ],
)
def test_a_lying_server_through_the_worker_path(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy, mode: str
) -> None:
    """Every object GET lies: nothing wrong is pinned or served, the prefetch fails
    with one line per object; once the server tells the truth, a resume completes."""
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, "--no-kernel-serve-pinned", server=gate_proxy)
    gate_proxy.rates[mode] = 1.0
    result = prefetch(mount, "dataset-v3")
    assert workers_of(mount.proc.pid), "the prefetch did not go through worker processes"
    assert gate_proxy.faults[mode] > 0
    if mode in TRUTHFUL_HERE:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 4, result.stderr
        failed = [ln for ln in result.stderr.splitlines() if ln.startswith("FAILED ")]
        assert len(failed) == len(files), result.stderr
        assert status(mount)["pinned_bytes"] == 0
    gate_proxy.rates[mode] = 0.0
    again = prefetch(mount, "dataset-v3")
    assert again.returncode == 0, again.stderr
    all_pinned_and_exact(mount, files)


def test_a_read_never_gets_the_bytes_of_a_worker_job_that_failed_its_md5(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy
) -> None:
    """The worker's GET of a single-part object has a byte flipped while a foreground
    read waits on its flights: the job is not indexed (its CRCs are of the wrong
    bytes); the read gets the object's bytes, by its own GET."""
    files = fill(bucket, count=4)
    big = "dataset-v3/archive/big.tar"
    mount = mounter(bucket.name, "--no-kernel-serve-pinned", server=gate_proxy)
    gate_proxy.held, gate_proxy.flip_first = {big}, {big}
    job, release = read_behind_a_held_job(mount, gate_proxy, big)
    gate_proxy.held = set()
    got = release()
    assert gate_proxy.faults["flip_byte"] == 1
    assert got == files[big], "the read got the flipped byte"
    code, err = finish(job)
    assert code == 0, err
    all_pinned_and_exact(mount, files)


def test_a_prefetch_cancelled_while_its_jobs_are_out_leaves_no_flight_behind(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy
) -> None:
    """Ctrl-C of ``s3cachefs prefetch`` while a worker job is held at the server: a
    read of that object's blocks completes, and so does a second prefetch."""
    files = fill(bucket, count=6)
    big = "dataset-v3/archive/big.tar"
    mount = mounter(bucket.name, "--no-kernel-serve-pinned", server=gate_proxy)
    gate_proxy.held = {big}
    job = start_prefetch(mount)
    wait_for("the worker's GET of the big object", lambda: gate_proxy.gets[big] == 1)
    job.send_signal(signal.SIGINT)
    code, err = finish(job)
    assert code != 0, err
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((mount.path / big).read_bytes()))
    reader.start()
    gate_proxy.gate.set()
    reader.join(60)
    assert got == [files[big]], "the read never completed"
    assert prefetch(mount, "dataset-v3").returncode == 0
    all_pinned_and_exact(mount, files)


# ---- the engine driven directly (no mount): one BlockCache, real workers, real S3 ----

BS = 1024 * 1024


def engine_cache(store: S3Store, path: Path, workers: int = 1) -> BlockCache:
    cache = BlockCache(
        path,
        store,
        block_size=BS,
        cache_size=1 << 30,
        min_free=0,
        memory_bytes=0,
        s3_limiter=trio.CapacityLimiter(8),
        disk_limiter=trio.CapacityLimiter(4),
        bulk_workers=workers,
        bulk_threads=2,
    )
    cache.open()
    return cache


def put_object(bucket: Bucket, store: S3Store, key: str, size: int) -> tuple[ObjectVersion, bytes]:
    data = os.urandom(size)
    bucket.put(key, data)
    info = store.head(key)
    return ObjectVersion(store.bucket, key, info.etag, size), data


def md5_check(data: bytes) -> Check:
    return Check("md5", hashlib.md5(data, usedforsecurity=False).hexdigest())


async def until(condition: Callable[[], bool]) -> None:
    """Poll (run_engine bounds the whole test's time)."""
    while True:
        if condition():
            return
        await trio.sleep(0.02)


class Riding:
    """A rider (`cache.bulkriders.Rider`) that always wants to ride; ``take`` gives its ride."""

    def __init__(self, take: Callable[[], Ride | None]) -> None:
        self.take = take

    def wants(self) -> bool:
        return True

    def ride(self) -> Ride | None:
        return self.take()


def run_engine(cache: BlockCache, body: object) -> None:
    assert callable(body)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(120):  # a hang is a failure, not a stuck test run
                await body()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_engine_never_keeps_the_bytes_of_a_get_whose_md5_failed(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy
) -> None:
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", 2 * BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    gate_proxy.flip_first = {"one"}

    async def body() -> None:
        # A byte flipped on the wire: the worker's MD5 fails, it fetches again (were a
        # mismatch answered, the daemon would index none of it: `BulkEngine._accept`).
        done = await cache.bulk.fetch(version, range(3), md5_check(data))
        assert gate_proxy.faults["flip_byte"] == 1
        assert done is not None and done.matches and done.attempts == 2
        assert await cache.read(version, 0, len(data)) == data
        assert cache.bulk.pids, "the worker died of it"

    run_engine(cache, body)


def test_engine_survives_credentials_that_fail_to_refresh(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy
) -> None:
    """A failed refresh fails the jobs with a CredentialsError; the daemon goes on."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    getter = store.range_getter
    assert getter is not None
    good = getter._credentials
    calls: list[int] = []

    def refresh() -> dict[str, str]:
        calls.append(1)
        raise OSError("the metadata service is not there")

    failing = botocore.credentials.RefreshableCredentials.create_from_metadata(
        {"access_key": "a", "secret_key": "s", "token": "t", "expiry_time": "2000-01-01T00:00:00Z"},
        refresh_using=refresh,
        method="test",
    )

    async def body() -> None:
        await cache.bulk.fetch(version, range(2), md5_check(data))  # the workers start
        other, other_data = put_object(bucket, store, "two", BS + 9)
        getter._credentials = failing
        with pytest.raises(CredentialsError):
            await cache.bulk.fetch(other, range(2), md5_check(other_data))
        assert calls
        assert cache.missing_blocks(other) == [0, 1]
        getter._credentials = good
        done = await cache.bulk.fetch(other, range(2), md5_check(other_data))
        assert done is not None and done.matches
        assert await cache.read(other, 0, len(other_data)) == other_data

    run_engine(cache, body)


def _credentials(kind: str, getter_credentials: object) -> object:
    """The getter's own keys, static or refreshable with an expiry ``kind`` away."""
    if kind == "static":
        return getter_credentials
    assert isinstance(getter_credentials, botocore.credentials.Credentials)
    frozen = getter_credentials.get_frozen_credentials()
    minutes = {"refreshable in 1 h": 60, "refreshable in 5 min": 5}[kind]

    def metadata() -> dict[str, str]:
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=minutes)
        return {
            "access_key": str(frozen.access_key),
            "secret_key": str(frozen.secret_key),
            "token": "t",
            "expiry_time": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    return botocore.credentials.RefreshableCredentials.create_from_metadata(
        metadata(), refresh_using=metadata, method="test"
    )


@pytest.mark.parametrize(
    ("kind", "asked"),
    [("static", 1), ("refreshable in 1 h", 1), ("refreshable in 5 min", 3)],
)
def test_engine_freezes_credentials_for_a_batch_only_when_they_may_have_changed(
    bucket: Bucket,
    tmp_path: Path,
    gate_proxy: GateProxy,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    asked: int,
) -> None:
    """Each batch of jobs goes out with the daemon's credentials; they are frozen in a
    thread (a refresh may be a round trip) only when they may have changed: static keys
    once, refreshable ones again only within botocore's refresh window of their expiry
    (5 min: every batch, refreshed ahead of it), not once per batch."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    objects = [put_object(bucket, store, f"k{i}", BS + 1 + i) for i in range(3)]
    cache = engine_cache(store, tmp_path / "c")
    getter = store.range_getter
    assert getter is not None
    getter._credentials = _credentials(kind, getter._credentials)  # type: ignore[assignment]
    secrets = getter.secrets
    calls: list[int] = []

    def counted() -> tuple[str, str, str | None] | None:
        calls.append(1)
        return secrets()

    monkeypatch.setattr(getter, "secrets", counted)

    async def body() -> None:
        for version, data in objects:  # one after the other: a batch each
            done = await cache.bulk.fetch(version, range(2), md5_check(data))
            assert done is not None and done.matches
            assert await cache.read(version, 0, len(data)) == data

    run_engine(cache, body)
    assert len(calls) == asked


def test_engine_releases_a_survivors_jobs_when_no_worker_can_be_started(
    bucket: Bucket,
    tmp_path: Path,
    gate_proxy: GateProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker killed, its replacement cannot start: the other worker's held job
    is given back (its reader does its own GET), nothing hangs."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c", workers=2)
    gate_proxy.held = {"one"}

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            results: list[object] = []

            async def fetch() -> None:
                results.append(await cache.bulk.fetch(version, range(2), md5_check(data)))

            nursery.start_soon(fetch)
            await until(lambda: gate_proxy.gets["one"] >= 1)
            pids = cache.bulk.pids
            assert len(pids) == 2
            busy = [w for w in cache.bulk.pool.workers if w.jobs]
            idle = [w for w in cache.bulk.pool.workers if not w.jobs]
            assert len(busy) == 1 and len(idle) == 1
            os.kill(idle[0].proc.pid, signal.SIGKILL)
            await until(lambda: not idle[0].alive)
            monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
            reader = trio.Event()

            async def read() -> None:
                assert await cache.read(version, 0, len(data)) == data
                reader.set()

            nursery.start_soon(read)
            await trio.sleep(0.1)  # the read waits on the held job's flights
            other, _ = put_object(bucket, store, "two", 10)
            assert await cache.bulk.fetch(other, range(1), None) is None  # cannot start
            assert not busy[0].alive
            gate_proxy.gate.set()
            await reader.wait()
        assert results == [None]

    run_engine(cache, body)


def test_workers_do_not_import_from_the_daemons_cwd(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module planted in the daemon's working directory is not what a worker imports."""
    planted = tmp_path / "cwd" / "s3cachefs"
    planted.mkdir(parents=True)
    marker = tmp_path / "imported"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path / "cwd")
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")

    async def body() -> None:
        done = await cache.bulk.fetch(version, range(2), md5_check(data))
        assert done is not None and done.matches

    run_engine(cache, body)
    assert not marker.exists()


def test_engine_indexes_batches_that_come_in_meanwhile_together_with_its_riders(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit at a time: results that come in while a commit waits on the index go
    together in the next one; work that rides on commits (`BulkEngine.riders`: a first
    prefetch's links) runs in the same thread call, after the rows, and its ``then`` on
    the trio thread."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    objects = [put_object(bucket, store, f"k{i}", BS + 1 + i) for i in range(3)]
    cache = engine_cache(store, tmp_path / "c", workers=2)
    index_written = cache.bulk.disk.index_written
    rows: list[int] = []
    local = threading.local()

    def counted(batch: list[tuple[ObjectVersion, bool, int, list[int], int]]) -> list[bool]:
        rows.append(len(batch))
        kept = index_written(batch)
        local.indexed = True  # the ride below runs next, in this thread call
        return kept

    monkeypatch.setattr(cache.bulk.disk, "index_written", counted)
    rode: list[str] = []

    def work() -> None:
        rode.append("after the rows" if getattr(local, "indexed", False) else "alone")
        local.indexed = False

    cache.bulk.riders.append(Riding(lambda: (work, lambda: rode.append("then"))))
    lock = sqlite3.connect(cache._layout.index_dir / "cache.db", isolation_level=None)

    async def body() -> None:
        async def fetch(version: ObjectVersion, data: bytes) -> None:
            done = await cache.bulk.fetch(version, range(2), md5_check(data))
            assert done is not None and done.matches

        lock.execute("BEGIN EXCLUSIVE")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch, *objects[0])
                await until(lambda: rows == [1])  # its commit waits on the lock
                for version, data in objects[1:]:
                    nursery.start_soon(fetch, version, data)
                await until(lambda: len(cache.bulk._queued) == 2)
                lock.execute("ROLLBACK")
        finally:
            if lock.in_transaction:
                lock.execute("ROLLBACK")
        for version, data in objects:
            assert await cache.read(version, 0, len(data)) == data

    try:
        run_engine(cache, body)
    finally:
        lock.close()
    assert rows == [1, 2]
    assert rode == ["after the rows", "then"] * 2


def test_engine_survives_an_index_that_stays_locked(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index DB locked past its timeout (diskcache.Timeout) when a batch is indexed:
    that job is given back (not indexed), the engine and its worker go on."""
    monkeypatch.setattr(Index, "LOCK_TIMEOUT", 2.0)  # the timeout, not its length, is tested
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    lock = sqlite3.connect(cache._layout.index_dir / "cache.db", isolation_level=None)

    async def body() -> None:
        lock.execute("BEGIN EXCLUSIVE")
        try:
            assert await cache.bulk.fetch(version, range(2), md5_check(data)) is None
        finally:
            lock.execute("ROLLBACK")
        assert cache.stats.counts["disk_errors"] >= 1
        assert cache.missing_blocks(version) == [0, 1]
        done = await cache.bulk.fetch(version, range(2), md5_check(data))
        assert done is not None and done.matches
        assert await cache.read(version, 0, len(data)) == data

    try:
        run_engine(cache, body)
    finally:
        lock.close()


def test_a_read_waiting_on_a_worker_job_never_gets_bytes_that_fail_their_md5(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy
) -> None:
    """Every object GET flips a byte; a foreground read of a small (single-part, MD5
    ETag) object waits on the worker job fetching it. The job's MD5 mismatch is a
    failed attempt, never indexed: the read gets S3's bytes or EIO, never others;
    nothing is pinned; once the server tells the truth, a resume completes."""
    files = fill(bucket, count=6)
    small = "dataset-v3/val/page-0000.png"
    mount = mounter(bucket.name, "--no-kernel-serve-pinned", server=gate_proxy)
    gate_proxy.held = {small}
    gate_proxy.rates["flip_byte"] = 1.0
    job, release = read_behind_a_held_job(mount, gate_proxy, small)
    try:
        got = release()
        if isinstance(got, OSError):
            assert got.errno == errno.EIO, got
        else:
            assert got == files[small], "the read got bytes that are not S3's"
        code, err = finish(job)
        assert code == 4, err
        assert gate_proxy.faults["flip_byte"] > 0
        assert status(mount)["pinned_bytes"] == 0
    finally:
        if job.poll() is None:  # a failed assertion above: not left running
            job.kill()
            job.communicate()
    gate_proxy.rates["flip_byte"] = 0.0
    again = prefetch(mount, "dataset-v3")
    assert again.returncode == 0, again.stderr
    all_pinned_and_exact(mount, files)


class HangUpProxy(FaultProxy):
    """Closes each connection after its response without saying so (no ``Connection:
    close``): the next request on a kept-alive socket finds it closed, as after S3's idle
    timeout."""

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        super().handle(req)
        req.close_connection = True


def whole_job(bucket: Bucket, key: str, data: bytes, path: Path, check: Check | None) -> Job:
    etag = bucket.put(key, data)
    return Job(key, key, etag, len(data), 0, len(data), str(path), check)


def test_a_kept_alive_connection_the_server_closed_is_not_an_attempt(
    bucket: Bucket, tmp_path: Path
) -> None:
    """One thread, two jobs, one attempt each: the second GET goes out on the socket the
    server closed after the first; it is sent again on a new one, not failed."""
    proxy = HangUpProxy(bucket.server.endpoint_url).start()
    try:
        datas = [os.urandom(100_000 + i) for i in range(2)]
        jobs = []
        for i, data in enumerate(datas):
            etag = bucket.put(f"k{i}", data)
            check = Check("md5", etag_md5(etag) or "")
            jobs.append(
                Job(f"k{i}", f"k{i}", etag, len(data), 0, len(data), str(tmp_path / f"f{i}"), check)
            )
        endpoint = Endpoint(f"{proxy.endpoint_url}/{bucket.name}/", "us-east-1", attempts=1)
        secrets = Secrets(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
        done = list(fetch_jobs(endpoint, jobs, secrets=secrets, block_size=64 * 1024, threads=1))
    finally:
        proxy.stop()
    assert [(d.oid, d.error, d.matches, d.attempts) for d in done] == [
        ("k0", "", True, 1),
        ("k1", "", True, 1),
    ]
    for i, data in enumerate(datas):
        assert (tmp_path / f"f{i}").read_bytes() == data


def start_worker(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Connection]:
    """A bulk worker process as the daemon starts one, its socket ours."""
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER, str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
    return proc, Connection(ours.detach())


def answers(conn: Connection, count: int) -> dict[str, Done]:
    got: dict[str, Done] = {}
    while len(got) < count:
        assert conn.poll(60), "the worker never answered"
        got.update((d.oid, d) for d in conn.recv())
    return got


def test_a_worker_answers_every_job_even_when_it_cannot(
    bucket: Bucket, tmp_path: Path, s3_server: LocalS3
) -> None:
    """No credentials, Ctrl-C at the terminal, a job that breaks the code: each job gets an
    answer (an error saying why), the serving thread lives on, no traceback."""
    data = os.urandom(70_000)
    good = whole_job(bucket, "good", data, tmp_path / "good", None)
    bad = Job("bad", "good", good.etag, len(data), 0, len(data), str(tmp_path / "bad"),
              Check("nonesuch-full", "x"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}  # fmt: skip
    proc, conn = start_worker(env)
    try:
        endpoint = Endpoint(f"{s3_server.endpoint_url}/{bucket.name}/", "us-east-1")
        conn.send((endpoint, 64 * 1024, 1))
        conn.send((None, [good]))  # None: the daemon has no credentials
        refused = answers(conn, 1)["good"]
        assert (refused.error, refused.error_kind) == (
            "no AWS credentials found",
            "CredentialsError",
        )
        os.kill(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the process group
        secrets = ("test-access-key", "test-secret-key-do-not-log", None)
        conn.send((secrets, [bad]))
        broken = answers(conn, 1)["bad"]
        assert "bulk worker error" in broken.error, broken
        assert not broken.crcs
        conn.send((secrets, [good]))  # one thread: the one that met the bad job
        done = answers(conn, 1)["good"]
        assert done.error == "", done.error
        assert (tmp_path / "good").read_bytes() == data
        conn.send(None)
        proc.wait(60)
    finally:
        conn.close()
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0
    assert err == b""


def test_a_worker_that_cannot_serve_says_so_in_one_line() -> None:
    """A worker started wrong (here: its socket not a socket) exits non-zero, one line."""
    result = subprocess.run(
        [sys.executable, "-m", WORKER, "not-a-number", str(os.getpid())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "bulk worker" in result.stderr


SHORT_WRITE = """
import os, resource, signal, sys
from s3cachefs.cache.bulkworker import Endpoint, Job, Secrets, fetch_jobs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
base, key, etag, size, path = sys.argv[1:]
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the 2nd block: short
job = Job(key, key, etag, int(size), 0, int(size), path)
secrets = Secrets(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
endpoint = Endpoint(base, "us-east-1")
(done,) = fetch_jobs(endpoint, [job], secrets=secrets, block_size=65536, threads=1)
print(done.error_kind, len(done.crcs), done.error)
"""


def test_a_short_write_is_a_disk_error_not_crcs(
    bucket: Bucket, tmp_path: Path, s3_server: LocalS3
) -> None:
    """pwrite writes part of a block (here: the file size limit, as a full disk does):
    the job is a disk error, no CRC of bytes that are not on disk."""
    data = os.urandom(120_000)  # its last block is the one cut short: nothing fails after
    etag = bucket.put("obj", data)
    target = tmp_path / "obj"
    target.write_bytes(b"")
    os.truncate(target, len(data))  # sparse, full length: as the worker leaves it
    base = f"{s3_server.endpoint_url}/{bucket.name}/"
    result = subprocess.run(
        [sys.executable, "-c", SHORT_WRITE, base, "obj", etag, str(len(data)), str(target)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kind, crcs, error = result.stdout.split(" ", 2)
    assert (kind, crcs) == ("DiskError", "0"), result.stdout
    assert "short write" in error


def test_a_rider_that_raises_does_not_unindex_the_commit_it_rode_on(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy
) -> None:
    """Review finding 2: a rider's work that raises is logged; the rows committed before it
    stay the job's (kept in the ledger, read from disk), not given back as not indexed."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    thens: list[str] = []

    def work() -> None:
        raise ValueError("embedded null byte")

    cache.bulk.riders.append(Riding(lambda: (work, lambda: thens.append("then"))))

    async def body() -> None:
        done = await cache.bulk.fetch(version, range(2), md5_check(data))
        assert done is not None and done.matches
        assert cache.missing_blocks(version) == []
        assert await cache.read(version, 0, len(data)) == data
        assert gate_proxy.gets["one"] == 1

    run_engine(cache, body)
    assert thens == ["then"]


class Faulty(Riding):
    """A rider whose ``wants`` raises (``broken`` true), else rides with ``then`` raising."""

    def __init__(self, broken: bool, thens: list[str]) -> None:
        super().__init__(lambda: (lambda: None, self._then))
        self.broken, self.thens = broken, thens

    def wants(self) -> bool:
        if self.broken:
            raise RuntimeError("a rider's bug in wants")
        return True

    def _then(self) -> None:
        self.thens.append("then")
        raise RuntimeError("a rider's bug in then")


@pytest.mark.parametrize("broken", [True, False], ids=["wants raises", "then raises"])
def test_a_rider_whose_wants_or_then_raises_leaves_the_commit_and_other_riders_whole(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy, broken: bool
) -> None:
    """A rider's bug in ``wants`` or ``then`` is logged: the batch is still settled (its
    fetch returns, its blocks are indexed), and every other rider's ``then`` runs (for
    `PreStages`, the release of its lock)."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    thens: list[str] = []
    cache.bulk.riders.append(Faulty(broken, thens))
    cache.bulk.riders.append(Riding(lambda: (lambda: None, lambda: thens.append("other"))))

    async def body() -> None:
        done = await cache.bulk.fetch(version, range(2), md5_check(data))
        assert done is not None and done.matches
        assert cache.missing_blocks(version) == []
        assert await cache.read(version, 0, len(data)) == data

    run_engine(cache, body)
    assert thens == (["other"] if broken else ["then", "other"])


def test_results_that_come_in_once_the_committer_stopped_are_given_back(
    bucket: Bucket, tmp_path: Path
) -> None:
    """Review finding 7 (commit 7f95a47): a batch the workers answer after the engine's
    committer stopped (or before it started) is released at once: its waiter wakes (lost,
    so its caller runs the in-daemon path), its reservation and flights are given back,
    and the new object's record goes."""
    store = make_store(bucket, tmp_path)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    engine, books = cache.bulk, cache.bulk.ledger
    used = books.used
    assert books.reserve(len(data), engine.bounds)[1]
    job = Job(version.oid, version.key, version.etag, version.size, 0, len(data), "/nowhere")
    flights = [engine.flights.start((version.oid, idx), Flight(remember=False)) for idx in (0, 1)]
    waiting = _Waiting(job, version, range(2), flights)
    engine._waiting[(version.oid, 0)] = waiting
    assert not engine._committing
    engine._commit([Done(version.oid, 0, len(data), crcs=[1, 2], inode=1, matches=True)])
    assert waiting.event.is_set()
    assert waiting.done is not None and waiting.done.lost
    assert books.used == used and version.oid not in books
    assert not engine._waiting and not engine._queued
    assert all(engine.flights.get((version.oid, idx)) is None for idx in (0, 1))


@pytest.mark.parametrize("crcs", [[1], [1, 2, 3]], ids=["fewer", "more"])
def test_a_result_whose_crcs_do_not_match_its_run_is_never_indexed(
    bucket: Bucket, tmp_path: Path, crcs: list[int]
) -> None:
    """A worker's answer with another count of block CRCs than its run has blocks (a bug
    or a broken worker) is released, never indexed: before, the settle after the commit
    raised half-way, and the rest of the batch's waiters were never woken."""
    store = make_store(bucket, tmp_path)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    engine, books = cache.bulk, cache.bulk.ledger
    path = engine.disk.layout.path(version.oid)  # the file "the worker wrote": its inode
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

    async def body() -> None:
        used = books.used
        assert books.reserve(len(data), engine.bounds)[1]
        job = Job(version.oid, version.key, version.etag, version.size, 0, len(data), str(path))
        flights = [engine.flights.start((version.oid, i), Flight(remember=False)) for i in (0, 1)]
        waiting = _Waiting(job, version, range(2), flights)
        engine._waiting[(version.oid, 0)] = waiting
        inode = path.stat().st_ino
        engine._commit([Done(version.oid, 0, len(data), crcs=crcs, inode=inode, matches=True)])
        with trio.fail_after(10):
            await waiting.event.wait()
        assert waiting.done is not None and waiting.done.lost
        assert books.used == used and version.oid not in books
        assert not engine._waiting and not engine._queued
        assert cache.missing_blocks(version) == [0, 1]

    run_engine(cache, body)


def test_an_eviction_that_failed_has_the_disk_asked_again(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 5: the bytes of a failed eviction, counted as freed by the ledger,
    may still be on the disk: the next reservation asks the disk (statvfs), not the count."""
    monkeypatch.setattr(ledger, "FREE_SAMPLE_SECONDS", 3600.0)  # one statvfs, but for this
    store = make_store(bucket, tmp_path)
    first, first_data = put_object(bucket, store, "one", BS + 7)
    second, second_data = put_object(bucket, store, "two", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    engine = cache.bulk

    def broken(victims: list[object]) -> None:
        raise OSError(errno.EIO, "the index disk failed")

    async def body() -> None:
        assert await engine.fetch(first, range(2), md5_check(first_data)) is not None
        bounds = CountingBounds(engine.bounds.cache_dir, engine.ledger.used + BS, 0)
        engine.bounds = bounds
        monkeypatch.setattr(engine.disk, "evict", broken)
        assert await engine.fetch(second, range(2), md5_check(second_data)) is None
        asked = len(bounds.calls)
        engine.ledger.reserve(0, bounds)
        assert len(bounds.calls) == asked + 1

    run_engine(cache, body)


def test_a_commits_waiters_are_woken_before_the_work_riding_on_it(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy
) -> None:
    """Review finding 6: links riding on a commit (thousands under a journal stall) must not
    delay the readers and prefetches waiting on that commit's rows: they are woken once the
    rows are committed, while the rider's work still runs in the thread."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c")
    woken = threading.Event()
    seen: list[bool] = []
    rides = [(lambda: seen.append(woken.wait(30)), lambda: seen.append(True))]
    cache.bulk.riders.append(Riding(lambda: rides.pop() if rides else None))

    async def body() -> None:
        done = await cache.bulk.fetch(version, range(2), md5_check(data))
        woken.set()  # the rider's work (still in its thread) sees it
        assert done is not None and done.matches
        await until(lambda: len(seen) == 2)
        assert await cache.read(version, 0, len(data)) == data

    run_engine(cache, body)
    assert seen == [True, True], "the waiter was woken only after the rider's work"


def test_a_write_whose_eviction_failed_has_the_disk_asked_again(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 5, the in-daemon path: a block write that evicts first and fails
    (a full or failing disk) has the next reservation ask the disk, not the count."""
    monkeypatch.setattr(ledger, "FREE_SAMPLE_SECONDS", 3600.0)
    store = make_store(bucket, tmp_path)
    first, first_data = put_object(bucket, store, "one", BS + 7)
    second, second_data = put_object(bucket, store, "two", BS)  # one block: one write
    cache = engine_cache(store, tmp_path / "c", workers=0)
    fetcher = cache._fetcher

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "the cache disk failed")

    async def body() -> None:
        assert await cache.read(first, 0, len(first_data)) == first_data
        await until(lambda: cache.missing_blocks(first) == [])  # written after the read
        bounds = CountingBounds(fetcher.bounds.cache_dir, cache.ledger.used + BS // 2, 0)
        fetcher.bounds = bounds
        monkeypatch.setattr(fetcher.disk, "write_block", broken)
        assert await cache.read(second, 0, len(second_data)) == second_data
        await until(lambda: cache.stats.counts["disk_errors"] >= 1)
        asked = len(bounds.calls)
        cache.ledger.reserve(0, bounds)
        assert len(bounds.calls) == asked + 1

    run_engine(cache, body)


def test_a_block_written_in_the_daemon_while_a_bulk_commit_fails_survives_a_restart(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leftover of review finding 1: a bulk job's object record made at accept, a block of
    the same object written by the in-daemon path (a read) before the job's commit, which
    then fails. The record is kept (it has that block); its block row had no object row,
    so the next start dropped it and swept the file, unless the in-daemon write wrote the
    object row itself (`Record.indexed`)."""
    store = make_store(bucket, tmp_path)
    version, data = put_object(bucket, store, "one", 2 * BS + 7)
    cache = engine_cache(store, tmp_path / "c")

    async def read_last_block() -> None:  # the in-daemon path: a read's GET, then its write
        assert await cache.read(version, 2 * BS, 7) == data[2 * BS :]
        await until(lambda: cache.ledger.has_block(version.oid, 2))

    def failing(rows: list[object]) -> list[bool]:  # in the commit's thread call
        trio.from_thread.run(read_last_block)
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(cache.bulk.disk, "index_written", failing)

    async def body() -> None:
        assert await cache.bulk.fetch(version, range(2), None) is None  # not indexed
        assert cache.missing_blocks(version) == [0, 1]
        await cache.drain()

    run_engine(cache, body)
    cache.close()
    again = engine_cache(store, tmp_path / "c")
    try:
        assert again.missing_blocks(version) == [0, 1]

        async def read() -> None:
            assert await again.read(version, 2 * BS, 7) == data[2 * BS :]

        run_engine(again, read)
    finally:
        again.close()


def test_a_block_written_after_its_objects_first_write_failed_survives_a_restart(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-daemon path alone: the write that made the object's record failed (its object
    row with it), the record stayed; the next block written needs the object row too."""
    store = make_store(bucket, tmp_path)
    version, data = put_object(bucket, store, "one", BS + 7)
    cache = engine_cache(store, tmp_path / "c", workers=0)
    write_block = cache._fetcher.disk.write_block
    calls: list[int] = []

    def first_fails(*args: Any) -> None:
        calls.append(args[1])
        if len(calls) == 1:
            raise OSError(errno.EIO, "the cache disk failed")
        write_block(*args)

    monkeypatch.setattr(cache._fetcher.disk, "write_block", first_fails)

    async def body() -> None:
        assert await cache.read(version, 0, 10) == data[:10]
        await until(lambda: cache.stats.counts["disk_errors"] == 1)
        assert await cache.read(version, BS, 7) == data[BS:]
        await until(lambda: cache.ledger.has_block(version.oid, 1))
        assert cache.missing_blocks(version) == [0]

    run_engine(cache, body)
    cache.close()
    assert calls == [0, 1]
    again = engine_cache(store, tmp_path / "c", workers=0)
    try:
        assert again.missing_blocks(version) == [0]
    finally:
        again.close()

"""The bulk path (issue 12): prefetch runs in worker processes, the daemon indexes and pins.

Real mounts, a real S3 server behind a proxy that counts GETs per key, can hold
the GETs of chosen keys until the test lets them go, and lies (`tests.faultproxy`).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from s3cachefs.cli.locals3 import LocalS3
from tests.conftest import Bucket, Mount, Mounter, drop_page_cache, run_cli, s3cachefs_cmd
from tests.faultproxy import FaultProxy
from tests.test_prefetch import check_tree, fill, prefetch

WORKER = "s3cachefs.cache.bulkworker"


class GateProxy(FaultProxy):
    """Counts object GETs per key; holds those of ``held`` keys until ``gate`` opens.

    Lies are told only to object GETs (not listings, not HEADs).
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.gets: Counter[str] = Counter()
        self.held: set[str] = set()
        self.gate = threading.Event()
        self.methods = {"GET"}

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        if req.command == "GET" and "list-type" not in req.path:
            key = unquote(urlsplit(req.path).path).split("/", 2)[2]
            with self._lock:
                self.gets[key] += 1
            if key in self.held:
                self.gate.wait(60)
        super().handle(req)

    def _draw(self, method: str, applicable: frozenset[str] = frozenset()) -> str:
        if "listing_etag" in applicable:  # a listing: always the truth here
            return "ok"
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


def status(mount: Mount) -> dict[str, object]:
    result = run_cli("status", str(mount.path), "--json")
    assert result.returncode == 0, result.stderr
    cache: dict[str, object] = json.loads(result.stdout)["cache"]
    return cache


def test_a_read_waits_for_the_worker_job_that_fetches_its_block(
    bucket: Bucket, mounter: Mounter, gate_proxy: GateProxy
) -> None:
    """Single flight across processes: a foreground read of a block a worker is
    fetching waits for that job; the server sees one GET of the object."""
    files = fill(bucket, count=6)
    big = "dataset-v3/archive/big.tar"
    mount = mounter(bucket.name, "--no-kernel-serve-pinned", server=gate_proxy)
    gate_proxy.held = {big}
    job = start_prefetch(mount)
    wait_for("the worker's GET of the big object", lambda: gate_proxy.gets[big] == 1)
    assert workers_of(mount.proc.pid), "the prefetch did not go through worker processes"
    misses = int(str(status(mount)["misses"]))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((mount.path / big).read_bytes()))
    reader.start()
    wait_for("the read to wait in the daemon", lambda: int(str(status(mount)["misses"])) > misses)
    gate_proxy.gate.set()
    reader.join(60)
    assert got == [files[big]]
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
    assert status(mount)["pinned_bytes"] == sum(map(len, files.values()))
    drop_page_cache()
    check_tree(mount, files)


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
    job = start_prefetch(mount)
    wait_for("the worker's GET of the small object", lambda: gate_proxy.gets[small] == 1)
    assert workers_of(mount.proc.pid), "the prefetch did not go through worker processes"
    misses = int(str(status(mount)["misses"]))
    got: list[bytes | OSError] = []

    def read() -> None:
        try:
            got.append((mount.path / small).read_bytes())
        except OSError as exc:
            got.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    wait_for("the read to wait in the daemon", lambda: int(str(status(mount)["misses"])) > misses)
    gate_proxy.gate.set()
    reader.join(60)
    assert len(got) == 1
    if isinstance(got[0], OSError):
        assert got[0].errno == errno.EIO, got[0]
    else:
        assert got[0] == files[small], "the read got bytes that are not S3's"
    code, err = finish(job)
    assert code == 4, err
    assert gate_proxy.faults["flip_byte"] > 0
    assert status(mount)["pinned_bytes"] == 0
    gate_proxy.rates["flip_byte"] = 0.0
    again = prefetch(mount, "dataset-v3")
    assert again.returncode == 0, again.stderr
    assert status(mount)["pinned_bytes"] == sum(map(len, files.values()))
    drop_page_cache()
    check_tree(mount, files)

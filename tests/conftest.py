"""Fixtures: a real S3 server on loopback (moto, counting requests) and real FUSE mounts.

boto3 is never patched: the daemon and the test talk HTTP to the server.
Mounts run ``s3cachefs mount --foreground`` in a subprocess, so a kernel or
daemon hang fails one test instead of hanging pytest; teardown always
unmounts, lazily as the fallback.
"""

from __future__ import annotations

import compileall
import concurrent.futures
import contextlib
import importlib.util
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import boto3
import pytest

import s3cachefs
from s3cachefs.base.config import MountConfig
from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.daemon.holders import holders
from s3cachefs.daemon.mountpoint import mount_at
from s3cachefs.datasets.binds import mounts_below
from s3cachefs.store import s3 as store_s3
from s3cachefs.store.s3 import S3Store
from tests.faultproxy import FaultProxy

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_bucket_ids = itertools.count()
# Where a daemon that did not exit after its unmount leaves its log and stacks.
SLOW_EXITS = Path(os.environ.get("TMPDIR", "/tmp")) / "s3cachefs-tests-slow-exits.log"

# A shell's `cmd &` (and some CI runners) starts pytest with SIGINT ignored, and every
# child would inherit that: the Ctrl-C tests would then wait on a client that never
# hears it. Children of a handled signal get the default on exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def bytecode() -> None:
    """The project's modules compiled once, up front, for every process the tests start.

    With PYTHONDONTWRITEBYTECODE set (this machine's shells have it), nothing
    writes them otherwise: every daemon, bulk worker and CLI run compiled the project's
    ~250 modules from source again (0.15 s of CPU in a daemon's 0.65 s start). A .pyc
    that is up to date is left as it is; it only changes how fast the code loads.
    """
    folders = list(s3cachefs.__path__)
    for folder in Path(__file__).parent.parent.iterdir():  # each is s3cachefs.<folder>
        if folder.is_dir() and folder.name.isidentifier():
            spec = importlib.util.find_spec(f"s3cachefs.{folder.name}")
            folders += spec.submodule_search_locations or [] if spec else []
    for path in folders:
        compileall.compile_dir(path, maxlevels=0, quiet=1)


@pytest.fixture(scope="session")
def s3_server(aws_env: None) -> Iterator[LocalS3]:
    server = LocalS3().start()
    yield server
    server.stop()


class Bucket:
    """A fresh bucket on the test server, with helpers to fill it."""

    def __init__(self, server: LocalS3, name: str) -> None:
        self.server = server
        self.name = name
        self.client: Any = boto3.client("s3", endpoint_url=server.endpoint_url)
        self.client.create_bucket(Bucket=name)

    def put(self, key: str, data: bytes) -> str:
        return str(self.client.put_object(Bucket=self.name, Key=key, Body=data)["ETag"])

    def put_many(self, objects: dict[str, bytes]) -> dict[str, str]:
        """Every object, 16 PUTs at a time (one by one, a 1,000-key fixture takes seconds)."""
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            etags = pool.map(lambda item: self.put(*item), objects.items())
            return dict(zip(objects, etags, strict=True))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


@pytest.fixture
def bucket(s3_server: LocalS3) -> Bucket:
    made = Bucket(s3_server, f"bucket-{os.getpid()}-{next(_bucket_ids)}")
    s3_server.reset()  # each test counts only its own requests
    return made


def s3cachefs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "s3cachefs", *args]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        s3cachefs_cmd(*args), capture_output=True, text=True, timeout=90, env=env, check=False
    )


def mount_cli(
    bucket: Bucket,
    mnt: Path,
    cache: Path,
    *extra: str,
    target: str | None = None,
    env: dict[str, str] | None = None,
    endpoint: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``s3cachefs mount`` in the background, as a user types it."""
    return run_cli(
        "mount",
        target or bucket.name,
        str(mnt),
        "--endpoint-url",
        endpoint or bucket.server.endpoint_url,
        "--cache-dir",
        str(cache),
        *extra,
        env=env,
    )


class Endpoint(Protocol):
    endpoint_url: str


class Mount:
    """One ``s3cachefs mount --foreground`` daemon and its mountpoint."""

    def __init__(
        self,
        server: Endpoint,
        target: str,
        path: Path,
        cache_dir: Path,
        log: Path,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.cache_dir = cache_dir
        self.log = log
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)  # a stale mount: the daemon cleans it
        # Readiness the way systemd hears it: READY=1 on a notify socket.
        notify_path = str(log.with_suffix(".notify"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        with log.open("ab") as log_out:
            self.proc = subprocess.Popen(
                s3cachefs_cmd(
                    "mount",
                    target,
                    str(path),
                    "--foreground",
                    "--endpoint-url",
                    server.endpoint_url,
                    "--cache-dir",
                    str(cache_dir),
                    "--log-level",
                    "debug",
                    *extra,
                ),
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, NOTIFY_SOCKET=notify_path),
            )
        try:
            notify.settimeout(0.1)
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(4096):
                        break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"mount failed:\n{log.read_text()}")
        finally:
            notify.close()
        # Ours, read before the kernel-serve binds go on it (READY comes first).
        entry = mount_at(os.path.realpath(path))
        self.entry = entry if entry is not None and entry.fstype.startswith("fuse") else None

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int | None:
        """Unmount (lazily if it must) and reap the daemon; returns its exit code."""
        if os.path.ismount(self.path) or _stale(self.path):
            result = subprocess.run(
                ["fusermount3", "-u", str(self.path)], capture_output=True, check=False
            )
            if result.returncode != 0:  # busy, or binds of kernel-served datasets on it
                result = subprocess.run(
                    ["umount", "-R", str(self.path)], capture_output=True, check=False
                )
            if result.returncode != 0:
                subprocess.run(
                    ["fusermount3", "-uz", str(self.path)], capture_output=True, check=False
                )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.proc.wait(timeout=0.5)
            self._stop_if_held_elsewhere()
        # A daemon that outlives its mount: keep its stacks.
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        with SLOW_EXITS.open("a") as out:
            tail = self.log_text()[-20000:]
            out.write(f"== {self.path}: no exit 30 s after unmount\n{tail}\n")
        self.proc.kill()
        self.proc.wait()
        return None

    def _stop_if_held_elsewhere(self) -> None:
        """SIGTERM a daemon whose mount another mount namespace still holds a copy of.

        A namespace made while this mount existed (``unshare -m``, a container starting:
        another test run on this machine) keeps the FUSE connection alive after our
        unmount, and the daemon rightly goes on serving it (daemon.holders): waiting for
        it to exit would wait out the timeout. A daemon no one holds is still waited for.
        """
        if self.entry is None or self.proc.poll() is not None:
            return
        held = [h for h in holders(self.entry, str(self.path)) if h.namespace != "this namespace"]
        if held:
            with SLOW_EXITS.open("a") as out:
                out.write(f"== {self.path}: held by {held[0].describe()}; SIGTERM\n")
            self.proc.send_signal(signal.SIGTERM)
            self.entry = None  # once

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _stale(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError:
        return True
    return False


class Mounter:
    def __init__(self, server: LocalS3, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.mounts: list[Mount] = []

    def __call__(
        self,
        target: str,
        *extra: str,
        cache_dir: Path | None = None,
        name: str = "mnt",
        server: Endpoint | None = None,
    ) -> Mount:
        mount = Mount(
            server or self.server,
            target,
            self.tmp_path / name,
            cache_dir or self.tmp_path / "cache",
            self.tmp_path / f"{name}.log",
            extra,
        )
        self.mounts.append(mount)
        return mount

    def close(self) -> None:
        for mount in self.mounts:
            with contextlib.suppress(Exception):
                mount.stop()


@pytest.fixture
def mounter(s3_server: LocalS3, tmp_path: Path) -> Iterator[Mounter]:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.fail("these tests need root and /dev/fuse (see README, Tests)")
    m = Mounter(s3_server, tmp_path)
    yield m
    m.close()
    leaked = mounts_below(tmp_path)
    if leaked:  # clean up for the next test, then fail this one
        for entry in reversed(leaked):
            subprocess.run(["umount", "-l", entry.mount_point], capture_output=True, check=False)
        pytest.fail(f"mounts left behind: {[e.mount_point for e in leaked]}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small filesystem of its own at ``path`` (made here): no other process's writes
    change its free space; unmounted whatever happens."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.fixture
def proxy(s3_server: LocalS3) -> Iterator[FaultProxy]:
    """The fault-injecting proxy in front of the test server (every fault off to start)."""
    p = FaultProxy(s3_server.endpoint_url).start()
    yield p
    p.stop()


def make_store(
    bucket: Bucket, tmp_path: Path, endpoint: str | None = None, etag_md5: str = "auto"
) -> S3Store:
    config = MountConfig(
        bucket=bucket.name,
        prefix="",
        mountpoint=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        endpoint_url=endpoint or bucket.server.endpoint_url,
        etag_md5=etag_md5,
    )
    store = S3Store(config)
    store.check_bucket()
    return store


@pytest.fixture(params=["lean", "botocore"])
def lying_store(
    request: pytest.FixtureRequest,
    bucket: Bucket,
    tmp_path: Path,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> S3Store:
    if request.param == "botocore":  # what a proxy in the environment selects
        monkeypatch.setattr(store_s3, "proxy_applies", lambda url: True)
    store = make_store(bucket, tmp_path, proxy.endpoint_url)
    assert (store._getter is not None) == (request.param == "lean")
    return store


def status(mount: Mount) -> dict[str, Any]:
    """``s3cachefs status --json`` of a mount."""
    result = run_cli("status", str(mount.path), "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def manifest_checks(cache_dir: Path) -> dict[str, str]:
    """Key -> the kind of end-to-end check its prefetch manifest records."""
    checks: dict[str, str] = {}
    for path in (cache_dir / "v1" / "pins").glob("*.json"):
        checks.update({k: v[0] for k, v in json.loads(path.read_text())["checks"].items()})
    return checks


def read_at(path: Path, offset: int, length: int) -> bytes | int:
    """``length`` bytes at ``offset`` from a fresh open, or the errno the read failed with."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return exc.errno or -1
    try:
        return os.pread(fd, length, offset)
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(fd)

"""The bulk workers (issue 12): two start with the daemon, so a prefetch does not wait
for them, the rest on its first job; their lean SigV4 signs as botocore does and as a
server checks it; they import no botocore (the daemon sends them frozen credentials),
see none of the daemon's secrets, and hand a job whose credentials expired back.

A worker takes 0.4-1.0 s to start (its imports) on a loaded 2-core machine,
which a prefetch started on the first job used to wait for after its listing.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import boto3
import pytest
import trio
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from s3cachefs.base.config import MountConfig
from s3cachefs.base.values import cpu_quota, usable_cpus, workers
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.bulkpool import WorkerPool, worker_env
from s3cachefs.cache.bulksign import GetSigner, Secrets, signed_host
from s3cachefs.cache.bulkwire import Channel
from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.store.rangeget import RangeGetter
from s3cachefs.store.retry import RetryPolicy
from s3cachefs.testing.memorystore import MemoryStore
from tests import sigv4check
from tests.conftest import CREDENTIALS, Bucket, Mounter, drop_page_cache
from tests.faultproxy import FaultProxy
from tests.test_bulk import (
    GateProxy,
    alive,
    finish,
    start_prefetch,
    wait_for,
    workers_of,
)
from tests.test_prefetch import check_tree, fill, prefetch

SECRETS = {CREDENTIALS["AWS_ACCESS_KEY_ID"]: CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture
def held_proxy(s3_server: LocalS3) -> Iterator[GateProxy]:
    """`tests.test_bulk.GateProxy`: holds the GETs of chosen keys until its gate opens."""
    proxy = GateProxy(s3_server.endpoint_url)
    proxy.start()
    yield proxy
    proxy.gate.set()
    proxy.stop()


@dataclass
class Server:
    endpoint_url: str


def started(mount_log: str) -> int:
    """How many bulk workers the daemon started."""
    return len(re.findall(r"bulk worker pid=\d+ started", mount_log))


def bulk_gets(proxy: FaultProxy) -> int:
    """The object GETs of the bulk workers (http.client: no User-Agent; boto3's has one)."""
    return proxy.get_agents[""]


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_workers_run_before_any_prefetch_and_serve_it(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, "--prefetch-workers", "2", server=proxy)
    wait_for("two bulk workers, no prefetch yet", lambda: len(workers_of(mount.proc.pid)) == 2)
    before = sorted(workers_of(mount.proc.pid))
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert bulk_gets(proxy) > 0  # the workers served it, not the daemon
    assert sorted(workers_of(mount.proc.pid)) == before  # the same two served it
    assert mount.log_text().count("bulk worker pid=") == 2  # none started for the job
    for pid in before:  # the credential chain (botocore, awscrt) stays in the daemon
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "_awscrt" not in maps and "botocore" not in maps
    drop_page_cache()
    check_tree(mount, files)
    mount.stop()
    wait_for("the workers to exit with the daemon", lambda: not any(alive(p) for p in before))
    # A clean unmount: each worker exits on its socket's EOF, nothing to warn about.
    warnings = [
        ln for ln in mount.log_text().splitlines() if "WARNING" in ln and "bulk worker" in ln
    ]
    assert warnings == []
    assert mount.log_text().count("stopped (status 0)") == 2


def test_prefetch_workers_8_start_two_with_the_mount_the_rest_on_the_first_prefetch(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    """A mount that never prefetches keeps two (``auto`` on a 96-core node was 96 at
    mount: 1.3 GiB); they are niced and see none of the daemon's AWS secrets."""
    files = fill(bucket, count=12)
    mount = mounter(bucket.name, "--prefetch-workers", "8", server=proxy)
    # The boot workers start before the daemon says it is ready: none are on their way.
    assert len(workers_of(mount.proc.pid)) == 2
    assert started(mount.log_text()) == 2
    for pid in workers_of(mount.proc.pid):
        # Niced as its first step (before its imports: not seen from here).
        niced = min(19, nice_of(mount.proc.pid) + 5)
        wait_for("the worker to nice itself", lambda p=pid, n=niced: nice_of(p) == n)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0] for entry in environ if entry}
        assert not any(name.startswith(b"AWS_") for name in names), names
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert len(workers_of(mount.proc.pid)) == 8
    assert started(mount.log_text()) == 8
    assert bulk_gets(proxy) > 0
    drop_page_cache()
    check_tree(mount, files)


def test_a_worker_that_dies_idle_is_replaced_for_the_next_prefetch(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, "--prefetch-workers", "2", server=proxy)
    wait_for("two bulk workers", lambda: len(workers_of(mount.proc.pid)) == 2)
    dead = workers_of(mount.proc.pid)[0]
    os.kill(dead, 9)
    wait_for("the worker to die", lambda: not alive(dead))
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    log = mount.log_text()
    assert f"bulk worker pid={dead} ended (status -9)" in log
    assert dead not in workers_of(mount.proc.pid)
    assert len(workers_of(mount.proc.pid)) == 2
    assert started(log) == 3  # its replacement
    assert bulk_gets(proxy) > 0  # and the workers served the prefetch
    drop_page_cache()
    check_tree(mount, files)


@pytest.mark.parametrize("host", ["127.0.0.1", "LOCALHOST"])
def test_a_prefetch_through_the_workers_against_a_server_that_verifies_signatures(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy, host: str
) -> None:
    """The workers' requests as a server checks them. An endpoint written in capitals:
    the Host header sent must be the host signed (lowercase), or MinIO answers
    SignatureDoesNotMatch and the prefetch fails."""
    files = fill(bucket, count=4)
    proxy.verify_secrets = dict(SECRETS)
    endpoint = proxy.endpoint_url.replace("127.0.0.1", host)
    mount = mounter(bucket.name, "--prefetch-workers", "2", server=Server(endpoint))
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert proxy.faults["SignatureDoesNotMatch"] == 0
    assert bulk_gets(proxy) > 0
    drop_page_cache()
    check_tree(mount, files)


@dataclass
class IamS3:
    endpoint_url: str
    access_key: str
    secret_key: str


@pytest.fixture
def iam_s3(tmp_path: Path) -> Iterator[IamS3]:
    """A moto server of its own that authenticates every request (IAM on: its SigV4
    check of the request as it arrived), and the access key of a user allowed s3:*."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # the 3 IAM calls below
    with (tmp_path / "moto.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("the moto server", lambda: _listening(port))
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1")
        iam.create_user(UserName="prefetcher")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [allow]})
        iam.put_user_policy(UserName="prefetcher", PolicyName="s3", PolicyDocument=policy)
        key = iam.create_access_key(UserName="prefetcher")["AccessKey"]
        yield IamS3(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.kill()
        server.wait()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.1", "LOCALHOST"])
def test_a_prefetch_through_the_workers_against_moto_checking_signatures(
    mounter: Mounter, iam_s3: IamS3, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """End to end against a server that verifies SigV4 itself (moto with IAM on),
    the lean signer's real guard."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_s3.secret_key)
    s3 = boto3.client(
        "s3",
        endpoint_url=iam_s3.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=iam_s3.access_key,
        aws_secret_access_key=iam_s3.secret_key,
    )
    s3.create_bucket(Bucket="signed")
    names = [f"dataset-v3/{'a b+ü~' if i % 2 else 'x'}/page-{i}.bin" for i in range(4)]
    files = {name: os.urandom(50_000 + i) for i, name in enumerate(names)}
    for key, data in files.items():
        s3.put_object(Bucket="signed", Key=key, Body=data)
    endpoint = iam_s3.endpoint_url.replace("127.0.0.1", host)
    mount = mounter("signed", "--prefetch-workers", "2", server=Server(endpoint))
    assert len(workers_of(mount.proc.pid)) == 2
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    drop_page_cache()
    check_tree(mount, files)


def test_a_server_that_verifies_signatures_refuses_a_wrong_one(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    """The check above can fail: signed with another secret, nothing passes."""
    fill(bucket, count=2)
    mount = mounter(bucket.name, "--prefetch-workers", "2", server=proxy)
    proxy.verify_secrets = {CREDENTIALS["AWS_ACCESS_KEY_ID"]: "another-secret"}
    result = prefetch(mount, "dataset-v3")
    assert result.returncode != 0
    assert proxy.faults["SignatureDoesNotMatch"] > 0


def _credential_process(tmp_path: Path, token_file: Path) -> Path:
    """An AWS config whose credentials come from a process, the session token read from
    ``token_file``, expiring in 5 minutes: botocore refreshes them on every use."""
    script = tmp_path / "credentials.py"
    script.write_text(
        "import datetime, json, pathlib\n"
        "expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': "
        f"{CREDENTIALS['AWS_ACCESS_KEY_ID']!r}, 'SecretAccessKey': "
        f"{CREDENTIALS['AWS_SECRET_ACCESS_KEY']!r}, "
        f"'SessionToken': pathlib.Path({str(token_file)!r}).read_text(), "
        "'Expiration': expires.strftime('%Y-%m-%dT%H:%M:%SZ')}))\n"
    )
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    return config


def test_a_worker_job_whose_credentials_expired_runs_in_the_daemon(
    bucket: Bucket,
    mounter: Mounter,
    held_proxy: GateProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker signs with the credentials it was sent; they rotate while its GET is
    on its way, and the server answers ExpiredToken: the daemon runs the job with the
    fresh ones (it was an AccessDenied, not retried: the prefetch failed)."""
    files = fill(bucket, count=4)
    big = "dataset-v3/archive/big.tar"
    token = tmp_path / "token"
    token.write_text("token-1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(_credential_process(tmp_path, token)))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    mount = mounter(bucket.name, "--prefetch-workers", "2", server=held_proxy)
    held_proxy.held = {big}
    job = start_prefetch(mount)
    try:
        wait_for("the worker's GET of the big object", lambda: held_proxy.gets[big] == 1)
        token.write_text("token-2")
        held_proxy.expired_tokens = {"token-1"}
    finally:
        held_proxy.gate.set()
    code, err = finish(job)
    assert code == 0, err
    assert held_proxy.faults["ExpiredToken"] > 0
    assert held_proxy.gets[big] == 2  # once by the worker (refused), once by the daemon
    drop_page_cache()
    check_tree(mount, files)


KEYS = [
    "dir/a  b+ü~(1).bin",
    "a b/c",
    "+ ~ = %/x%2Fy.bin",
    "dir//double//slash",
    "データ/é/ñ.png",
    "k" * 1024,
]


def botocore_headers(
    url: str, path: str, headers: dict[str, str], creds: Credentials, now: datetime.datetime
) -> dict[str, str]:
    split = urllib.parse.urlsplit(url)
    request = AWSRequest(
        method="GET", url=f"{split.scheme}://{split.netloc}{path}", headers=headers
    )
    # `add_auth`'s steps at a chosen time (it reads the clock itself).
    auth: Any = S3SigV4Auth(creds.get_frozen_credentials(), "s3", "eu-west-3")
    request.context["timestamp"] = now.strftime("%Y%m%dT%H%M%SZ")
    auth._modify_request_before_signing(request)
    to_sign = auth.string_to_sign(request, auth.canonical_request(request))
    auth._inject_signature_to_request(request, auth.signature(to_sign, request))
    return dict(request.headers.items())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/bucket/",
        "https://s3.eu-west-3.amazonaws.com/bucket/",
        "https://Bucket.S3.Example.com:443/",
        "http://[::1]:8080/bucket/",
    ],
)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEB4aDPq+/token=="])
@pytest.mark.parametrize("key", KEYS)
def test_the_workers_signer_signs_a_get_as_botocore_does(
    url: str, token: str | None, key: str
) -> None:
    frozen = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    path = urllib.parse.urlsplit(url).path + urllib.parse.quote(key, safe="/~")
    headers = {"Range": "bytes=1048576-2097151", "If-Match": '"9b2cf535f27731c974343645a3985328"'}
    signer = GetSigner(signed_host(url), "eu-west-3")
    secrets = Secrets(frozen.access_key, frozen.secret_key, frozen.token)
    rotated = Credentials("AKIDOTHER", "another/secret+key", token)
    # The day's key is kept: signing across midnight, and after a rotation, must not reuse it.
    times = [datetime.datetime(2026, 11, 30, 23, 59, 59), datetime.datetime(2026, 12, 1, 0, 0, 1)]
    for now in times:
        theirs = botocore_headers(url, path, headers, frozen, now)
        assert signer.sign(path, headers, secrets, now) == theirs
        assert signer.sign(path, headers, secrets, now) == theirs
        other = Secrets(rotated.access_key, rotated.secret_key, rotated.token)
        assert signer.sign(path, headers, other, now) == botocore_headers(
            url, path, headers, rotated, now
        )


def test_the_workers_signer_signs_in_utc_whatever_the_time_zone() -> None:
    secrets = Secrets("AKIDEXAMPLE", "secret", None)
    signer = GetSigner("127.0.0.1:9000", "us-east-1")
    utc = datetime.datetime(2026, 12, 1, 0, 30, tzinfo=datetime.UTC)
    paris = utc.astimezone(datetime.timezone(datetime.timedelta(hours=1)))  # 01:30 the 1st
    new_york = utc.astimezone(datetime.timezone(datetime.timedelta(hours=-5)))  # the 30th
    expected = signer.sign("/b/k", {}, secrets, utc)
    assert expected["X-Amz-Date"] == "20261201T003000Z"
    assert signer.sign("/b/k", {}, secrets, paris) == expected
    assert signer.sign("/b/k", {}, secrets, new_york) == expected


def test_the_signature_check_of_the_test_server_can_fail() -> None:
    """`tests.sigv4check` accepts what botocore signs, and nothing else."""
    creds = Credentials("AKIDEXAMPLE", "secret/key+1", "tok")
    now = datetime.datetime(2026, 11, 30, 12, 0, 0)
    path = "/bucket/" + urllib.parse.quote(KEYS[0], safe="/~")
    url = "http://localhost:9000/bucket/"
    signed = botocore_headers(url, path, {"Range": "bytes=0-9"}, creds, now)
    sent = [("Host", "localhost:9000"), *signed.items()]
    secrets = {"AKIDEXAMPLE": "secret/key+1"}
    assert sigv4check.valid("GET", path, sent, secrets)
    assert not sigv4check.valid("GET", path, sent, {"AKIDEXAMPLE": "secret/key+2"})
    assert not sigv4check.valid("GET", path, [("Host", "LOCALHOST:9000"), *sent[1:]], secrets)
    assert not sigv4check.valid("GET", path + "x", sent, secrets)
    assert not sigv4check.valid("HEAD", path, sent, secrets)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs: two workers, rounded up
        ("50000 100000\n", 1),
        ("100000 1000000\n", 1),
        ("", None),
        ("garbage 100000", None),
    ],
)
def test_the_cgroup_cpu_quota_is_read(text: str, cpus: int | None) -> None:
    assert cpu_quota(text) == cpus


def test_auto_workers_are_the_usable_cpus_capped_by_the_cgroup_quotas(tmp_path: Path) -> None:
    """``auto`` on a 2-CPU pod of a 96-core node: 2, not ``os.cpu_count()``."""
    own = Path("/proc/self/cgroup").read_text().splitlines()
    path = next((ln[3:] for ln in own if ln.startswith("0::")), "/").strip("/")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path)) == affinity  # no cpu.max: no quota
    cgroup = tmp_path / path
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # a parent's quota applies too
    assert usable_cpus(str(tmp_path)) == 1
    assert workers("auto") == usable_cpus()
    assert workers("3") == 3


def _own_cgroup(tmp_path: Path, text: str) -> str:
    own = tmp_path / "self-cgroup"
    own.write_text(text)
    return str(own)


@pytest.mark.parametrize(
    ("line", "mount"),
    [
        ("2:cpu,cpuacct:/kubepods/burstable/pod1/c1", "cpu,cpuacct"),  # EKS AL2, RHEL 8
        ("1:cpu:/kubepods/burstable/pod1/c1", "cpu"),  # cpu and cpuacct apart (this machine)
    ],
)
def test_auto_workers_are_capped_by_a_cgroup_v1_cpu_quota(
    tmp_path: Path, line: str, mount: str
) -> None:
    """A --cpus=1 container on a cgroup v1 node: 1 worker, not one per core of the node."""
    own = _own_cgroup(tmp_path, f"4:memory:/kubepods/burstable/pod1/c1\n{line}\n0::/\n")
    affinity = len(os.sched_getaffinity(0))
    assert affinity > 1  # or a quota of 1 would not show
    assert usable_cpus(str(tmp_path), own) == affinity  # no cgroup files: no quota

    def quota(path: Path, cpus: float) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "cpu.cfs_quota_us").write_text(f"{int(cpus * 100000) or -1}\n")
        (path / "cpu.cfs_period_us").write_text("100000\n")

    cgroup = tmp_path / mount / "kubepods/burstable/pod1/c1"
    quota(cgroup, 0)  # -1: no quota
    assert usable_cpus(str(tmp_path), own) == affinity
    quota(cgroup.parent, 1)  # a parent's quota applies too
    assert usable_cpus(str(tmp_path), own) == 1
    quota(cgroup.parent, 0)
    quota(tmp_path / mount, 0.5)  # a container's view: its own cgroup is the root
    assert usable_cpus(str(tmp_path), own) == 1
    # The memory controller's files are no CPU quota.
    quota(tmp_path / mount, 0)
    quota(tmp_path / "memory", 1)
    assert usable_cpus(str(tmp_path), own) == affinity


@pytest.mark.parametrize("line", ["0::/../../other/c2", "3:cpu,cpuacct:/../other/c2"])
def test_a_cgroup_path_outside_the_namespace_gives_no_quota(tmp_path: Path, line: str) -> None:
    """``..``: our cgroup is above the namespace's root; dropping the ``..`` read another
    cgroup's quota."""
    own = _own_cgroup(tmp_path, line + "\n")
    for mount in ("", "cpu,cpuacct"):
        other = tmp_path / mount / "other/c2"
        other.mkdir(parents=True)
        (other / "cpu.max").write_text("100000 100000\n")
        (other / "cpu.cfs_quota_us").write_text("100000\n")
        (other / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(str(tmp_path), own) == len(os.sched_getaffinity(0)) > 1


def test_a_worker_gets_the_daemons_absolute_sys_path(tmp_path: Path) -> None:
    """A daemon that found its packages on PYTHONPATH or in a user site (``pip --user``):
    its ``-P -c`` workers must find them too, or every one dies at its imports. An empty
    or relative entry would put the worker's cwd back on its path (what ``-P`` is for)."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "only_here.py").write_text("")
    environ = {"PATH": "/usr/bin", "HOME": "/home/u", "PYTHONUSERBASE": "/opt/py"}
    environ |= {"PYTHONNOUSERSITE": "1", "AWS_SECRET_ACCESS_KEY": "s", "PYTHONPATH": "rel"}
    env = worker_env(environ, ["", "rel/dir", *sys.path, str(extra), str(extra)])
    assert env["PYTHONPATH"].split(os.pathsep) == [p for p in sys.path if p] + [str(extra)]
    assert {k: env[k] for k in ("HOME", "PYTHONUSERBASE", "PYTHONNOUSERSITE")} == {
        "HOME": "/home/u",
        "PYTHONUSERBASE": "/opt/py",
        "PYTHONNOUSERSITE": "1",
    }
    assert "AWS_SECRET_ACCESS_KEY" not in env
    # Launched as a worker is (-P -c), from a cwd with a module of the same name.
    (tmp_path / "here.py").write_text("")
    probe = "import only_here, sys; print(sys.path.count(''))\ntry:\n import here\n"
    probe += "except ImportError:\n print('no cwd')"
    env["PATH"] = os.environ["PATH"]
    result = subprocess.run(
        [sys.executable, "-P", "-c", probe],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["0", "no", "cwd"]


@pytest.mark.parametrize(("workers", "concurrency", "size"), [(8, 4, 2), (8, 64, 8), (3, 4, 2)])
def test_the_pool_is_no_bigger_than_a_prefetchs_jobs(
    tmp_path: Path, workers: int, concurrency: int, size: int
) -> None:
    """A prefetch has at most ``prefetch_jobs`` (half of --s3-concurrency) GETs out:
    more workers than that would idle (``auto`` on a 96-core node, 32 jobs)."""
    config = MountConfig(
        bucket="b",
        prefix="",
        mountpoint=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        s3_concurrency=concurrency,
        prefetch_workers=workers,
    )
    cache = BlockCache.from_config(
        config,
        MemoryStore(),
        s3_limiter=trio.CapacityLimiter(1),
        disk_limiter=trio.CapacityLimiter(1),
    )
    assert cache.bulk.pool.size == size
    assert cache.bulk.pool.size * cache.bulk.pool.threads >= config.prefetch_jobs


def _pool(size: int) -> WorkerPool:
    getter = RangeGetter(
        base_url="http://127.0.0.1:9/bucket/",
        region="us-east-1",
        credentials=None,
        ca_bundle=None,
        max_connections=1,
        connect_timeout=1,
        read_timeout=1,
        retry=RetryPolicy(1),
    )

    return WorkerPool(
        size=size,
        threads=1,
        getter=lambda: getter,
        on_batch=lambda _: None,
        on_lost=lambda _: None,
        on_unsent=lambda _job, _error: None,
    )


def test_workers_that_cannot_start_at_boot_are_tried_again_on_the_first_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawn failure at the daemon's start (EAGAIN, ENOMEM: maybe transient) is not
    final: the first job tries again (it used to leave prefetch in the daemon for good)."""
    pool = _pool(2)

    async def boot_then_job() -> list[int]:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with monkeypatch.context() as patch:  # exec fails: a real OSError from Popen
                patch.setattr(sys, "executable", str(tmp_path / "no-python"))
                assert not pool.ready(4096, boot=True)
            assert pool.ready(4096)
            pids = pool.pids
            nursery.cancel_scope.cancel()
        return pids

    pids = trio.run(boot_then_job)
    assert len(pids) == 2
    assert pool.pids == []  # stopped with the nursery
    assert not any(alive(pid) for pid in pids)


def test_workers_that_cannot_start_on_the_first_job_leave_the_boot_ones_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Growing past the boot workers on the first job fails (EAGAIN, a pids limit): the
    two healthy ones serve, the pool shrinks to them (it stopped them: all in the daemon)."""
    pool = _pool(4)

    async def boot_then_job() -> list[int]:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            assert pool.ready(4096, boot=True)
            boot = pool.pids
            with monkeypatch.context() as patch:  # exec fails: a real OSError from Popen
                patch.setattr(sys, "executable", str(tmp_path / "no-python"))
                assert pool.ready(4096)
                assert pool.pids == boot
                assert pool.ready(4096)  # no second try, no second warning
            nursery.cancel_scope.cancel()
        return boot

    with caplog.at_level(logging.WARNING, logger="s3cachefs.cache.bulkpool"):
        boot = trio.run(boot_then_job)
    assert len(boot) == 2
    assert pool.size == 2
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "bulk workers: 2 of 4 started"
    ]
    assert not any(alive(pid) for pid in boot)


def test_the_wire_carries_a_big_message_as_connection_frames_it() -> None:
    ours, theirs = socket.socketpair()
    conn = Connection(ours.detach())
    channel = Channel(theirs.detach())
    try:
        for size in (10, 16 * 1024, 16 * 1024 + 1, 3_000_000):
            message = {"size": size, "data": os.urandom(size)}
            sender = threading.Thread(target=channel.send, args=(message,))  # > socket buffer
            sender.start()
            assert conn.recv() == message
            sender.join()
            sender = threading.Thread(target=conn.send, args=(message,))
            sender.start()
            assert channel.recv() == message
            sender.join()
    finally:
        conn.close()
        channel.close()


def test_the_worker_imports_no_botocore_boto3_or_awscrt() -> None:
    """The daemon owns the credential chain and sends frozen credentials: a worker that
    imported botocore (its credential chain pulls awscrt, urllib3, ...) took ~0.3 s of
    CPU more to start."""
    heavy = ("botocore", "boto3", "awscrt", "_awscrt", "urllib3")
    code = (
        "import sys, s3cachefs.cache.bulkworker\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == []


def test_secrets_never_show_in_a_repr() -> None:
    secrets = Secrets("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token-xyz")
    assert "AKIDEXAMPLE" in repr(secrets)
    assert "wJalr" not in repr(secrets) and "token-xyz" not in repr(secrets)

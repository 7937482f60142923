"""The README's container deployment, run for real with podman.

Builds the project's Dockerfile on a registry-free base image (see
tests/containers.py), then runs the README's "In containers" block as written
(host paths mapped into a temporary directory, `docker` run as `podman`):
the node setup, the daemon container, the prefetch container; then two worker
containers with the README's worker volume read the dataset through the
propagated mount, byte-exact, and keep reading, without being restarted,
across a daemon restart and a daemon kill -9.

A second test runs the systemd units under a real systemd (PID 1 of a
container) on a node installed by `./quickstart install`, and uninstalls it.

A third brings deploy/compose.yaml up with docker-compose on a dockerd of its
own (MinIO swapped for a moto image by a test-only override): start order,
the mount on the host, the worker's bytes, a kill -9 of the daemon, `down -v`.
About 70 s the first time (images imported from podman, the moto image
built), 21 s later.

The first two took about 4 min the first time on this 2-core machine
(debootstrap and base image 75 s, project image 65 s, the node's install 45 s);
the image's passthrough build (libfuse 3.17 and the patched pyfuse3) adds a few
minutes to the first project image on a machine, then stays a cached layer until
packaging/ changes, and the systemd node reuses it (see SYSTEMD_CONTAINERFILE).
After a source edit, with those layers cached: project image 15 s, node image
21 s (it was 50 s before its slow steps got layers of their own).
`-m "not container"` skips them.
"""

from __future__ import annotations

import calendar
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CREDENTIALS, Bucket
from tests.containers import (
    APT_PACKAGES,
    PYTHON_IMAGE,
    Podman,
    apt_install_missing,
    containers_conf,
)

pytestmark = [pytest.mark.container, pytest.mark.exclusive, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
DAEMON = "s3cachefs"  # the README's container name
BUILD_STAGE_IMAGE = "localhost/s3cachefs-test/image-build:latest"  # the Dockerfile's `build`
PATCHED_PYFUSE3 = "import pyfuse3; pyfuse3.passthrough_open"
WORKERS = ("s3cachefs-test-worker1", "s3cachefs-test-worker2")
# The layout the README warns against: a bind of the FUSE path itself.
PINNED_WORKER = "s3cachefs-test-worker-fuse-bind"
# The README's host paths -> where the test keeps them.
HOST_PATHS = ("/mnt/s3cachefs", "/var/cache/s3cachefs", "/run/s3cachefs", "/etc/s3cachefs")

READ_ALL = """
import hashlib, json, os, sys
root = sys.argv[1]
out = {}
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        try:
            with open(p, 'rb') as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            out[os.path.relpath(p, root)] = 'errno %d' % e.errno
try:
    os.listdir(root)
except OSError as e:
    out['<root>'] = 'errno %d' % e.errno
print(json.dumps(out))
"""


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    marker = "<!-- container-deploy: tests/test_container.py runs this block as written -->"
    after = text[text.index(marker) + len(marker) :]
    match = re.match(r"\s*```sh\n(.*?)```", after, re.S)
    assert match is not None
    return match.group(1)


def map_host_paths(script: str, root: Path) -> str:
    """Host-side occurrences only: a container path follows ':' (`-v HOST:CONTAINER`)."""
    for path in HOST_PATHS:
        script = re.sub(rf"(?<![:\w/]){re.escape(path)}", str(root) + path, script)
    return script


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    started = time.monotonic()
    apt_install_missing(APT_PACKAGES)
    engine = Podman(containers_conf(tmp_path_factory.mktemp("podman")))
    engine.ensure_base_images()
    based = time.monotonic()
    # The build stage tagged too (its layers are the image's: no second build), so that
    # the systemd node reuses its passthrough build instead of compiling libfuse again.
    for target in (("--target", "build", "-t", BUILD_STAGE_IMAGE), ("-t", "s3cachefs")):
        engine.run(
            "build", "--format", "docker", "--pull=never", "--network", "host",
            *target, str(REPO), timeout=1200,
        )  # fmt: skip
    print(
        f"\ncontainer images: base {based - started:.0f}s, "
        f"project image {time.monotonic() - based:.0f}s"
    )
    return engine


def _remove_containers(podman: Podman) -> None:
    for name in (DAEMON, *WORKERS, PINNED_WORKER):
        podman.run("rm", "-f", "-t", "0" if name != DAEMON else "30", name, check=False)


def _unmount_below(root: Path) -> None:
    """Lazily detach every mount under ``root`` (deepest first)."""
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    for target in sorted(targets, key=len, reverse=True):
        if target == str(root) or target.startswith(f"{root}/"):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


@pytest.fixture
def node(podman: Podman, tmp_path: Path) -> Iterator[Path]:
    _remove_containers(podman)
    root = tmp_path / "node"
    root.mkdir()
    yield root
    _remove_containers(podman)
    _unmount_below(root)


def _fuse_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return fields[fields.index("-") + 1].startswith("fuse")
    return False


def _wait_serving(podman: Podman, timeout: float = 120) -> float:
    """Seconds until `s3cachefs status` answers in the daemon container."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if podman.run("exec", DAEMON, "s3cachefs", "status", check=False).returncode == 0:
            return time.monotonic() - start
        time.sleep(0.2)
    logs = podman.run("logs", DAEMON, check=False)
    raise AssertionError(f"daemon did not come back:\n{logs.stdout}{logs.stderr}")


def _wait_exited(podman: Podman, pid: int, timeout: float = 60) -> None:
    """Until the killed process is gone and the container has a new one (or none yet)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        now = podman.run("inspect", "--format", "{{.State.Pid}}", DAEMON, check=False).stdout
        if now.strip() != str(pid):
            return
        time.sleep(0.1)
    raise AssertionError(f"daemon pid {pid} still there {timeout}s after SIGKILL")


def _worker_reads(podman: Podman, worker: str, root: str = "/mnt/host/datasets") -> dict[str, str]:
    result = podman.run("exec", worker, "python3", "-c", READ_ALL, root, check=False)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_readme_container_deployment_survives_daemon_restarts(
    podman: Podman, node: Path, bucket: Bucket
) -> None:
    rng = hashlib.sha256(b"seed")
    expected: dict[str, str] = {}
    for i in range(20):
        rng = hashlib.sha256(rng.digest())
        size = 3_000_000 if i == 0 else 20_000 + (int.from_bytes(rng.digest()[:4]) % 2_000_000)
        data = (rng.digest() * (size // 32 + 1))[:size]
        # dataset-v3 is prefetched (pinned, then kernel-served from the cache);
        # live/ is read through FUSE: after a restart, only the new mount serves it.
        key = f"dataset-v3/batch-{i % 3}/page-{i:04d}.bin" if i < 14 else f"live/{i:04d}.bin"
        bucket.put(key, data)
        expected[key] = hashlib.sha256(data).hexdigest()

    etc = node / "etc" / "s3cachefs"
    etc.mkdir(parents=True)
    (etc / "datasets.toml").write_text(
        f'source = "{bucket.name}"\n'
        'mountpoint = "/mnt/datasets"\n'
        f'endpoint-url = "{bucket.server.endpoint_url}"\n'
        'cache-dir = "/var/cache/s3cachefs/datasets"\n'
        "allow-other = true\n"
    )
    (etc / "datasets.env").write_text("".join(f"{k}={v}\n" for k, v in CREDENTIALS.items()))

    block = readme_block()
    worker_lines = [line for line in block.splitlines() if "worker-image" in line]
    [worker_line] = worker_lines
    script = map_host_paths(
        "\n".join(line for line in block.splitlines() if line not in worker_lines), node
    )
    started = time.monotonic()
    deployed = subprocess.run(
        [
            "timeout",
            "600",
            "bash",
            "-euo",
            "pipefail",
            "-c",
            'docker() { podman "$@"; }\n' + script,
        ],
        env=podman.env,
        capture_output=True,
        text=True,
        check=False,
    )
    logs = podman.run("logs", DAEMON, check=False)
    assert deployed.returncode == 0, f"{deployed.stderr}\n--- daemon:\n{logs.stdout}{logs.stderr}"
    print(f"\nREADME block (daemon up + prefetch): {time.monotonic() - started:.1f}s")
    # The image keeps its HEALTHCHECK (built --format docker) and it passes.
    image = json.loads(podman.run("image", "inspect", "s3cachefs").stdout)[0]
    assert image["Healthcheck"]["Test"] == ["CMD", "s3cachefs", "status"]
    podman.run("healthcheck", "run", DAEMON)
    # The image's pyfuse3 is the patched build, on the image's own libfuse 3.17.
    podman.run("exec", DAEMON, "python3", "-c", PATCHED_PYFUSE3)
    host_mount = node / "mnt" / "s3cachefs" / "datasets"
    assert _fuse_mounted(host_mount), "the FUSE mount did not reach the host"
    assert "pinned" in deployed.stdout + deployed.stderr or deployed.returncode == 0

    # The README's worker command, as a long-running container.
    worker_args = shlex.split(map_host_paths(worker_line, node))
    assert worker_args[:3] == ["docker", "run", "--rm"] and worker_args[-1] == "worker-image"
    for worker in WORKERS:
        podman.run(
            "run", "-d", "--name", worker, *worker_args[3:-1], PYTHON_IMAGE, "sleep", "infinity"
        )
    host_datasets = f"{node}/mnt/s3cachefs/datasets"
    podman.run(
        "run", "-d", "--name", PINNED_WORKER, "-v", f"{host_datasets}:/data:ro,rslave",
        PYTHON_IMAGE, "sleep", "infinity",
    )  # fmt: skip
    for worker in WORKERS:
        assert _worker_reads(podman, worker) == expected
    assert _worker_reads(podman, PINNED_WORKER, "/data") == expected

    # Restart: stop/start, then kill -9 and the restart policy brings it back.
    podman.run("stop", "-t", "30", DAEMON)
    assert not _fuse_mounted(host_mount)
    podman.run("start", DAEMON)
    print(f"daemon serving again {_wait_serving(podman):.1f}s after start")
    for worker in WORKERS:
        assert _worker_reads(podman, worker) == expected, "after stop/start"

    # A crash: SIGKILL to the daemon process itself (`podman kill` counts as a
    # user stop, which restart policies ignore).
    for attempt in range(2):
        pid = int(podman.run("inspect", "--format", "{{.State.Pid}}", DAEMON).stdout)
        os.kill(pid, signal.SIGKILL)
        _wait_exited(podman, pid)
        print(f"daemon serving again {_wait_serving(podman):.1f}s after kill -9 #{attempt}")
        for worker in WORKERS:
            assert _worker_reads(podman, worker) == expected, f"after kill -9 #{attempt}"
    # The bind of the FUSE path kept the first daemon's mount: dead for good.
    assert _worker_reads(podman, PINNED_WORKER, "/data") == {"<root>": f"errno {errno.ENOTCONN}"}
    restarts = podman.run("inspect", "--format", "{{.RestartCount}}", DAEMON).stdout.strip()
    assert int(restarts) >= 2


# --- the systemd units under a real systemd (PID 1 of a podman container) ------

SYSTEMD_IMAGE = "localhost/s3cachefs-test/systemd:latest"
SYSTEMD_CONTAINER = "s3cachefs-test-systemd"
# A node: systemd, and s3cachefs installed by `./quickstart install` from this
# checkout. The layers before `COPY . /src` depend only on their inputs, so a
# source edit re-runs just the install, with warm caches: quickstart's Debian
# packages, the image's passthrough build (same Python) as the node's build
# cache, and pip's cache filled with the dependencies (pyfuse3 aside: the
# install takes the patched one from the build cache).
SYSTEMD_CONTAINERFILE = f"""\
FROM {PYTHON_IMAGE}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
       systemd systemd-sysv dbus {{apt_packages}} \\
    && rm -rf /var/lib/apt/lists/*
COPY --from={BUILD_STAGE_IMAGE} /passthrough /root/.cache/s3cachefs-passthrough
COPY pyproject.toml /tmp/warm/
COPY packaging/constraints.txt /tmp/warm/
RUN python3 -m venv /tmp/warm/venv \\
    && /tmp/warm/venv/bin/pip install -q --upgrade pip \\
    && python3 -c "import tomllib; d = tomllib.load(open('/tmp/warm/pyproject.toml', 'rb')); \\
print('\\n'.join(['setuptools>=77', *(r for r in d['project']['dependencies'] \\
if not r.startswith('pyfuse3'))]))" > /tmp/warm/requirements.txt \\
    && cd /tmp/warm && venv/bin/pip install -q -c constraints.txt -r requirements.txt \\
    && cd / && rm -rf /tmp/warm
COPY . /src
RUN /src/quickstart install
ENTRYPOINT ["/lib/systemd/systemd"]
CMD []
"""


def _quickstart_apt_packages() -> str:
    """What `./quickstart install` would apt-get: installed in a layer of their own."""
    match = re.search(r"^APT_PACKAGES=\((.*)\)$", (REPO / "quickstart").read_text(), re.M)
    assert match is not None
    return match.group(1)


# A GPU workload as the README writes it: ordered after the node's data.
WORKLOAD_UNIT = """\
[Unit]
Requires=s3cachefs-prefetch@datasets.service
After=s3cachefs-prefetch@datasets.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cd /mnt/datasets && sha256sum dataset-v3/* > /run/workload.out'
"""


@pytest.fixture
def systemd_node(podman: Podman, tmp_path: Path) -> Iterator[tuple[Podman, Path]]:
    """A container whose PID 1 is systemd, s3cachefs installed by `./quickstart install`."""
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text(SYSTEMD_CONTAINERFILE.format(apt_packages=_quickstart_apt_packages()))
    started = time.monotonic()
    podman.run(
        "build", "--pull=never", "--network", "host", "-f", str(containerfile),
        "-t", SYSTEMD_IMAGE, str(REPO), timeout=1200,
    )  # fmt: skip
    print(f"\nsystemd node image (quickstart install): {time.monotonic() - started:.0f}s")
    etc = tmp_path / "etc"
    etc.mkdir()
    podman.run("rm", "-f", "-t", "0", SYSTEMD_CONTAINER, check=False)
    podman.run(
        "run", "-d", "--name", SYSTEMD_CONTAINER, "--systemd=always", "--network", "host",
        "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN",
        "--security-opt", "apparmor=unconfined", "-v", f"{etc}:/etc/s3cachefs",
        SYSTEMD_IMAGE,
    )  # fmt: skip
    try:
        yield podman, etc
    finally:
        podman.run("rm", "-f", "-t", "30", SYSTEMD_CONTAINER, check=False)


def _in_node(podman: Podman, *command: str, check: bool = True) -> str:
    return podman.run("exec", SYSTEMD_CONTAINER, *command, check=check).stdout


def _show(podman: Podman, unit: str, prop: str) -> str:
    return _in_node(podman, "systemctl", "show", "-p", prop, "--value", unit).strip()


def test_installed_units_under_systemd_order_restart_stop_and_uninstall(
    systemd_node: tuple[Podman, Path], bucket: Bucket
) -> None:
    podman, etc = systemd_node
    # The installed daemon's python has the patched pyfuse3 (passthrough available).
    _in_node(podman, "/opt/s3cachefs/bin/python", "-c", PATCHED_PYFUSE3)
    expected = {}
    for i in range(6):
        data = hashlib.sha256(b"%d" % i).digest() * (20_000 * (i + 1))
        bucket.put(f"dataset-v3/page-{i}.bin", data)
        expected[f"dataset-v3/page-{i}.bin"] = hashlib.sha256(data).hexdigest()
    live = b"read through FUSE\n" * 5000
    bucket.put("live/x.bin", live)
    (etc / "datasets.toml").write_text(
        f'source = "{bucket.name}"\n'
        'mountpoint = "/mnt/datasets"\n'
        f'endpoint-url = "{bucket.server.endpoint_url}"\n'
        'cache-dir = "/var/cache/s3cachefs/datasets"\n'
        'prefetch = ["dataset-v3"]\n'
    )
    # Credentials in a drop-in, as the README says (`systemctl edit`).
    creds = " ".join(f"{k}={v}" for k, v in CREDENTIALS.items())
    dropin = "/etc/systemd/system/s3cachefs@datasets.service.d"
    _in_node(
        podman, "sh", "-c",
        f"until systemctl is-system-running --wait >/dev/null 2>&1 || "
        f"[ $(systemctl is-system-running) = degraded ]; do sleep 0.2; done; "
        f"mkdir -p /mnt/datasets {dropin} && "
        f"printf '[Service]\\nEnvironment={creds}\\n' > {dropin}/creds.conf && "
        f"printf %s {shlex.quote(WORKLOAD_UNIT)} > /etc/systemd/system/gpu-job.service && "
        "systemctl daemon-reload",
    )  # fmt: skip

    # Starting the workload pulls in the prefetch and the mount; the
    # prefetch returns only once the dataset is pinned, then the job runs.
    _in_node(podman, "systemctl", "start", "gpu-job.service")
    out = _in_node(podman, "cat", "/run/workload.out")
    got = {line.split()[1]: line.split()[0] for line in out.splitlines()}
    assert got == expected
    prefetched = int(_show(podman, "s3cachefs-prefetch@datasets", "ActiveEnterTimestampMonotonic"))
    job_started = int(_show(podman, "gpu-job.service", "ExecMainStartTimestampMonotonic"))
    assert 0 < prefetched <= job_started
    journal = _in_node(podman, "journalctl", "-u", "s3cachefs@datasets", "--no-pager", "-o", "cat")
    assert "complete=True" in journal
    status = json.loads(_in_node(podman, "s3cachefs", "status", "/mnt/datasets", "--json"))
    assert status["cache"]["pinned_bytes"] == sum(20_000 * 32 * (i + 1) for i in range(6)), status[
        "cache"
    ]
    assert _show(podman, "s3cachefs@datasets", "StatusText").startswith("cache ")
    assert 'Status: "cache ' in _in_node(
        podman, "systemctl", "status", "--no-pager", "s3cachefs@datasets", check=False
    )

    # kill -9 of the daemon: systemd restarts it and the mount serves again.
    first_pid = _show(podman, "s3cachefs@datasets", "MainPID")
    _in_node(podman, "systemctl", "kill", "--signal=KILL", "--kill-whom=main", "s3cachefs@datasets")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid = _show(podman, "s3cachefs@datasets", "MainPID")
        active = _show(podman, "s3cachefs@datasets", "ActiveState")
        if active == "active" and pid not in ("0", first_pid):
            break
        time.sleep(0.2)
    assert _show(podman, "s3cachefs@datasets", "NRestarts") == "1"
    read = _in_node(podman, "sha256sum", "/mnt/datasets/live/x.bin")
    assert read.split()[0] == hashlib.sha256(live).hexdigest()

    # stop unmounts cleanly (and stops what requires it).
    _in_node(podman, "systemctl", "stop", "s3cachefs@datasets")
    assert _show(podman, "s3cachefs@datasets", "ActiveState") == "inactive"
    assert _show(podman, "s3cachefs@datasets", "Result") == "success"
    assert _show(podman, "gpu-job.service", "ActiveState") == "inactive"
    mounts = _in_node(podman, "cat", "/proc/self/mountinfo")
    assert " /mnt/datasets " not in mounts and "/mnt/datasets/" not in mounts

    # `./quickstart uninstall` on a node with an enabled, running mount: it stops
    # (unmounts) and disables every instance, then removes the install.
    _in_node(podman, "systemctl", "enable", "--now", "s3cachefs@datasets")
    assert _show(podman, "s3cachefs@datasets", "ActiveState") == "active"
    _in_node(podman, "/src/quickstart", "uninstall")
    assert _show(podman, "s3cachefs@datasets", "ActiveState") == "inactive"
    assert _show(podman, "s3cachefs@datasets", "Result") == "success"
    mounts = _in_node(podman, "cat", "/proc/self/mountinfo")
    assert " /mnt/datasets " not in mounts
    left = _in_node(
        podman, "sh", "-c",
        "ls -d /opt/s3cachefs /usr/local/bin/s3cachefs /etc/systemd/system/s3cachefs@.service "
        "/etc/systemd/system/multi-user.target.wants/s3cachefs@datasets.service "
        "/etc/s3cachefs/datasets.toml 2>/dev/null; true",
    )  # fmt: skip
    assert left.split() == ["/etc/s3cachefs/datasets.toml"]


# --- deploy/compose.yaml with docker-compose and a dockerd of the test's own ---

DOCKER_PACKAGES = ("docker.io", "docker-compose")
# Kept between runs (images imported from podman, the moto image): only the
# first run pays for them. Nothing else of the test outlives it.
DOCKER_DATA_ROOT = Path("/var/lib/s3cachefs-test-docker")
COMPOSE_PROJECT = "s3cachefs-test"
MOTO_IMAGE = "s3cachefs-test/moto"
MOTO_DOCKERFILE = """\
FROM python:3.11-slim-bookworm
RUN pip install --no-cache-dir "moto[server]"
"""
# No registry here: MinIO is replaced by moto's S3 server on the same port; the
# compose file users run is used as it is.
COMPOSE_OVERRIDE = f"""\
services:
  minio:
    image: {MOTO_IMAGE}
    entrypoint: ["moto_server"]
    command: ["-H", "0.0.0.0", "-p", "9000"]
    healthcheck:
      test: ["CMD-SHELL", "python3 -c \\"import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/')\\""]
"""


class Docker:
    """The test's own dockerd: own socket, pidfile, exec-root; no iptables rules, no docker0."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        DOCKER_DATA_ROOT.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "dockerd.log", "wb") as log:
            self.process = subprocess.Popen(
                [
                    "dockerd", "--host", self.env["DOCKER_HOST"],
                    "--pidfile", str(self.workdir / "dockerd.pid"),
                    "--exec-root", str(self.workdir / "exec"),
                    "--data-root", str(DOCKER_DATA_ROOT),
                    "--iptables=false", "--ip-masq=false", "--bridge=none",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while self.run("version", check=False).returncode != 0:
            assert self.process.poll() is None, (self.workdir / "dockerd.log").read_text()
            assert time.monotonic() < deadline, "dockerd did not answer in 60 s"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def run(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            args if args[0] == "docker-compose" else ("docker", *args),
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {result.returncode}\n{result.stderr}")
        return result

    def inspect(self, container: str) -> dict[str, Any]:
        return dict(json.loads(self.run("inspect", container).stdout)[0])


def _import_from_podman(podman: Podman, docker: Docker, source: str, tag: str) -> None:
    """`podman save | docker load` once per podman image (tracked by a tag with its id)."""
    podman_id = podman.run("image", "inspect", "--format", "{{.Id}}", source).stdout.strip()
    marker = f"s3cachefs-test/from-podman-{tag.partition(':')[0]}:{podman_id[:16]}"
    family = marker.partition(":")[0]
    for stale in docker.run(
        "images", "--format", "{{.Repository}}:{{.Tag}}", family
    ).stdout.split():
        if stale != marker:  # an earlier build of the same podman image
            docker.run("rmi", stale)
    if docker.run("image", "inspect", marker, check=False).returncode != 0:
        with subprocess.Popen(
            ["podman", "save", "--format", "docker-archive", source],
            stdout=subprocess.PIPE, env=podman.env,
        ) as save:  # fmt: skip
            loaded = subprocess.run(
                ["docker", "load"], stdin=save.stdout, env=docker.env,
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        assert save.returncode == 0 and loaded.returncode == 0, loaded.stderr
        image = loaded.stdout.strip().split()[-1]  # "Loaded image: NAME" / "...ID: sha256:…"
        docker.run("tag", image, marker)
    docker.run("tag", marker, tag)


def _started(state: dict[str, Any], key: str = "StartedAt") -> float:
    stamp = str(state[key])
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{frac or 0}")


def _healthy_after_restart(container: dict[str, Any]) -> bool:
    state = container["State"]
    if container["RestartCount"] != 1 or state["Status"] != "running":
        return False
    since = _started(state)
    return any(p["ExitCode"] == 0 and _started(p, "Start") >= since for p in state["Health"]["Log"])


def _compose_sample_digest() -> tuple[int, str]:
    """What compose.yaml's bucket one-shot uploads, in the worker's (sorted path) order."""
    pages = [hashlib.sha256(b"%d" % i).digest() * (4096 * (i + 1)) for i in range(12)]
    return 13, hashlib.sha256(b"sample\n" + b"".join(pages)).hexdigest()


@pytest.fixture
def docker(podman: Podman) -> Iterator[Docker]:
    apt_install_missing(DOCKER_PACKAGES, recommends=False)
    # Short: the socket paths under it must fit in sockaddr_un.
    workdir = Path(tempfile.mkdtemp(prefix="s3cfs-dockerd-"))
    engine = Docker(workdir, {**os.environ, "DOCKER_HOST": f"unix://{workdir}/docker.sock"})
    try:
        engine.start()
        started = time.monotonic()
        _import_from_podman(podman, engine, "localhost/s3cachefs:latest", "s3cachefs:latest")
        _import_from_podman(podman, engine, PYTHON_IMAGE, "python:3.11-slim-bookworm")
        if engine.run("image", "inspect", MOTO_IMAGE, check=False).returncode != 0:
            (workdir / "moto").mkdir()
            (workdir / "moto" / "Dockerfile").write_text(MOTO_DOCKERFILE)
            engine.run("build", "--network", "host", "-t", MOTO_IMAGE, str(workdir / "moto"))
        engine.run("image", "prune", "-f")
        print(f"\ndocker images ready: {time.monotonic() - started:.0f}s")
        yield engine
    finally:
        engine.stop()
        _unmount_below(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def test_compose_comes_up_in_order_survives_kill_9_and_goes_down_clean(
    docker: Docker, tmp_path: Path
) -> None:
    host_mnt, host_cache = tmp_path / "mnt", tmp_path / "cache"
    (host_mnt / "datasets").mkdir(parents=True)
    host_cache.mkdir()
    override = tmp_path / "compose-test-override.yaml"
    override.write_text(COMPOSE_OVERRIDE)
    docker.env.update(HOST_MNT=str(host_mnt), HOST_CACHE=str(host_cache))
    compose = (
        "docker-compose", "-p", COMPOSE_PROJECT,
        "-f", str(REPO / "deploy" / "compose.yaml"), "-f", str(override),
    )  # fmt: skip
    docker.run(*compose, "down", "-v", "--remove-orphans")  # a previous run's leftovers
    # The node setup of compose.yaml's header.
    subprocess.run(["mount", "--bind", host_mnt, host_mnt], check=True)
    try:
        subprocess.run(["mount", "--make-shared", host_mnt], check=True)
        started, up_at = time.monotonic(), time.time()
        up = docker.run(*compose, "up", "-d", "--no-build", check=False)
        print(f"compose up -d: {time.monotonic() - started:.1f}s")
        assert up.returncode == 0, up.stderr

        # `up -d` returns once the worker is started; its exit code and bytes say
        # whether it read the dataset (`up --exit-code-from` passes without a worker run).
        ids = {
            service: docker.run(*compose, "ps", "-q", service).stdout.strip()
            for service in ("minio", "bucket", "s3cachefs", "prefetch", "worker")
        }
        assert docker.run("wait", ids["worker"], timeout=120).stdout.strip() == "0"
        count, digest = _compose_sample_digest()
        expected = f"worker read {count} files sha256 {digest}"
        assert docker.run("logs", ids["worker"]).stdout.strip() == expected

        # Each service started only after the one it depends on met its condition.
        state = {service: docker.inspect(cid)["State"] for service, cid in ids.items()}
        assert state["bucket"]["ExitCode"] == 0 and state["prefetch"]["ExitCode"] == 0

        # From the engine's events, not State.Health.Log: that keeps only the
        # last five probes, so under load the first healthy one is gone.
        events = docker.run(
            "events", "--since", f"{up_at:.3f}", "--until", f"{time.time():.3f}",
            "--filter", "event=health_status", "--format", "{{json .}}",
        ).stdout.splitlines()  # fmt: skip
        healthy: dict[str, float] = {}
        for line in events:
            event = json.loads(line)
            if event.get("status", event.get("Action")) == "health_status: healthy":
                healthy.setdefault(event["id"], event["timeNano"] / 1e9)

        def first_healthy(service: str) -> float:
            return healthy[ids[service]]

        assert first_healthy("minio") <= _started(state["bucket"])
        assert _started(state["bucket"], "FinishedAt") <= _started(state["s3cachefs"])
        assert first_healthy("s3cachefs") <= _started(state["prefetch"])
        assert _started(state["prefetch"], "FinishedAt") <= _started(state["worker"])

        # The mount reached the host, and the host reads the same bytes.
        assert _fuse_mounted(host_mnt / "datasets")
        root = host_mnt / "datasets" / "dataset-v3"
        names = sorted(str(p) for p in root.rglob("*") if p.is_file())
        host = hashlib.sha256(b"".join(Path(n).read_bytes() for n in names)).hexdigest()
        assert (len(names), host) == (count, digest)

        # kill -9 of the daemon: restart: unless-stopped brings it back. Healthy
        # means a probe that passed after the restart: Health.Status still says
        # "healthy" from before for a while, and a `docker stop` in the new
        # daemon's first second (before its SIGTERM handler) is ignored by PID 1.
        os.kill(state["s3cachefs"]["Pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not _healthy_after_restart(docker.inspect(ids["s3cachefs"])):
            assert time.monotonic() < deadline, docker.inspect(ids["s3cachefs"])["State"]
            time.sleep(0.2)
        # The worker's next run reads byte-exact through the new mount.
        again = docker.run("start", "-a", ids["worker"], timeout=120, check=False)
        assert (again.returncode, again.stdout.strip()) == (0, expected), again.stderr

        stopped = time.monotonic()
        down = docker.run(*compose, "down", "-v", check=False)
        print(f"compose down -v: {time.monotonic() - stopped:.1f}s")
        assert down.returncode == 0, down.stderr
        label = f"label=com.docker.compose.project={COMPOSE_PROJECT}"
        assert docker.run("ps", "-aq", "--filter", label).stdout == ""
        assert docker.run("volume", "ls", "-q", "--filter", label).stdout == ""
        with open("/proc/self/mountinfo") as f:
            below = [line.split()[4] for line in f if line.split()[4].startswith(f"{host_mnt}/")]
        assert below == [], below
    finally:
        docker.run(*compose, "down", "-v", check=False)
        _unmount_below(host_mnt)

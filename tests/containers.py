"""Podman for the container tests, without a registry and without touching the host's config.

The base image is made the way a node without registry access would make it:
``debootstrap --variant=minbase bookworm`` from the Debian mirror apt uses,
``podman import``, then a small image tagged ``python:3.11-slim-bookworm``
(python3, venv, pip, headers) that the project's Dockerfile builds FROM
unchanged. Both stay in podman's image store, so only the first run pays for
them. The host's CA bundle and package index go into the image's pip config,
so pip works behind a TLS-intercepting proxy.
"""

from __future__ import annotations

import configparser
import os
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

BASE_IMAGE = "localhost/s3cachefs-test/debian-minbase:bookworm"
PYTHON_IMAGE = "localhost/python:3.11-slim-bookworm"
APT_PACKAGES = ("podman", "runc", "debootstrap")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

PYTHON_CONTAINERFILE = """\
FROM {base}
COPY host-ca.pem /usr/local/share/s3cachefs-test/host-ca.pem
COPY pip.conf /etc/pip.conf
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
       python3 python3-venv python3-pip python3-dev python-is-python3 ca-certificates \\
    && rm -rf /var/lib/apt/lists/* \\
    && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
LABEL org.s3cachefs.test-base=debootstrap
"""


def apt_install_missing(packages: tuple[str, ...], recommends: bool = True) -> None:
    missing = [
        p
        for p in packages
        if subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode != 0
    ]
    if not missing:
        return
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", *lock, "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", *lock, "install", "-y", "-qq", *missing]
        + ([] if recommends else ["--no-install-recommends"]),
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def containers_conf(directory: Path) -> Path:
    """The tests' own containers.conf: runc, cgroupfs, and rlimits this machine allows.

    Here (cgroup v1 hybrid, no CAP_SYS_RESOURCE) crun is absent and runc cannot
    raise RLIMIT_NOFILE/RLIMIT_NPROC to podman's defaults; without systemd as
    PID 1 there is no systemd cgroup manager or journald.
    """
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 20000)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    conf = directory / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    return conf


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (the only route to Debian's packages here)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in text.split("\n\n"):  # deb822
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.*)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return match.group(1)
    return "http://deb.debian.org/debian"


def _pip_index() -> str | None:
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    parser = configparser.ConfigParser()
    parser.read(["/etc/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")])
    return parser.get("global", "index-url", fallback=None)


class Podman:
    def __init__(self, conf: Path) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
        return result

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def ensure_base_images(self) -> None:
        if not self.image_exists(BASE_IMAGE):
            with tempfile.TemporaryDirectory(prefix="s3cachefs-debootstrap-") as tmp:
                root = Path(tmp) / "rootfs"
                subprocess.run(
                    ["debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()],
                    check=True,
                    capture_output=True,
                )
                with subprocess.Popen(
                    ["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE
                ) as tar:
                    imported = subprocess.run(
                        ["podman", "import", "-", BASE_IMAGE],
                        stdin=tar.stdout,
                        env=self.env,
                        capture_output=True,
                        check=False,
                    )
                assert tar.returncode == 0 and imported.returncode == 0, imported.stderr
        if not self.image_exists(PYTHON_IMAGE):
            with tempfile.TemporaryDirectory(prefix="s3cachefs-pybase-") as tmp:
                context = Path(tmp)
                shutil.copy(CA_BUNDLE, context / "host-ca.pem")
                index = _pip_index()
                (context / "pip.conf").write_text(
                    "[global]\ncert = /usr/local/share/s3cachefs-test/host-ca.pem\n"
                    + (f"index-url = {index}\n" if index else "")
                )
                (context / "Containerfile").write_text(PYTHON_CONTAINERFILE.format(base=BASE_IMAGE))
                self.run(
                    "build",
                    "--pull=never",
                    "--network",
                    "host",
                    "-t",
                    PYTHON_IMAGE,
                    str(context),
                    timeout=1200,
                )

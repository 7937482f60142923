"""The S3 server behind a network profile: local, lan (1 ms / 10 Gbit), wan (40 ms / 1 Gbit).

``local``: bench.dirs3 on 127.0.0.1, nothing in between. ``lan``/``wan``: the
server runs in its own network namespace behind a veth pair (10.201.N.0/30),
both veth ends shaped by ``tc tbf`` to the profile's rate; clients connect to
bench.delayproxy on 127.0.0.1, which adds RTT/2 each way (no netem in this
kernel). Everything started here is stopped by PID (process group) and the
namespace deleted in ``close``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.serverprobe import free_port


@dataclass(frozen=True)
class Profile:
    name: str
    rtt: float  # seconds
    rate: str  # tc rate, "" = unshaped

    @property
    def shaped(self) -> bool:
        return bool(self.rate)


PROFILES = {
    "local": Profile("local", 0.0, ""),
    "lan": Profile("lan", 0.001, "10gbit"),
    "wan": Profile("wan", 0.040, "1gbit"),
}
RATE_BYTES = {"10gbit": 10e9 / 8, "1gbit": 1e9 / 8}


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Network:
    """Start with ``open()``, always ``close()``."""

    def __init__(self, profile: Profile, root: Path) -> None:
        self.profile = profile
        self.root = root
        self.ns = f"s3b{os.getpid()}{profile.name}"
        self.dev = f"vb{os.getpid() % 100000}{profile.name[0]}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.netns_made = False
        self.endpoint_url = ""
        self.stats_url = ""

    def open(self) -> Network:
        server_cmd = [sys.executable, "-m", "bench.dirs3", str(self.root)]
        if not self.profile.shaped:
            self.endpoint_url = self.stats_url = self._start(server_cmd)
            return self
        subnet = {"lan": 201, "wan": 202}[self.profile.name]  # one /30 per profile
        host_ip, ns_ip = f"10.{subnet}.0.1", f"10.{subnet}.0.2"
        peer = self.dev + "n"
        _run("ip", "netns", "add", self.ns)
        self.netns_made = True
        _run("ip", "link", "add", self.dev, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", self.ns)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", self.dev)
        _run("ip", "link", "set", self.dev, "up")
        inns = ("ip", "netns", "exec", self.ns)
        _run(*inns, "ip", "addr", "add", f"{ns_ip}/30", "dev", peer)
        _run(*inns, "ip", "link", "set", peer, "up")
        _run(*inns, "ip", "link", "set", "lo", "up")
        burst = max(64 * 1024, int(RATE_BYTES[self.profile.rate] / 500))  # 2 ms worth
        tbf = ("root", "tbf", "rate", self.profile.rate, "burst", str(burst), "latency", "50ms")
        _run("tc", "qdisc", "add", "dev", self.dev, *tbf)
        _run(*inns, "tc", "qdisc", "add", "dev", peer, *tbf)
        self.stats_url = self._start([*inns, *server_cmd, "--host", ns_ip])
        target = self.stats_url.removeprefix("http://")
        port = free_port()
        workers = "2" if self.profile.name == "lan" else "1"
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.delayproxy",
                    "--port",
                    str(port),
                    "--target",
                    target,
                    "--delay",
                    str(self.profile.rtt / 2),
                    "--workers",
                    workers,
                ],
                start_new_session=True,
            )
        )
        self.endpoint_url = f"http://127.0.0.1:{port}"
        _wait_http(self.endpoint_url + "/_bench/stats")
        return self

    def _start(self, cmd: list[str]) -> str:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()  # after the ETags are computed
        if not url:
            raise RuntimeError("S3 server did not start")
        return url

    def stats(self) -> dict[str, object]:
        with urllib.request.urlopen(self.stats_url + "/_bench/stats", timeout=10) as r:
            result: dict[str, object] = json.load(r)
            return result

    def reset(self) -> None:
        urllib.request.urlopen(self.stats_url + "/_bench/reset", timeout=10).close()

    def rescan(self) -> None:
        """The server takes in objects a harness changed in its folder (`bench.dirs3`)."""
        urllib.request.urlopen(self.stats_url + "/_bench/rescan", timeout=120).close()

    def requests(self) -> int:
        counts = self.stats()["requests"]
        assert isinstance(counts, dict)
        return sum(counts.values())

    def bytes_sent(self) -> int:
        sent = self.stats()["bytes_sent"]
        assert isinstance(sent, int)
        return sent

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # its own group: proxy workers too
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()
        if self.netns_made:
            subprocess.run(["ip", "link", "del", self.dev], check=False, stderr=subprocess.DEVNULL)
            subprocess.run(["ip", "netns", "del", self.ns], check=False)
            self.netns_made = False


def _wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)

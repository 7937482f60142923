"""The suite behind ``python -m bench``: dataset, profiles, systems, workloads, table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import boto3
import psutil
from botocore.config import Config

from bench import cluster, peers, refresh, syncrow, workloads
from bench.common import drop_caches
from bench.dataset import PROBE_PREFIX, PROBES, Dataset, generate
from bench.network import PROFILES, RATE_BYTES, Network, Profile
from bench.report import Report, Row
from bench.usage import Usage

MB = 1e6
MIB = 1024 * 1024
W4_ROUNDS = 5  # W4 passes of each path, side by side


class Sampler:
    """Peak RSS of a process, polled every 100 ms; ``mark`` starts a new phase."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak: dict[str, int] = {}
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)

    def mark(self, phase: str) -> None:
        self.phase = phase

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Suite:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.report = Report()
        self.s3root = work / "s3"
        self.local = work / "local"
        self.data = Dataset()
        self.rclone = self.s3fs = self.aws = None
        if args.only not in ("", "w1"):  # s3cachefs (and local disk) only: no peer installed
            return
        self.rclone, why_rclone = peers.which_rclone()
        self.s3fs, why_s3fs = peers.which_s3fs()
        self.aws, why_aws = peers.which_aws()
        self.s5cmd, why_s5cmd = peers.which_s5cmd()
        for name, why in (
            ("rclone", why_rclone),
            ("s3fs", why_s3fs),
            ("aws", why_aws),
            ("s5cmd", why_s5cmd),
        ):
            if why:
                self.report.note(f"{name}: {why}; its rows are skipped")

    # -- helpers ---------------------------------------------------------------

    def page_paths(self, base: Path) -> list[Path]:
        return [base / key.split("/", 1)[1] for key, _ in self.data.pages]

    def scratch(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def w1(self, system: str, profile: Profile, secs: float, baseline: str = "") -> Row:
        return self.report.add(
            Row(
                "W1 prefetch/sync",
                system,
                profile.name,
                "whole dataset",
                self.data.total_bytes / secs / MB,
                "MB/s",
                versus=baseline,
            )
        )

    def _timed(self, fn: Any, *a: Any) -> float:
        drop_caches()
        start = time.perf_counter()
        fn(*a)
        return time.perf_counter() - start

    # -- the run ---------------------------------------------------------------

    def run(self) -> None:
        small = self.args.small
        pages, large, large_size = (1000, 1, 96 * MIB) if small else (4000, 3, 512 * MIB)
        t = time.perf_counter()
        self.data = generate([self.s3root / peers.BUCKET, self.local], pages, large, large_size)
        self.report.note(
            f"dataset: {len(self.data.pages)} pages ({self.data.page_bytes / MB:,.0f} MB,"
            f" 30 KB-3 MB log-normal) + {large} x {large_size // MIB} MiB"
            f" = {self.data.total_bytes / MB:,.0f} MB, written in {time.perf_counter() - t:.0f} s"
        )
        for i, name in enumerate(self.args.profile):
            net = Network(PROFILES[name], self.s3root)
            try:
                net.open()
                if self.args.only not in ("w6", "refresh"):
                    self.profile_run(net, primary=i == 0)
                if i == 0 and self.args.only in ("", "w6"):
                    cluster.Cluster(self.report, net, self.local, self.data, self.scratch).run()
                if i == 0 and self.args.only in ("", "refresh"):  # issue 12: what changed only
                    bucket = self.s3root / peers.BUCKET
                    refresh.Refresh(self.report, net, bucket, self.data, self.scratch).run()
            finally:
                net.close()
            if self.args.only not in ("", "w1"):
                break  # one workload: on the first profile only

    def profile_run(self, net: Network, primary: bool) -> None:
        p = net.profile
        print(f"== profile {p.name}: {net.endpoint_url}", flush=True)
        if self.args.only in ("readsfirst", "w3"):
            self.only_s3cachefs(net)
            return
        w1_rows: list[Row] = []
        # W1: the s3cachefs mount stays up on the primary profile for W2, W4, W5.
        fs = peers.S3CacheFS(net.endpoint_url, self.scratch("s3cachefs"))
        fs.start()
        sampler = Sampler(fs.pid) if fs.pid else None
        try:
            if sampler:
                sampler.mark("prefetch")
            secs = self.w1_prefetch(fs, net)
            w1_rows.append(self.w1("s3cachefs prefetch", p, secs))
            if primary and not self.args.only:
                self.w2_all(fs, sampler)
                self.w4(fs, net)
            if sampler:
                self.w5(sampler, p)
        finally:
            if sampler:
                sampler.stop()
            fs.stop()
            shutil.rmtree(fs.cache.parent, ignore_errors=True)
        self.w1_reads_first(net)
        peer_rows = self.w1_peers(net)
        if (row := syncrow.measure(self, net)) is not None:  # issue 16: sync into a directory
            w1_rows.append(row)
        if not self.args.only:  # --only w1: the copy tools, not the mounts' read-all
            self.w1_mounts(net, primary)
        self.w1_targets(p, w1_rows, peer_rows)
        if not self.args.only:
            self.w3(net)

    def w1_targets(self, p: Profile, w1_rows: list[Row], peer_rows: list[Row]) -> None:
        """Ratios of prefetch and sync to the fastest copy tool, and to the link."""
        if peer_rows:
            best = max(peer_rows, key=lambda r: r.value)
            for row in w1_rows:  # the target, on every profile
                row.ratio, row.versus = row.value / best.value, f"vs {best.system}"
                row.target = ">= 1.2"
                self.report.rows.remove(row)
                self.report.add(row)
        if p.shaped:  # or, where the link is the limit, 90 % of it (its nominal rate)
            link = RATE_BYTES[p.rate] / MB
            for row in w1_rows:
                self.report.add(
                    Row(
                        "W1 prefetch/sync",
                        row.system,
                        p.name,
                        "of the link's rate",
                        row.value,
                        "MB/s",
                        row.value / link,
                        f"vs link {link:.0f} MB/s",
                        ">= 0.9",
                    )
                )

    def only_s3cachefs(self, net: Network) -> None:
        """``--only readsfirst``: the prefetch with the reads-first probes; ``--only w3``."""
        if self.args.only == "w3":
            self.w3(net)
            return
        self.w1_reads_first(net)

    def w1_reads_first(self, net: Network) -> None:
        """A second prefetch, fresh cache, with the reads-first probes beside it.

        Apart from W1's timed prefetch: reads go first, so the prefetch gives way
        while they read, and its rate here is a prefetch with a reader beside it.
        """
        fs = peers.S3CacheFS(net.endpoint_url, self.scratch("s3cachefs-readsfirst"))
        fs.start()
        try:
            secs = self.w1_prefetch(fs, net, probes=True)
            self.report.add(
                Row(
                    "W1 reads first",
                    "s3cachefs prefetch",
                    net.profile.name,
                    "whole dataset, cold reads beside it",
                    self.data.total_bytes / secs / MB,
                    "MB/s",
                )
            )
        finally:
            fs.stop()
            shutil.rmtree(fs.cache.parent, ignore_errors=True)

    def w1_mounts(self, net: Network, primary: bool) -> None:
        p = net.profile
        mounts: list[peers.Mount] = []
        if self.rclone:
            mounts.append(peers.RcloneMount(net.endpoint_url, self.scratch("rclone"), self.rclone))
        if self.s3fs:
            mounts.append(peers.S3fsMount(net.endpoint_url, self.scratch("s3fs"), self.s3fs))
        for m in mounts:
            try:
                m.start()
                paths = self.page_paths(m.data) + [m.mnt / k for k, _ in self.data.large]
                drop_caches()
                secs, n = workloads.read_all(paths, 8)
                if n != self.data.total_bytes:
                    self.report.note(f"{m.name}: read {n} bytes, expected {self.data.total_bytes}")
                self.w1(f"{m.name} (read all once, 8 procs)", p, secs)
                if primary:
                    self.w2(m.name, self.page_paths(m.data))
            except Exception as exc:
                self.report.note(f"{m.name} on {p.name}: failed: {exc!r}")
            finally:
                m.stop()
                shutil.rmtree(m.cache.parent, ignore_errors=True)

    def w1_peers(self, net: Network) -> list[Row]:
        url = net.endpoint_url
        tools: list[tuple[str, Any]] = []
        if self.aws:
            aws = self.aws
            tools.append(("aws s3 sync", lambda t: peers.aws_sync_command(aws, url, t)))
        if self.rclone:
            rclone = self.rclone
            tools.append(
                ("rclone copy --transfers 32", lambda t: peers.rclone_copy_command(rclone, url, t))
            )
        if self.s5cmd:
            s5cmd = self.s5cmd
            tools.append(("s5cmd cp", lambda t: peers.s5cmd_cp_command(s5cmd, url, t)))
        rows = []
        for name, command in tools:
            target = self.scratch("copy")
            try:
                cmd, environ = command(target)
                drop_caches()
                usage = Usage()
                start = time.perf_counter()
                proc = usage.popen(cmd, env=environ)
                code = usage.wait(proc)
                secs = time.perf_counter() - start
                cpu, peak = usage.stop()
                if code:
                    raise RuntimeError(f"exit {code}")
                self._check_copy(target, name)
                rows.append(self.w1(name, net.profile, secs))
                self.footprint(name, net.profile, cpu, peak)
            except Exception as exc:
                self.report.note(f"{name} on {net.profile.name}: failed: {exc!r}")
            finally:
                shutil.rmtree(target)
        return rows

    def w1_prefetch(self, fs: peers.S3CacheFS, net: Network, probes: bool = False) -> float:
        """``s3cachefs prefetch``, timed; its CPU and memory (daemon and client) and the
        split of its wall time. With ``probes``: instead, the reads-first rows (cold
        reads outside the dataset while it runs, against the same idle daemon's).

        The split: "listing" until the job says the listing is done (its events come
        every 0.5 s), "download" until the server has sent the dataset's bytes (polled
        at the server), "after the last byte" the rest (verify, pin, index, manifest
        that did not overlap the download). A job that reports its own phases (busy
        seconds, summed over its workers) in the final event gets a row for each too.
        """
        cmd, environ = fs.prefetch_command()
        paths = sorted((fs.mnt / PROBE_PREFIX).iterdir()) if probes else []  # listed: data cold
        idle = [workloads.one_first_byte(path) for path in paths[: PROBES // 2]]
        drop_caches()
        net.reset()  # after the idle reads: the server's bytes are the prefetch's (and probes')
        usage = Usage([fs.pid] if fs.pid else [])
        stop = threading.Event()
        sent_all: list[float] = []
        start = time.perf_counter()

        def poll_server() -> None:
            while not stop.wait(0.1):
                if net.bytes_sent() >= self.data.total_bytes:
                    sent_all.append(time.perf_counter() - start)
                    return

        busy: list[float] = []

        def probe_reads() -> None:  # cold reads outside the dataset, one per 20 ms
            if not _until_download(net, stop):
                return
            for path in paths[PROBES // 2 :]:
                if stop.wait(0.02):
                    return
                busy.append(workloads.one_first_byte(path))

        poller = threading.Thread(target=poll_server, daemon=True)
        poller.start()
        prober = threading.Thread(target=probe_reads, daemon=True)
        proc = usage.popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if probes:
            prober.start()
        listed: float | None = None
        final: dict[str, Any] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if listed is None and event.get("listing_done"):
                listed = time.perf_counter() - start
            final = event
        errors = proc.stderr.read().decode() if proc.stderr else ""
        code = usage.wait(proc)
        secs = time.perf_counter() - start
        stop.set()
        poller.join()
        if probes:
            prober.join()
        cpu, peak = usage.stop()
        if probes:
            self.reads_first(net.profile, idle, busy)
        if code or not final.get("ok"):
            raise RuntimeError(f"prefetch exit {code}: {errors.strip()[-500:]} {final}")
        if not probes:  # its CPU, memory and wall split: the W1 prefetch's rows (no reads)
            self.footprint("s3cachefs prefetch", net.profile, cpu, peak)
            self.wall_split(net.profile, secs, listed, sent_all, final)
        return secs

    def wall_split(
        self,
        p: Profile,
        secs: float,
        listed: float | None,
        sent_all: list[float],
        final: dict[str, Any],
    ) -> None:
        split = {"listing": listed, "download": sent_all[0] if sent_all else None}
        for phase, value in split.items():
            if value is not None:
                self.report.add(
                    Row(
                        "W1 prefetch/sync",
                        "s3cachefs prefetch",
                        p.name,
                        f"wall: {phase}",
                        value,
                        "s",
                        value / secs,
                        "of the wall time",
                    )
                )
        if sent_all:
            tail = secs - sent_all[0]
            self.report.add(
                Row(
                    "W1 prefetch/sync",
                    "s3cachefs prefetch",
                    p.name,
                    "wall: after the last byte",
                    tail,
                    "s",
                    tail / secs,
                    "of the wall time",
                )
            )
        for phase, value in (final.get("phases") or {}).items():
            self.report.add(
                Row(
                    "W1 prefetch/sync",
                    "s3cachefs prefetch",
                    p.name,
                    f"busy: {phase}",
                    float(value),
                    "s",
                    float(value) / secs,
                    "of the wall time",
                )
            )

    def reads_first(self, profile: Profile, idle: list[float], busy: list[float]) -> None:
        """First-byte times of cold reads outside the dataset during its prefetch, against
        the same reads of an idle daemon: p50 within 2x is the issue's target."""
        if not idle or not busy:
            self.report.note(f"reads first on {profile.name}: no reads during the prefetch")
            return
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            before, during = _quantile(idle, q), _quantile(busy, q)
            self.report.add(
                Row(
                    "W1 reads first",
                    "s3cachefs prefetch",
                    profile.name,
                    f"{name} first byte, {len(busy)} cold reads during",
                    during * 1000,
                    "ms",
                    during / before,
                    f"vs idle {before * 1000:.1f} ms",
                    "<= 2.0" if name == "p50" else "",
                )
            )

    def footprint(self, system: str, profile: Profile, cpu: float, peak: int) -> None:
        """CPU seconds per GB and peak RSS of every process of a W1 system, together."""
        gb = self.data.total_bytes / 1e9
        self.report.add(
            Row(
                "W1 prefetch/sync",
                system,
                profile.name,
                "CPU s/GB, all processes",
                cpu / gb,
                "s/GB",
            )
        )
        self.report.add(
            Row(
                "W1 prefetch/sync",
                system,
                profile.name,
                "peak RSS, all processes",
                peak / MB,
                "MB",
                peak / 300e6,
                "of 300 MB",
            )
        )

    def _check_copy(self, target: Path, name: str) -> None:
        got = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        if got != self.data.total_bytes:
            self.report.note(f"{name}: copied {got} bytes, expected {self.data.total_bytes}")

    # -- W2: parallel whole-file reads of the pages --------------------------------

    def w2_all(self, fs: peers.S3CacheFS, sampler: Sampler | None) -> None:
        self.w2("local disk", self.page_paths(self.local / "dataset-v3"))
        self.w2("s3cachefs", self.page_paths(fs.data), sampler)

    def w2(self, system: str, paths: list[Path], sampler: Sampler | None = None) -> None:
        results: dict[str, float] = {}
        for mode in ("cold", "warm"):
            for readers in (1, 8):
                if sampler:
                    sampler.mark(f"w2 {mode} {readers}")
                if mode == "cold":
                    drop_caches()
                secs, n = workloads.read_all(paths, readers)
                key = f"{mode}, {readers} reader{'s' if readers > 1 else ''}"
                results[key] = n / secs / MB
                row = Row("W2 read pages", system, "-", key, n / secs / MB, "MB/s")
                row.unit = f"MB/s ({len(paths) / secs:,.0f} files/s)"
                self.w2_rows.setdefault(system, {})[key] = row
        local = self.w2_rows.get("local disk", {})
        for key, row in self.w2_rows[system].items():
            if system != "local disk" and key in local:
                row.ratio, row.versus = row.value / local[key].value, "vs local"
                if system == "s3cachefs" and key.endswith("8 readers"):
                    row.target = ">= 0.8" if key.startswith("cold") else ">= 0.9"
            self.report.add(row)

    @property
    def w2_rows(self) -> dict[str, dict[str, Row]]:
        if not hasattr(self, "_w2_rows"):
            self._w2_rows: dict[str, dict[str, Row]] = {}
        return self._w2_rows

    def w2_vs_rclone(self) -> None:
        ours, theirs = self.w2_rows.get("s3cachefs", {}), self.w2_rows.get("rclone mount", {})
        for key in ("cold, 8 readers", "warm, 8 readers"):
            if key in ours and key in theirs:
                self.report.add(
                    Row(
                        "W2 read pages",
                        "s3cachefs",
                        "-",
                        f"{key} vs rclone mount",
                        ours[key].value,
                        "MB/s",
                        ours[key].value / theirs[key].value,
                        "vs rclone mount",
                        ">= 1.0",
                    )
                )

    # -- W3: cold reads, no prefetch -----------------------------------------------

    def w3(self, net: Network) -> None:
        p = net.profile
        fs = peers.S3CacheFS(net.endpoint_url, self.scratch("s3cachefs-cold"))
        fs.start()
        try:
            for _ in os.walk(fs.data):  # listings warm, data cold
                pass
            rng = random.Random(11)
            keys = rng.sample([k for k, _ in self.data.pages], 20 if self.args.small else 50)
            s3 = boto3.client(
                "s3",
                endpoint_url=net.endpoint_url,
                config=Config(s3={"addressing_style": "path"}),
                aws_access_key_id=peers.KEY,
                aws_secret_access_key=peers.KEY,
                region_name="us-east-1",
            )
            s3.head_bucket(Bucket=peers.BUCKET)  # a warm connection, like the daemon's pool

            def raw_first_byte(key: str) -> None:
                body = s3.get_object(Bucket=peers.BUCKET, Key=key)["Body"]
                body.read(1)
                raw_rest.append(body)

            raw_rest: list[Any] = []
            times, mine = [], []
            for key in keys:  # side by side, key by key: the shared machine's load drifts
                mine.append(workloads.one_first_byte(fs.mnt / key))
                start = time.perf_counter()
                raw_first_byte(key)
                times.append(time.perf_counter() - start)
                raw_rest.pop().read()  # drain untimed so the connection is reused
            raw = sorted(times)[len(times) // 2]
            ours = statistics.median(mine)
            self.report.add(
                Row(
                    "W3 cold first byte",
                    "s3cachefs",
                    p.name,
                    f"median of {len(keys)} files",
                    ours * 1000,
                    "ms",
                    ours / raw,
                    f"vs raw GET {raw * 1000:.1f} ms",
                    "<= 1.3",
                )
            )
            key, size = self.data.large[0]
            drop_caches()
            net.reset()
            secs, n = workloads.read_all([fs.mnt / key] * 8, 8)
            fetched = net.bytes_sent()
            self.report.add(
                Row(
                    "W3 8 readers, 1 cold file",
                    "s3cachefs",
                    p.name,
                    f"{size // MIB} MiB, {n / secs / MB:,.0f} MB/s read",
                    fetched / MB,
                    "MB from S3",
                    fetched / size,
                    "of object size",
                    "<= 1.1",
                )
            )
        finally:
            fs.stop()
            shutil.rmtree(fs.cache.parent, ignore_errors=True)

    # -- W4: stat walk -------------------------------------------------------------

    def w4(self, fs: peers.S3CacheFS, net: Network) -> None:
        # Medians of W4_ROUNDS side-by-side passes: a pass of the small set takes 13-30 ms.
        local_rates, rates, requests = [], [], 0.0
        for _ in range(W4_ROUNDS):
            drop_caches()
            local_secs, local_n = workloads.walk(self.local / "dataset-v3")
            drop_caches()
            net.reset()
            secs, n = workloads.walk(fs.data)
            requests += net.requests()
            local_rates.append(local_n / local_secs)
            rates.append(n / secs)
        local_rate, rate = statistics.median(local_rates), statistics.median(rates)
        self.report.add(
            Row(
                "W4 walk+stat",
                "local disk",
                "-",
                f"{local_n} entries, median of {W4_ROUNDS}",
                local_rate,
                "entries/s",
            )
        )
        self.report.add(
            Row(
                "W4 walk+stat",
                "s3cachefs",
                "-",
                f"{n} entries, prefetched, median of {W4_ROUNDS}",
                rate,
                "entries/s",
                rate / local_rate,
                "vs local",
                ">= 0.5",
            )
        )
        self.report.add(
            Row(
                "W4 walk+stat",
                "s3cachefs",
                "-",
                f"S3 requests during the {W4_ROUNDS} walks",
                requests,
                "requests",
                target="== 0",
            )
        )

    # -- W5: the daemon's footprint ------------------------------------------------

    def w5(self, sampler: Sampler, profile: Profile) -> None:
        cpu = sampler.cpu()
        peak8 = max((v for k, v in sampler.peak.items() if k.endswith(" 8")), default=0)
        overall = max(sampler.peak.values(), default=0)
        if peak8:
            self.report.add(
                Row(
                    "W5 daemon",
                    "s3cachefs",
                    profile.name,
                    "peak RSS, 8 readers",
                    peak8 / MB,
                    "MB",
                    peak8 / 300e6,
                    "of 300 MB",
                    "<= 1.0",
                )
            )
        self.report.add(
            Row(
                "W5 daemon",
                "s3cachefs",
                profile.name,
                "peak RSS, prefetch" + (" + W2 + W4" if peak8 else ""),
                overall / MB,
                "MB",
            )
        )
        self.report.add(
            Row(
                "W5 daemon",
                "s3cachefs",
                profile.name,
                "CPU s, prefetch" + (" + W2 + W4" if peak8 else ""),
                cpu,
                "s",
            )
        )


def _until_download(net: Network, stop: threading.Event) -> bool:
    """Wait for the prefetch's first byte from the server: the reads-first probes are
    "while a prefetch saturates the link", not during its listing (no GET of it out).
    False if it ended first."""
    while net.bytes_sent() == 0:
        if stop.wait(0.01):
            return False
    return True


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--small", action="store_true", help="~1,000 files + one 96 MiB object")
    parser.add_argument(
        "--profile",
        default="local,lan,wan",
        help="comma list of local, lan, wan (first: W2, W4, W5 too)",
    )
    parser.add_argument("--json", type=Path, help="default bench/results/DATE-MODE.json")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default: a tmp dir)")
    parser.add_argument(
        "--only",
        choices=("w1", "w6", "refresh", "readsfirst", "w3"),
        default="",
        help="run one workload (w1: prefetch, its reads-first run, sync and the copy tools on"
        " every profile, no mounts; w6: bench/cluster.py; refresh: bench/refresh.py; readsfirst:"
        " a prefetch with the reads-first probes, no peers; w3: cold first byte)",
    )
    args = parser.parse_args()
    args.profile = [p.strip() for p in args.profile.split(",") if p.strip()]
    for name in args.profile:
        if name not in PROFILES:
            parser.error(f"unknown profile {name!r}")
    work = Path(tempfile.mkdtemp(prefix="s3cachefs-bench-", dir=args.workdir))
    suite = Suite(args, work)
    started = time.perf_counter()
    try:
        suite.run()
        suite.w2_vs_rclone()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mem = psutil.virtual_memory().total / 2**30
    header = (
        f"python -m bench {' '.join(sys.argv[1:])}  |  {date.today()}  |  {os.cpu_count()} cores,"
        f" {mem:.0f} GiB, Linux {platform.release()}  |  {time.perf_counter() - started:.0f} s"
    )
    print(header)
    print(suite.report.table())
    mode = ("small" if args.small else "full") + (f"-{args.only}" if args.only else "")
    out = args.json or (Path(__file__).parent / "results" / f"{date.today()}-{mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, **suite.report.json()}, indent=1))
    print(f"wrote {out}")

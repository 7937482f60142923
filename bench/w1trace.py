"""Where W1's prefetch spends its first seconds: a timeline seen from the S3 server.

    python -m bench.w1trace [--small] [--profile wan] [--runs 2] [--peer] [--log] [--inflight]
                            [--before OTHER/.venv/bin/s3cachefs]

Same dataset, server, network profile and mount as ``python -m bench`` W1, and
nothing else: for each run, a fresh cache, ``s3cachefs prefetch --json``,
then the server's own log of requests (`bench.dirs3` ``/_bench/events``) and
its bytes sent (polled every 50 ms). Printed, from the moment the client
started: when each LIST arrived and ended, when the first GET arrived, when
the job said its listing was done, when the last byte left, the end; and the
MB/s overall and from the first GET to the last byte, the daemon's own
CPU seconds and its bulk workers' (per GB). ``--peer`` times ``s5cmd cp`` the same way
once per run; ``--before`` runs another checkout's install alternately with
this one, each going first in every other run (before/after in one run);
``--log`` prints the daemon's log lines on the same clock. At the end, the
medians: MB/s, ratio to s5cmd, share of the link, and the wall split. The load
average goes with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench import peers
from bench.common import drop_caches
from bench.dataset import MIB, generate
from bench.network import PROFILES, RATE_BYTES, Network

MB = 1e6


def _events(net: Network) -> list[tuple[float, float, str]]:
    with urllib.request.urlopen(net.stats_url + "/_bench/events", timeout=10) as r:
        return [(float(a), float(e), str(op)) for a, e, op in json.load(r)]


def _timeline(net: Network, total: int, cmd: list[str], environ: dict[str, str]) -> dict[str, Any]:
    drop_caches()
    net.reset()
    sent: list[tuple[float, int]] = []
    stop = threading.Event()
    start, wall = time.monotonic(), time.time()

    def poll() -> None:
        while not stop.wait(0.05):
            sent.append((time.monotonic() - start, net.bytes_sent()))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listed = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if listed is None and line.startswith(b"{") and json.loads(line).get("listing_done"):
            listed = time.monotonic() - start
    code = proc.wait()
    end = time.monotonic() - start
    stop.set()
    poller.join()
    if code:
        raise RuntimeError(
            f"{cmd[0]} exit {code}: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}"
        )
    events = [(a - start, e - start, op) for a, e, op in _events(net)]
    lists = [(a, e) for a, e, op in events if op == "list"]
    gets = sorted(a for a, _, op in events if op == "get")
    last = next((t for t, b in sent if b >= total), end)
    return {
        "lists": lists,
        "get_spans": [(a, e) for a, e, op in events if op == "get"],
        "first_get": gets[0] if gets else None,
        "gets": len(gets),
        "listed": listed,
        "last_byte": last,
        "end": end,
        "sent": sent,
        "wall": wall,
    }


def _print(name: str, t: dict[str, Any], total: int) -> None:
    lists = " ".join(f"[{a:.2f}-{e:.2f}]" for a, e in t["lists"])
    cpu = (
        f"; daemon CPU {t['daemon_cpu']:.2f} s, workers {t['workers_cpu']:.2f} s "
        f"({t['workers_cpu'] / total * 1e9:.2f} CPU-s/GB)"
        if "daemon_cpu" in t
        else ""
    )
    print(f"{name}: LISTs {lists}; first GET {t['first_get']:.2f} s; {t['gets']} GETs{cpu}")
    at = t["listed"] if t["listed"] is not None else (t["lists"][-1][1] if t["lists"] else 0.0)
    before = max((b for s, b in t["sent"] if s <= at), default=0)
    first = t["first_get"] or 0.0
    print(
        f"  listing done {at:.2f} s ({before / MB:.0f} MB sent by then), last byte "
        f"{t['last_byte']:.2f} s, end {t['end']:.2f} s; {total / t['end'] / MB:.1f} MB/s overall, "
        f"{total / max(1e-9, t['last_byte'] - first) / MB:.1f} MB/s first GET to last byte"
    )


def _print_inflight(t: dict[str, Any], step: float = 0.25) -> None:
    """GETs in flight at the server (mean over each step) and MB/s sent, step by step."""
    spans, sent = t["get_spans"], t["sent"]
    if not spans:
        return
    cells = []
    at = min(a for a, _ in spans)
    while at < t["end"]:
        busy = sum(max(0.0, min(e, at + step) - max(a, at)) for a, e in spans) / step
        b0 = max((b for s, b in sent if s <= at), default=0)
        b1 = max((b for s, b in sent if s <= at + step), default=0)
        cells.append(f"{at:.2f}:{busy:.0f}/{(b1 - b0) / step / MB:.0f}")
        at += step
    print("  in flight/MB/s: " + " ".join(cells))


def _print_log(path: Path, wall: float) -> None:
    """The daemon's log lines written since ``wall``, with seconds since then."""
    for line in path.read_text().splitlines():
        stamp = line[:23]
        try:
            when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
        except ValueError:
            continue
        rel = when + int(stamp[20:23]) / 1000 - wall
        if rel >= 0:
            print(f"    {rel:6.3f} {line[24:][:150]}")


def _prefetch(net: Network, total: int, work: Path, cli: str | None, log: bool) -> dict[str, Any]:
    """One ``s3cachefs prefetch`` on a fresh mount (``cli``: another install's CLI)."""
    fs = peers.S3CacheFS(net.endpoint_url, work)
    if cli:
        fs.cli = cli
    fs.start()
    try:
        cmd, environ = fs.prefetch_command()
        daemon = psutil.Process(fs.pid)
        cpu = sum(daemon.cpu_times()[:2])
        workers = {p.pid: sum(p.cpu_times()[:2]) for p in daemon.children()}
        t = _timeline(net, total, cmd, environ)
        t["daemon_cpu"] = sum(daemon.cpu_times()[:2]) - cpu  # its own, not the workers'
        # The bulk workers (started with the daemon; any started since: their whole life).
        t["workers_cpu"] = sum(
            sum(p.cpu_times()[:2]) - workers.get(p.pid, 0.0) for p in daemon.children()
        )
        if log:
            _print_log(fs.cache / "daemon.log", t["wall"])
        return t
    finally:
        fs.stop()
        shutil.rmtree(fs.cache.parent, ignore_errors=True)


def _summary(name: str, runs: list[dict[str, Any]], total: int, best: float, link: float) -> None:
    """Medians: MB/s, ratio to the peer, share of the link, the wall split."""

    def med(f: Any) -> float:
        return float(statistics.median(f(t) for t in runs))

    rate = med(lambda t: total / t["end"] / MB)
    listed = med(lambda t: t["lists"][0][1] if t["listed"] is None else t["listed"])
    print(
        f"  {name:<10} {rate:6.1f} MB/s  "
        + (f"{rate / best:4.2f}x s5cmd  " if best else "")
        + (f"{rate / link:4.0%} of the link  " if link else "")
        + f"first LIST {med(lambda t: t['lists'][0][0]):.2f}  first GET "
        f"{med(lambda t: t['first_get']):.2f}  listing {listed:.2f} / last byte "
        f"{med(lambda t: t['last_byte']):.2f} / rest {med(lambda t: t['end'] - t['last_byte']):.2f}"
        f" s"
        + (
            f"; daemon CPU {med(lambda t: t['daemon_cpu']):.2f} s, workers "
            f"{med(lambda t: t['workers_cpu'] / total * 1e9):.2f} CPU-s/GB"
            if "daemon_cpu" in runs[0]
            else ""
        )
        + f"  (median of {len(runs)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.w1trace", description=__doc__)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--profile", default="wan", choices=sorted(PROFILES))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help="s5cmd cp too (once per run)")
    parser.add_argument("--log", action="store_true", help="the daemon's log lines, timed")
    parser.add_argument(
        "--inflight", action="store_true", help="GETs in flight and MB/s sent every 0.25 s"
    )
    parser.add_argument(
        "--before", help="another install's s3cachefs CLI, run alternately with this one"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="w1trace-"))
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": [], "s5cmd": []}
    try:
        pages, large, size = (1000, 1, 96 * MIB) if args.small else (4000, 3, 512 * MIB)
        data = generate([work / "s3" / peers.BUCKET], pages, large, size)
        total = data.total_bytes
        profile = PROFILES[args.profile]
        net = Network(profile, work / "s3")
        s5cmd, _ = peers.which_s5cmd() if args.peer else (None, "")
        try:
            net.open()
            for run in range(args.runs):
                systems = [("before", args.before), ("after", None)] if args.before else []
                if run % 2:  # alternate which goes first: the machine drifts
                    systems.reverse()
                for name, cli in systems or [("after", None)]:
                    t = _prefetch(net, total, work / f"fs-{name}-{run}", cli, args.log)
                    results[name].append(t)
                    load = os.getloadavg()[0]
                    _print(f"prefetch {name} run {run + 1} ({load:.1f} load)", t, total)
                    if args.inflight:
                        _print_inflight(t)
                if s5cmd:
                    target = work / "copy"
                    cmd, environ = peers.s5cmd_cp_command(s5cmd, net.endpoint_url, target)
                    t = _timeline(net, total, cmd, environ)
                    results["s5cmd"].append(t)
                    _print(f"s5cmd cp ({os.getloadavg()[0]:.1f} load)", t, total)
                    if args.inflight:
                        _print_inflight(t)
                    shutil.rmtree(target, ignore_errors=True)
        finally:
            net.close()
        link = RATE_BYTES[profile.rate] / MB if profile.shaped else 0.0
        peer = [total / t["end"] / MB for t in results["s5cmd"]]
        best = statistics.median(peer) if peer else 0.0
        print(f"{profile.name}, {total / MB:.0f} MB, load {os.getloadavg()}:")
        for name, runs in results.items():
            if runs:
                _summary(name, runs, total, best, link)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

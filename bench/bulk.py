"""Issue 12's engines against the sync tools, on the same data in one run.

    python -m bench.bulk [--small] [--profile local] [--systems LIST] [--repeat N]
                         [--py-spy FILE]

Generates the bench dataset (`bench.dataset`; ``--small``: 1,000 pages + 1 x
96 MiB, else 4,000 pages + 3 x 512 MiB), serves it behind one network profile
(`bench.network`) and runs each system from cold (empty target, page cache
dropped), ``--repeat`` times, interleaved. For each: wall time, MB/s, CPU
seconds per GB and peak RSS of every process it runs (`bench.usage`), the
1-minute load average when it started (the machine is shared), and for the
engines their own phase times. Systems:

  s5cmd, rclone, aws   the peers (`bench.peers`); rclone-nocheck: rclone without its MD5 check
  prefetch             ``s3cachefs prefetch`` on a fresh mount (daemon + client);
                       ``--py-spy FILE``: py-spy records the daemon meanwhile (collapsed
                       stacks of the thread holding the GIL)
  threads, procs, crt  the prototype engines (`bench.bulkrun`), e.g. ``procs:2x8``
                       (2 processes x 8 threads), ``threads:16``, ``crt:10`` (10 Gbit/s
                       target); suffix ``-nomd5``: block CRCs only (what the MD5 costs);
                       ``-probe``: 50 first-byte GETs from the engine's own process when
                       idle, then more during the download (p50/p99: do reads go first?)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import peers
from bench.common import drop_caches
from bench.dataset import PREFIX, generate
from bench.network import PROFILES, Network
from bench.usage import Usage

MIB = 1024 * 1024


def _engine_command(spec: str, endpoint: str, dest: Path) -> list[str]:
    spec, probe, _ = spec.partition("-probe")
    spec, nodigest, _ = spec.partition("-nomd5")
    name, _, shape = spec.partition(":")
    cmd = [sys.executable, "-m", "bench.bulkrun", endpoint, peers.BUCKET, PREFIX, str(dest)]
    cmd += ["--engine", name]
    if name == "procs":
        procs, _, threads = (shape or "2x8").partition("x")
        cmd += ["--procs", procs, "--threads", threads]
    elif name == "threads":
        cmd += ["--threads", shape or "16"]
    elif name == "crt":
        cmd += ["--gbps", shape or "10"]
    cmd += ["--probe", "50"] if probe else []
    return [*cmd, "--no-digest"] if nodigest else cmd


def _command(spec: str, url: str, target: Path) -> peers.Command:
    if spec == "s5cmd":
        return peers.s5cmd_cp_command(peers.which_s5cmd()[0] or "", url, target)
    if spec in ("rclone", "rclone-nocheck"):
        cmd, environ = peers.rclone_copy_command(peers.which_rclone()[0] or "", url, target)
        if spec == "rclone-nocheck":  # what rclone's own MD5 check after each download costs
            cmd.append("--ignore-checksum")
        return cmd, environ
    if spec == "aws":
        return peers.aws_sync_command(peers.which_aws()[0] or "", url, target)
    return _engine_command(spec, url, target), peers.env()


def run_one(spec: str, net: Network, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    target = work / "target"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    url = net.endpoint_url
    extra: dict[str, Any] = {}
    pids: list[int] = []
    mount: peers.S3CacheFS | None = None
    spy: subprocess.Popen[bytes] | None = None
    if spec == "prefetch":
        mount = peers.S3CacheFS(url, target)
        mount.start()
        pids = [mount.pid]
        cmd, environ = mount.prefetch_command()
    else:
        cmd, environ = _command(spec, url, target)
    try:
        drop_caches()
        load = os.getloadavg()[0]
        if mount is not None and args.py_spy:
            spy = subprocess.Popen(
                [str(peers.TOOLS / "pyspy" / "bin" / "py-spy"), "record", "-p", str(mount.pid),
                 "-o", args.py_spy, "-f", "raw", "-r", "200", "--nonblocking", "--gil"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        usage = Usage(pids)
        server = Usage([p.pid for p in net.procs])  # the S3 server (and proxy)
        start = time.perf_counter()
        proc = usage.popen(cmd, env=environ, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        lines = proc.stdout.read().decode().splitlines()
        code = usage.wait(proc)
        secs = time.perf_counter() - start
        cpu, peak = usage.stop()
        server_cpu, _ = server.stop()
        if lines and lines[-1].startswith("{"):
            extra = json.loads(lines[-1])
        got = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        if mount is not None:
            got = extra.get("bytes_done", 0)
        return {"system": spec, "secs": secs, "cpu": cpu, "sys": usage.system, "peak": peak,
                "server": server_cpu,
                "load": load,
                "code": code, "bytes": got, "extra": extra}  # fmt: skip
    finally:
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its file
            spy.wait(60)
        if mount is not None:
            mount.stop()
        shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--pages", type=int)
    parser.add_argument("--large", type=int)
    parser.add_argument("--profile", default="local", choices=sorted(PROFILES))
    parser.add_argument("--systems", default="s5cmd,rclone,prefetch,threads:16,procs:2x8,crt")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--py-spy", help="record the daemon during prefetch into this file")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    pages, large, size = (1000, 1, 96 * MIB) if args.small else (4000, 3, 512 * MIB)
    pages = args.pages if args.pages is not None else pages
    large = args.large if args.large is not None else large
    work = Path(tempfile.mkdtemp(prefix="s3cachefs-bulk-", dir=args.workdir))
    try:
        data = generate([work / "s3" / peers.BUCKET], pages, large, size)
        total = data.total_bytes
        print(f"dataset: {data.count} objects, {total / 1e6:,.0f} MB; profile {args.profile}")
        net = Network(PROFILES[args.profile], work / "s3").open()
        rows = []
        try:
            for _ in range(args.repeat):
                for spec in args.systems.split(","):
                    row = run_one(spec, net, work, args)
                    ok = row["code"] == 0 and row["bytes"] == total
                    rows.append(row)
                    phases = {k: row["extra"][k] for k in ("listing", "download")
                              if k in row["extra"]}  # fmt: skip
                    if "download" in phases:  # the rate without the process's start-up
                        phases["MB/s after listing"] = round(total / phases["download"] / 1e6)
                    for k in ("probe_idle", "probe_busy"):
                        if k in row["extra"]:
                            phases[k] = row["extra"][k]
                    print(
                        f"{spec:<14} {row['secs']:6.2f} s {total / row['secs'] / 1e6:7.1f} MB/s"
                        f"  CPU {row['cpu'] / (total / 1e9):5.2f} s/GB"
                        f" ({row['sys'] / max(row['cpu'], 1e-9):3.0%} sys)"
                        f"  peak RSS {row['peak'] / 1e6:6.0f} MB  server CPU {row['server']:4.1f} s"
                        f"  load {row['load']:.1f}"
                        f"  {'ok' if ok else 'FAILED ' + str(row['code'])} {phases or ''}",
                        flush=True,
                    )
                    if not ok:
                        print(f"   {row['extra']}", flush=True)
        finally:
            net.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Which local S3 server is fast enough not to be what `python -m bench` measures.

    python -m bench.serverprobe [--s3rver PATH]

Each candidate runs as its own process on 127.0.0.1 with the same objects
(40 x 300 KB, 1 x 64 MiB). Client: boto3, one client per process, warm
connections. Three probes: p50 latency of a 100 KB GET (sequential), 8
processes GETting 300 KB objects (req/s), 4 processes GETting the 64 MiB object
(MB/s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

MIB = 1024 * 1024
SMALL = 300_000


def client(url: str, key: str = "bench") -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=key,
        aws_secret_access_key=key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen")


def _gets(url: str, cred: str, keys: list[str]) -> int:
    s3 = client(url, cred)
    return sum(len(s3.get_object(Bucket="bench", Key=k)["Body"].read()) for k in keys)


def _probe(url: str, cred: str) -> dict[str, float]:
    s3 = client(url, cred)
    lat = []
    for _ in range(100):
        t = time.perf_counter()
        s3.get_object(Bucket="bench", Key="lat")["Body"].read()
        lat.append(time.perf_counter() - t)
    small = [f"small/{i}" for i in range(40)]
    with ProcessPoolExecutor(8) as pool:
        t = time.perf_counter()
        n = sum(pool.map(_gets, [url] * 8, [cred] * 8, [small * 3] * 8))
        small_secs = time.perf_counter() - t
    with ProcessPoolExecutor(4) as pool:
        t = time.perf_counter()
        big = sum(pool.map(_gets, [url] * 4, [cred] * 4, [["big"]] * 4))
        big_secs = time.perf_counter() - t
    return {
        "get_100k_p50_ms": statistics.median(lat) * 1000,
        "small_req_per_s": 8 * len(small) * 3 / small_secs,
        "small_mb_per_s": n / small_secs / 1e6,
        "large_mb_per_s": big / big_secs / 1e6,
    }


def _objects() -> dict[str, bytes]:
    objs = {f"small/{i}": os.urandom(SMALL) for i in range(40)}
    objs["lat"] = os.urandom(100_000)
    objs["big"] = os.urandom(64 * MIB)
    return objs


def _upload(url: str, cred: str, objs: dict[str, bytes]) -> None:
    s3 = client(url, cred)
    s3.create_bucket(Bucket="bench")
    for key, body in objs.items():
        s3.put_object(Bucket="bench", Key=key, Body=body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--s3rver", default=shutil.which("s3rver"), help="s3rver (npm) binary")
    args = parser.parse_args()
    objs = _objects()
    work = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    venv_bin = Path(sys.executable).parent
    # name -> (command for a port, credentials, whether to upload through S3)
    servers: dict[str, tuple[Callable[[int], list[str]], str, bool]] = {
        "dirs3 (bench/dirs3.py)": (
            lambda p: [sys.executable, "-m", "bench.dirs3", str(work / "dirs3"), "--port", str(p)],
            "bench",
            False,
        ),
        "moto server": (
            lambda p: [str(venv_bin / "moto_server"), "-H", "127.0.0.1", "-p", str(p)],
            "bench",
            True,
        ),
    }
    if args.s3rver:
        servers["s3rver (npm)"] = (
            lambda p: [args.s3rver, "-d", str(work / "s3rver"), "-a", "127.0.0.1", "-p", str(p)],
            "S3RVER",
            True,
        )
    (work / "dirs3" / "bench" / "small").mkdir(parents=True)
    for key, body in objs.items():
        (work / "dirs3" / "bench" / key).write_bytes(body)
    (work / "s3rver").mkdir()
    results: dict[str, dict[str, float]] = {}
    try:
        for name, (command, cred, upload) in servers.items():
            port = free_port()
            proc = subprocess.Popen(
                command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                _wait_port(port, proc)
                url = f"http://127.0.0.1:{port}"
                if upload:
                    _upload(url, cred, objs)
                results[name] = _probe(url, cred)
            except Exception as exc:
                print(f"{name}: failed: {exc}")
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        shutil.rmtree(work)
    head = f"{'GET 100KB p50 ms':>17} {'300KB req/s':>12} {'MB/s':>7} {'64MiB MB/s':>11}"
    print(f"{'server':<24} {head}")
    for name, r in results.items():
        print(
            f"{name:<24} {r['get_100k_p50_ms']:>17.2f} {r['small_req_per_s']:>12.0f} "
            f"{r['small_mb_per_s']:>7.0f} {r['large_mb_per_s']:>11.0f}"
        )


if __name__ == "__main__":
    main()

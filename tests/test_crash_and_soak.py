"""kill -9 at random moments, and a bounded soak: readers, a prefetch and eviction at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from s3cachefs.cli.locals3 import LocalS3
from tests.conftest import Bucket, Mounter, run_cli, s3cachefs_cmd

MIB = 1024 * 1024
# The soak's length; the default keeps CI short, S3CACHEFS_SOAK_SECONDS=300 for a real soak.
SOAK_SECONDS = float(os.environ.get("S3CACHEFS_SOAK_SECONDS", "15"))


def content(key: str, size: int) -> bytes:
    """Every file's bytes follow from its name: readers in other processes can check them."""
    return random.Random(key).randbytes(size)


def fill(bucket: Bucket, prefix: str, count: int, size: int) -> dict[str, int]:
    sizes = {f"{prefix}/d{i % 5}/f{i:03d}.bin": size + 997 * i for i in range(count)}
    for key, n in sizes.items():
        bucket.put(key, content(key, n))
    return sizes


def test_kill9_at_random_moments_never_serves_wrong_bytes(bucket: Bucket, mounter: Mounter) -> None:
    sizes = fill(bucket, "ds", 24, 300_000)
    rng = random.Random(11)
    slow = LocalS3(latency=0.02).start()
    wrong: list[str] = []
    try:
        deadline = time.monotonic() + 45
        rounds = 0
        while rounds < 6 and time.monotonic() < deadline:
            mount = mounter(bucket.name, server=slow, name=f"m{rounds}")
            job = subprocess.Popen(
                s3cachefs_cmd("prefetch", "ds", "--mount", str(mount.path), "--jobs", "4"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stop = threading.Event()

            def reader(root: Path = mount.path, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    key = rng.choice(sorted(sizes))
                    try:
                        data = (root / key).read_bytes()
                    except OSError:
                        return  # the daemon died under us: an error, never wrong bytes
                    if data != content(key, sizes[key]):
                        wrong.append(key)

            thread = threading.Thread(target=reader)
            thread.start()
            time.sleep(rng.uniform(0.2, 1.2))
            mount.kill9()
            stop.set()
            thread.join(timeout=30)
            job.wait(timeout=30)
            mount.stop()  # clears the stale mount
            rounds += 1
        assert rounds >= 3
        slow.reset()
        final = mounter(bucket.name, server=slow, name="final")
        result = run_cli("prefetch", "ds", "--mount", str(final.path))
        assert result.returncode == 0, result.stderr
        for key, n in sizes.items():
            assert (final.path / key).read_bytes() == content(key, n), key
        assert len(slow.gets()) < len(sizes)  # earlier rounds' verified work was reused
    finally:
        slow.stop()
    assert wrong == []


def _soak_reader(root: str, sizes: dict[str, int], seconds: float, seed: int) -> tuple[int, int]:
    """Random and sequential reads until time is up; returns (reads, wrong reads)."""
    rng = random.Random(seed)
    keys = sorted(sizes)
    reads = wrong = 0
    expected_cache: dict[str, bytes] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        key = rng.choice(keys)
        expected = expected_cache.setdefault(key, content(key, sizes[key]))
        with open(os.path.join(root, key), "rb") as f:
            if rng.random() < 0.5:
                data = f.read()
                ok = data == expected
            else:
                offset = rng.randrange(sizes[key])
                length = rng.randrange(1, 256 * 1024)
                ok = os.pread(f.fileno(), length, offset) == expected[offset : offset + length]
        reads += 1
        wrong += not ok
    return reads, wrong


@pytest.mark.soak
def test_soak_readers_prefetch_and_eviction_together(bucket: Bucket, mounter: Mounter) -> None:
    pinned = fill(bucket, "pinned", 10, 400_000)  # ~4 MB, prefetched during the soak
    churn = fill(bucket, "churn", 40, 600_000)  # ~26 MB read through a 16 MiB cache
    mount = mounter(bucket.name, "--cache-size", "16M", "--min-free", "0")
    daemon = psutil.Process(mount.proc.pid)
    prefetch = subprocess.Popen(
        s3cachefs_cmd("prefetch", "pinned", "--mount", str(mount.path), "--jobs", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak_rss = 0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        work = [
            pool.apply_async(_soak_reader, (str(mount.path), churn | pinned, SOAK_SECONDS, seed))
            for seed in range(8)
        ]
        while not all(w.ready() for w in work):
            peak_rss = max(peak_rss, daemon.memory_info().rss)
            time.sleep(0.2)
        results = [w.get(timeout=60) for w in work]
    _, err = prefetch.communicate(timeout=120)
    assert prefetch.returncode == 0, err
    reads = sum(r for r, _ in results)
    assert sum(w for _, w in results) == 0
    assert reads > 100
    status = json.loads(run_cli("status", str(mount.path), "--json").stdout)
    assert status["cache"]["evictions"] > 0  # the cache really churned
    assert status["cache"]["used_bytes"] <= 16 * MIB
    assert peak_rss < 300 * MIB, f"daemon RSS peaked at {peak_rss / MIB:.0f} MiB"
    assert mount.proc.poll() is None
    print(f"soak: {reads} reads in {SOAK_SECONDS:.0f}s, peak RSS {peak_rss / MIB:.0f} MiB")

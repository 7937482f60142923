"""kill -9 at random moments, and a bounded soak: readers, a prefetch and eviction at once."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from s3cachefs.cli.locals3 import LocalS3
from tests.conftest import Bucket, Mounter, drop_page_cache, run_cli, s3cachefs_cmd
from tests.faultproxy import FaultProxy

MIB = 1024 * 1024
# The soak's length; the default keeps CI short, S3CACHEFS_SOAK_SECONDS=600 for a real soak.
# (The daemon only warns about these test variables: they share its prefix.)
SOAK_SECONDS = float(os.environ.get("S3CACHEFS_SOAK_SECONDS", "15"))


def content(key: str, size: int) -> bytes:
    """Every file's bytes follow from its name: readers in other processes can check them."""
    return random.Random(key).randbytes(size)


def fill(bucket: Bucket, prefix: str, count: int, size: int) -> dict[str, int]:
    sizes = {f"{prefix}/d{i % 5}/f{i:03d}.bin": size + 997 * i for i in range(count)}
    bucket.put_many({key: content(key, n) for key, n in sizes.items()})
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


def _soak_reader(
    root: str, sizes: dict[str, int], seconds: float, seed: int
) -> tuple[int, int, dict[str, int]]:
    """Random and sequential reads until time is up: (reads, wrong reads, errors by name)."""
    rng = random.Random(seed)
    keys = sorted(sizes)
    reads = wrong = 0
    errors: dict[str, int] = {}
    expected_cache: dict[str, bytes] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        key = rng.choice(keys)
        expected = expected_cache.setdefault(key, content(key, sizes[key]))
        try:
            with open(os.path.join(root, key), "rb") as f:
                if rng.random() < 0.5:
                    data = f.read()
                    ok = data == expected
                else:
                    offset = rng.randrange(sizes[key])
                    length = rng.randrange(1, 256 * 1024)
                    ok = os.pread(f.fileno(), length, offset) == expected[offset : offset + length]
        except OSError as exc:  # an error is allowed under lies; wrong bytes never are
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            errors[name] = errors.get(name, 0) + 1
            continue
        reads += 1
        wrong += not ok
    return reads, wrong, errors


# The lies a misbehaving server or proxy tells (tests/faultproxy.py), switched on at
# random during the soak with S3CACHEFS_SOAK_LIES=1. Not endless_listing: it is a
# hang to bound, not a lie to survive, and has its own test.
LIES = ("ignore_range", "flip_byte", "short_range", "strip_if_match", "listing_etag")
SOAK_LIES = os.environ.get("S3CACHEFS_SOAK_LIES", "") not in ("", "0")


def _switch_lies(proxy: FaultProxy, stop: threading.Event, rng: random.Random) -> Counter[str]:
    """Every 0.5-3 s: all lies off, or a random few on at random rates. Returns how often
    each was switched on."""
    switched: Counter[str] = Counter()
    while not stop.wait(rng.uniform(0.5, 3.0)):
        chosen = set() if rng.random() < 0.3 else set(rng.sample(LIES, rng.randint(1, len(LIES))))
        for lie in LIES:
            proxy.rates[lie] = rng.uniform(0.05, 0.5) if lie in chosen else 0.0
        switched.update(chosen)
    for lie in LIES:
        proxy.rates[lie] = 0.0
    return switched


def _rss_line(samples: list[tuple[float, int]]) -> str:
    """RSS over the soak: ten evenly spaced samples and the peak, in MiB."""
    picks = [samples[round(i * (len(samples) - 1) / 9)] for i in range(10)]
    over_time = " ".join(f"{t:.0f}s:{rss / MIB:.0f}" for t, rss in picks)
    return f"RSS MiB {over_time} (peak {max(r for _, r in samples) / MIB:.0f})"


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_soak_readers_prefetch_and_eviction_together(
    bucket: Bucket, mounter: Mounter, s3_server: LocalS3
) -> None:
    pinned = fill(bucket, "pinned", 10, 400_000)  # ~4 MB, prefetched during the soak
    churn = fill(bucket, "churn", 40, 600_000)  # ~26 MB read through a 16 MiB cache
    both = churn | pinned
    proxy = None
    if SOAK_LIES:
        off: dict[str, Any] = dict.fromkeys(LIES, 0.0)  # rates, switched later
        proxy = FaultProxy(s3_server.endpoint_url, **off).start()
        assert set(LIES) <= set(proxy.rates)
    seed = int(time.time())
    try:
        mount = mounter(bucket.name, "--cache-size", "16M", "--min-free", "0", server=proxy)
        daemon = psutil.Process(mount.proc.pid)
        prefetch = subprocess.Popen(
            s3cachefs_cmd("prefetch", "pinned", "--mount", str(mount.path), "--jobs", "2"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        stop = threading.Event()
        switched: Counter[str] = Counter()
        if proxy is not None:
            liar = proxy  # for the closure: mypy forgets the check inside it
            rng = random.Random(seed)
            switching = threading.Thread(
                target=lambda: switched.update(_switch_lies(liar, stop, rng))
            )
            switching.start()
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(8) as pool:
            work = [
                pool.apply_async(_soak_reader, (str(mount.path), both, SOAK_SECONDS, seed + n))
                for n in range(8)
            ]
            while not all(w.ready() for w in work):
                samples.append((time.monotonic() - started, daemon.memory_info().rss))
                time.sleep(0.2)
            results = [w.get(timeout=60) for w in work]
        stop.set()
        if proxy is not None:
            switching.join(timeout=30)
        _, err = prefetch.communicate(timeout=120)
        during = prefetch.returncode
        # Lies off: the dataset completes and every byte in the cache is right.
        again = run_cli("prefetch", "pinned", "--mount", str(mount.path))
        assert again.returncode == 0, again.stderr
        drop_page_cache()
        for key, n in both.items():
            assert (mount.path / key).read_bytes() == content(key, n), key
        status = json.loads(run_cli("status", str(mount.path), "--json").stdout)
        assert mount.proc.poll() is None
    finally:
        if proxy is not None:
            proxy.stop()
    reads = sum(r for r, _, _ in results)
    wrong = sum(w for _, w, _ in results)
    errors: Counter[str] = Counter()
    for _, _, e in results:
        errors.update(e)
    lies = f"lies switched on {dict(switched)}, told {dict(proxy.faults)}" if proxy else "no lies"
    print(
        f"soak: {SOAK_SECONDS:.0f}s, 8 readers, {reads} reads, {wrong} wrong, "
        f"errors {dict(errors) or 0}, prefetch during the soak exit {during}; "
        f"{_rss_line(samples)}; cache hit ratio {status['cache']['hit_ratio']}, "
        f"{status['cache']['evictions']} evictions; {lies}; seed {seed}"
    )
    assert wrong == 0
    assert reads > 100
    if proxy is None:  # with no lies nothing may fail
        assert not errors, errors
        assert during == 0, err
    assert status["cache"]["evictions"] > 0  # the cache really churned
    assert status["cache"]["used_bytes"] <= 16 * MIB
    peak_rss = max(rss for _, rss in samples)
    assert peak_rss < 300 * MIB, f"daemon RSS peaked at {peak_rss / MIB:.0f} MiB"

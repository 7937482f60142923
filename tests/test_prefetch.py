"""Prefetch, pinning, offline reads, status, verify, evict: real mounts, real S3 server."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3cachefs.cli.locals3 import LocalS3
from tests.conftest import Bucket, Mount, Mounter, drop_page_cache, run_cli, s3cachefs_cmd

MIB = 1024 * 1024


def fill(bucket: Bucket, prefix: str = "dataset-v3", count: int = 12) -> dict[str, bytes]:
    rng = random.Random(count)
    files = {
        f"{prefix}/{'train' if i % 3 else 'val'}/page-{i:04d}.png": rng.randbytes(
            rng.randint(20_000, 200_000)
        )
        for i in range(count)
    }
    files[f"{prefix}/archive/big.tar"] = rng.randbytes(3 * MIB + 5)
    bucket.put_many(files)
    return files


def prefetch(mount: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("prefetch", *args, "--mount", str(mount.path))


def check_tree(mount: Mount, files: dict[str, bytes], prefix: str = "dataset-v3") -> None:
    seen = {}
    for dirpath, _, names in os.walk(mount.path / prefix):
        for name in names:
            path = Path(dirpath) / name
            seen[path.relative_to(mount.path).as_posix()] = path.read_bytes()
    assert seen == files


def start_prefetch_until(
    mount: Mount, server: LocalS3, gets: int, stderr: int
) -> subprocess.Popen[str]:
    """Start a 2-job prefetch of dataset-v3 and return once ``gets`` GETs reached S3."""
    job = subprocess.Popen(
        s3cachefs_cmd("prefetch", "dataset-v3", "--mount", str(mount.path), "--jobs", "2"),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(server.gets()) < gets and time.monotonic() < deadline:
        time.sleep(0.02)
    return job


@pytest.fixture
def own_s3(s3_server: LocalS3) -> Iterator[LocalS3]:
    """A second endpoint on the same moto state, that a test may slow down or stop."""
    server = LocalS3(latency=0.0).start()
    yield server
    server.stop()


def test_prefetch_then_every_read_is_offline(
    bucket: Bucket, mounter: Mounter, own_s3: LocalS3
) -> None:
    files = fill(bucket)
    mount = mounter(bucket.name, "--metadata-ttl", "0", server=own_s3)
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert "complete, verified and pinned" in result.stdout
    own_s3.stop()  # S3 is gone: the pinned dataset must not notice
    drop_page_cache()
    check_tree(mount, files)
    st = os.stat(mount.path / "dataset-v3" / "archive" / "big.tar")
    assert st.st_size == len(files["dataset-v3/archive/big.tar"])
    assert mount.proc.poll() is None


def test_second_prefetch_downloads_nothing_and_reads_cost_no_requests(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket)
    mount = mounter(bucket.name)
    assert prefetch(mount, "dataset-v3").returncode == 0
    assert bucket.server.counts()["get"] == len(files) + 0  # one run GET per object here
    bucket.server.reset()
    again = prefetch(mount, "dataset-v3", "--json")
    assert again.returncode == 0, again.stderr
    final = json.loads(again.stdout.splitlines()[-1])
    assert (final["event"], final["ok"], final["files_done"]) == ("done", True, len(files))
    assert final["bytes_fetched"] == 0
    assert bucket.server.counts()["get"] == 0
    bucket.server.reset()
    check_tree(mount, files)  # lookups, stats and reads inside the dataset: no request
    counts = bucket.server.counts()
    assert counts["get"] == 0
    assert counts["list"] <= 1  # the mount root only; the dataset is answered by its manifest


def test_refuses_up_front_when_the_dataset_cannot_fit(bucket: Bucket, mounter: Mounter) -> None:
    fill(bucket)
    mount = mounter(bucket.name, "--cache-size", "2M", "--min-free", "0")
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 2
    assert "does not fit" in result.stderr and "MiB" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert bucket.server.counts()["get"] == 0
    dry = prefetch(mount, "dataset-v3", "--dry-run")
    assert dry.returncode == 2, dry.stderr


def test_unknown_dataset_and_no_daemon_are_one_line_errors(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    fill(bucket)
    mount = mounter(bucket.name)
    result = prefetch(mount, "no-such-dataset")
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"s3cachefs: s3://{bucket.name}/no-such-dataset/ holds no objects"
    )
    result = run_cli("prefetch", "dataset-v3", "--mount", str(tmp_path / "not-a-mount"))
    assert result.returncode == 2
    assert "no s3cachefs daemon serves" in result.stderr


def test_progress_json_and_plain_lines(
    bucket: Bucket, mounter: Mounter, s3_server: LocalS3
) -> None:
    fill(bucket, count=30)
    slow = LocalS3(latency=0.03).start()
    try:
        mount = mounter(bucket.name, server=slow)
        result = prefetch(mount, "dataset-v3", "--json", "--jobs", "2")
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert {e["event"] for e in events[:-1]} == {"progress"}
        assert len(events) >= 3
        done = events[-1]
        assert done["ok"] and done["files_done"] == done["files_total"] == 31
        progress = [e["bytes_done"] for e in events[:-1]]
        assert progress == sorted(progress) and progress[0] < done["bytes_total"]

        run_cli("evict", "dataset-v3", "--mount", str(mount.path))
        env = dict(os.environ, S3CACHEFS_PROGRESS_INTERVAL="0.2")
        plain = subprocess.run(
            s3cachefs_cmd("prefetch", "dataset-v3", "--mount", str(mount.path), "--jobs", "2"),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert plain.returncode == 0, plain.stderr
        lines = [ln for ln in plain.stderr.splitlines() if ln.startswith("prefetch: ")]
        assert lines and all("files" in ln and "ETA" in ln for ln in lines)
        assert "\r" not in plain.stderr  # no terminal, no bar
    finally:
        slow.stop()


def test_status_reports_the_cache_and_pinned_datasets(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket)
    mount = mounter(bucket.name, "--cache-size", "1G", "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    result = run_cli("status", str(mount.path), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["mountpoint"] == str(mount.path)
    assert status["cache"]["limit_bytes"] == 1 << 30
    total = sum(map(len, files.values()))
    assert status["cache"]["used_bytes"] == status["cache"]["pinned_bytes"] == total
    assert status["cache"]["bytes_from_s3"] == total
    [dataset] = status["datasets"]
    assert dataset["dataset"] == "dataset-v3"
    assert (dataset["objects"], dataset["bytes"], dataset["complete"]) == (len(files), total, True)
    assert dataset["cached_percent"] == 100.0
    assert status["daemon"]["rss_bytes"] > 0 and status["daemon"]["sentry"] is False
    human = run_cli("status", str(mount.path))
    assert "dataset dataset-v3" in human.stdout and "complete" in human.stdout
    assert "metrics off, sentry off" in human.stdout


def test_shards_are_disjoint_and_cover_the_dataset(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    files = fill(bucket, count=40)
    mount = mounter(bucket.name)
    shards = []
    for i in range(3):
        out = tmp_path / f"shard-{i}.txt"
        result = prefetch(mount, "dataset-v3", "--shard", f"{i}/3", "--list-out", str(out))
        assert result.returncode == 0, result.stderr
        shards.append(set(out.read_text().split()))
    assert set().union(*shards) == set(files)
    assert sum(map(len, shards)) == len(files)
    assert all(shards)
    assert bucket.server.counts()["get"] == len(files)  # every object once, across shards
    bad = prefetch(mount, "dataset-v3", "--shard", "3/3")
    assert bad.returncode == 2 and "bad shard" in bad.stderr


def test_kill9_mid_prefetch_then_resume_reuses_what_was_verified(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=40)
    slow = LocalS3(latency=0.05).start()
    try:
        mount = mounter(bucket.name, server=slow)
        job = start_prefetch_until(mount, slow, gets=12, stderr=subprocess.DEVNULL)
        mount.kill9()
        job.wait(timeout=30)
        first_run = {r.path for r in slow.gets()}
        assert 12 <= len(first_run) < len(files)
        mount.stop()
        slow.reset()
        again = mounter(bucket.name, server=slow, name="mnt2")
        result = prefetch(again, "dataset-v3")
        assert result.returncode == 0, result.stderr
        second_run = {r.path for r in slow.gets()}
        assert first_run | second_run == {f"/{bucket.name}/{k}" for k in files}
        # what the first run had fetched and written is not fetched again (the in-flight
        # GETs of the two workers when the daemon died are)
        assert len(first_run & second_run) <= 2
        check_tree(again, files)
    finally:
        slow.stop()


def test_a_read_jumps_the_prefetch_queue(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket, count=30)
    slow = LocalS3(latency=0.1).start()
    try:
        mount = mounter(bucket.name, server=slow)
        os.listdir(mount.path / "dataset-v3" / "val")  # listings in, like a worker that started
        job = subprocess.Popen(
            s3cachefs_cmd("prefetch", "dataset-v3", "--mount", str(mount.path), "--jobs", "1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        last = sorted(k for k in files if "/val/" in k)[-1]
        assert (mount.path / last).read_bytes() == files[last]
        assert job.poll() is None, "the read waited for the whole prefetch"
        assert job.wait(timeout=120) == 0
    finally:
        slow.stop()


def test_verify_repairs_a_damaged_file_and_evict_frees_it(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket)
    mount = mounter(bucket.name, "--min-free", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    objects = [p for p in (mount.cache_dir / "v1" / "objects").rglob("*") if p.is_file()]
    victim = max(objects, key=lambda p: p.stat().st_size)  # the 3 MiB archive
    with victim.open("r+b") as f:
        f.seek(2 * MIB + 3)
        f.write(b"\x00garbage\x00")
    bucket.server.reset()
    result = run_cli("verify", "dataset-v3", "--mount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert "1 repaired" in result.stdout and "archive/big.tar" in result.stdout
    assert len(bucket.server.gets()) == 1
    drop_page_cache()
    check_tree(mount, files)

    evicted = run_cli("evict", "dataset-v3", "--mount", str(mount.path))
    assert evicted.returncode == 0, evicted.stderr
    status = json.loads(run_cli("status", str(mount.path), "--json").stdout)
    assert status["datasets"] == [] and status["cache"]["used_bytes"] == 0
    assert not [p for p in (mount.cache_dir / "v1" / "objects").rglob("*") if p.is_file()]


def test_refresh_picks_up_changed_new_and_deleted_objects(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket)
    mount = mounter(bucket.name, "--metadata-ttl", "0")
    assert prefetch(mount, "dataset-v3").returncode == 0
    check_tree(mount, files)  # the kernel now holds the pinned entries (for years)
    changed, deleted = sorted(files)[0], sorted(files)[1]
    files[changed] = b"new content"
    bucket.put(changed, files[changed])
    bucket.delete(deleted)
    del files[deleted]
    files["dataset-v3/val/new.png"] = b"brand new"
    bucket.put("dataset-v3/val/new.png", files["dataset-v3/val/new.png"])
    bucket.server.reset()
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert len(bucket.server.gets()) == 2  # the changed and the new object
    # By path, without a readdir first: the kernel must not keep the old entries.
    assert (mount.path / changed).read_bytes() == files[changed]
    assert not (mount.path / deleted).exists()
    check_tree(mount, files)


def test_ctrl_c_stops_the_job_and_keeps_what_was_verified(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket, count=40)
    slow = LocalS3(latency=0.05).start()
    try:
        mount = mounter(bucket.name, server=slow)
        job = start_prefetch_until(mount, slow, gets=10, stderr=subprocess.PIPE)
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=30)
        assert job.returncode == 130
        assert "Traceback" not in err
        status = json.loads(run_cli("status", str(mount.path), "--json").stdout)
        [dataset] = status["datasets"]
        assert not dataset["complete"] and 0 < dataset["objects"] < len(files)
        assert status["jobs"] == []  # the daemon stopped the job when the client went away
        kept = dataset["objects"]
        slow.reset()
        assert prefetch(mount, "dataset-v3").returncode == 0
        assert len(slow.gets()) <= len(files) - kept
    finally:
        slow.stop()


def test_empty_objects_and_two_datasets_pinned_side_by_side(
    bucket: Bucket, mounter: Mounter
) -> None:
    first = fill(bucket, "dataset-a", count=6)
    first["dataset-a/val/empty.txt"] = b""
    bucket.put("dataset-a/val/empty.txt", b"")
    second = fill(bucket, "dataset-b", count=6)
    mount = mounter(bucket.name, "--min-free", "0")
    for name in ("dataset-a", "dataset-b"):
        result = prefetch(mount, name)
        assert result.returncode == 0, result.stderr
    status = json.loads(run_cli("status", str(mount.path), "--json").stdout)
    by_name = {d["dataset"]: d for d in status["datasets"]}
    assert by_name["dataset-a"]["complete"] and by_name["dataset-b"]["complete"]
    assert by_name["dataset-a"]["cached_percent"] == by_name["dataset-b"]["cached_percent"] == 100
    total = sum(map(len, first.values())) + sum(map(len, second.values()))
    assert status["cache"]["pinned_bytes"] == total
    assert run_cli("evict", "dataset-b", "--mount", str(mount.path)).returncode == 0
    bucket.server.reset()
    check_tree(mount, first, "dataset-a")  # untouched by the other dataset's eviction
    assert bucket.server.counts()["get"] == 0

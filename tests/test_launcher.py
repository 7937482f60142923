"""examples/launcher.py end to end: ensure a dataset, then N local worker processes,
each told its share of the keys (real S3 on loopback; directory mode and daemon mode)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

from tests.conftest import Bucket, Mounter

LAUNCHER = Path(__file__).resolve().parent.parent / "examples" / "launcher.py"


def fill(bucket: Bucket, count: int) -> dict[str, bytes]:
    data = {}
    for i in range(count):
        rel = f"scans/{i % 5}/page{i:03d}.tif"
        data[rel] = random.Random(i).randbytes(500 + 300 * i)
        bucket.put(f"ds/{rel}", data[rel])
    return data


def expected_line(rank: int, workers: int, keys: list[str], data: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    mine = keys[rank::workers]
    for key in mine:
        digest.update(key.encode() + b"\0" + hashlib.sha256(data[key]).digest())
    size = sum(len(data[k]) for k in mine)
    return f"worker {rank}/{workers}: {len(mine)} files, {size} bytes, sha256 {digest.hexdigest()}"


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_launcher_syncs_then_runs_local_workers_on_their_keys(
    bucket: Bucket, tmp_path: Path
) -> None:
    data = fill(bucket, 20)
    common = ["ds", "--bucket", bucket.name, "--endpoint-url", bucket.server.endpoint_url]
    result = launch(*common, "--directory", str(tmp_path / "data"), "--workers", "3", "--local")
    assert result.returncode == 0, result.stderr
    assert f"launcher: ds ready at {tmp_path / 'data' / 'ds'}: 20 objects" in result.stdout
    assert "ds: 20/20 files" in result.stderr  # progress on the terminal (plain lines here)
    keys = sorted(data)
    workers = sorted(line for line in result.stdout.splitlines() if line.startswith("worker"))
    assert workers == [expected_line(rank, 3, keys, data) for rank in range(3)]

    missing = launch(
        "ds",
        "--bucket",
        "no-such-bucket-here",
        "--endpoint-url",
        bucket.server.endpoint_url,
        "--directory",
        str(tmp_path / "other"),
        "--local",
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "launcher: s3://no-such-bucket-here: no such bucket"
    ]


def test_launcher_through_the_daemon_with_a_node_shard(
    bucket: Bucket, tmp_path: Path, mounter: Mounter
) -> None:
    data = fill(bucket, 20)
    mount = mounter(bucket.name)
    result = launch(
        "ds", "--bucket", bucket.name, "--mount", str(mount.path), "--shard", "1/2",
        "--workers", "2", "--local",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"ready at {mount.path / 'ds'}" in result.stdout
    shard = Path(tmp_path / "keys")
    listed = subprocess.run(
        [sys.executable, "-m", "s3cachefs", "prefetch", "ds", "--mount", str(mount.path),
         "--shard", "1/2", "--list-out", str(shard)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    keys = sorted(k.removeprefix("ds/") for k in shard.read_text().split())
    assert 0 < len(keys) < len(data)
    workers = sorted(line for line in result.stdout.splitlines() if line.startswith("worker"))
    assert workers == [expected_line(rank, 2, keys, data) for rank in range(2)]

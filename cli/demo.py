"""``s3cachefs demo``: the quick start on an embedded local S3 server.

Starts moto on loopback, uploads a small document-image-like dataset, mounts
it with the real ``s3cachefs mount`` (a background daemon, as a user would),
prefetches the dataset, reads everything and checks every byte (zero GETs),
then stops the S3 server and reads it all again: a pinned dataset no longer
needs S3.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3cachefs.cli.locals3 import LocalS3

BUCKET = "datasets"
DATASET = "dataset-v3"


def sample_dataset(seed: int = 3) -> dict[str, bytes]:
    """A few dozen 'scanned pages' of 30 KB-600 KB in nested folders, plus one 8 MiB file."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for split in ("train", "val"):
        for batch in range(3):
            for page in range(8):
                size = rng.randint(30_000, 600_000)
                key = f"{DATASET}/{split}/batch-{batch:03d}/page-{page:04d}.png"
                files[key] = rng.randbytes(size)
    files[f"{DATASET}/archive/scans.tar"] = rng.randbytes(8 * 1024 * 1024)
    files[f"{DATASET}/README.txt"] = b"Sample dataset for the s3cachefs quick start.\n"
    return files


def _s3cachefs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "s3cachefs", *args], check=True)


def _read_all(root: Path, expected: dict[str, bytes]) -> tuple[int, int, float]:
    """Walk and read the mounted dataset; return files, bytes, seconds. Raises on a mismatch."""
    start = time.perf_counter()
    files = nbytes = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            data = path.read_bytes()
            key = path.relative_to(root.parent).as_posix()
            if hashlib.sha256(data).digest() != hashlib.sha256(expected[key]).digest():
                raise SystemExit(f"s3cachefs demo: WRONG BYTES in {key}")
            files += 1
            nbytes += len(data)
    if files != len(expected):
        raise SystemExit(f"s3cachefs demo: saw {files} files, expected {len(expected)}")
    return files, nbytes, time.perf_counter() - start


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.workdir)


def run_demo(workdir: Path | None) -> int:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    tmp = Path(tempfile.mkdtemp(prefix="s3cachefs-demo-")) if workdir is None else workdir
    mnt, cache = tmp / "mnt", tmp / "cache"
    mnt.mkdir(parents=True, exist_ok=True)
    server = LocalS3().start()
    print(f"local S3 server: {server.endpoint_url}")
    try:
        s3 = boto3.client("s3", endpoint_url=server.endpoint_url)
        s3.create_bucket(Bucket=BUCKET)
        data = sample_dataset()
        for key, body in data.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        total = sum(map(len, data.values()))
        print(f"uploaded s3://{BUCKET}/{DATASET}/: {len(data)} objects, {total / 1e6:.1f} MB")

        _s3cachefs(
            "mount",
            BUCKET,
            str(mnt),
            "--endpoint-url",
            server.endpoint_url,
            "--cache-dir",
            str(cache),
        )
        try:
            _s3cachefs("prefetch", DATASET, "--mount", str(mnt))
            server.reset()
            files, nbytes, secs = _read_all(mnt / DATASET, data)
            print(
                f"read after prefetch: {files} files, {nbytes / 1e6:.1f} MB in {secs:.2f}s, "
                f"every byte verified, {server.counts()['get']} S3 GETs"
            )
            server.stop()
            _read_all(mnt / DATASET, data)
            print(f"read again with the S3 server stopped: {files} files, every byte verified")
        finally:
            _s3cachefs("unmount", str(mnt))
        print(f"cache dir: {cache} ({_du(cache) / 1e6:.1f} MB on disk)")
    finally:
        server.stop()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print("demo OK")
    return 0


def _du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())

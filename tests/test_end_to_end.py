"""Every object verified end to end (issue 11 row 2): real mounts, moto, a lying proxy.

The proxy flips one byte of GET bodies (same length, headers unchanged):
block CRCs are computed from the bytes as they arrive, so only a digest S3
computed can catch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest

from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.store.checksums import crc64nvme
from tests.conftest import Bucket, Mount, Mounter, drop_page_cache, manifest_checks, run_cli, status
from tests.faultproxy import FaultProxy
from tests.test_checksums import b64int, upload, upload_untyped

MIB = 1024 * 1024
BIG = "ds/big.bin"


class LyingProxy(FaultProxy):
    """The fault proxy (whose ``flip_byte`` flips one byte of a GET body), plus what this
    file needs besides: ``ignore_part_number``, a server that ignores ``?partNumber=`` and
    answers a part HEAD for the whole object, as some S3-compatible ones do; ``flip_middle``,
    ``flip_byte`` at the middle of the body rather than at random (a corrupter that does the
    same every time); and ``seen``.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.ignore_part_number = False
        self.flip_middle = False
        self.seen: list[tuple[str, str]] = []  # (method, path with query) of every request

    def _lie(self, outcome: str, data: bytes) -> bytes:
        if outcome == "flip_byte" and data and self.flip_middle:
            at = len(data) // 2
            return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        return super()._lie(outcome, data)

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        self.seen.append((req.command, req.path))
        if self.ignore_part_number:
            path, _, query = req.path.partition("?")
            kept = [p for p in query.split("&") if p and not p.startswith("partNumber=")]
            req.path = path + ("?" + "&".join(kept) if kept else "")
        super().handle(req)


@pytest.fixture
def proxy(s3_server: LocalS3) -> Iterator[LyingProxy]:
    p = LyingProxy(s3_server.endpoint_url).start()
    assert isinstance(p, LyingProxy)
    yield p
    p.stop()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def prefetch(mount: Mount, *args: str) -> Any:
    return run_cli("prefetch", *args, "--mount", str(mount.path))


@pytest.mark.parametrize(
    ("algorithm", "kind", "check", "described"),
    [
        (None, None, "mpu-etag", "its multipart ETag (3 parts)"),
        ("CRC32", "COMPOSITE", "crc32-composite", "its CRC32 checksum (3 parts)"),
        ("CRC64NVME", "FULL_OBJECT", "crc64nvme-full", "its CRC64NVME checksum"),
    ],
    ids=["etag", "composite", "full"],
)
def test_a_flipped_byte_in_a_multipart_object_fails_prefetch_then_a_rerun_is_right(
    bucket: Bucket,
    mounter: Mounter,
    proxy: LyingProxy,
    algorithm: str | None,
    kind: str | None,
    check: str,
    described: str,
) -> None:
    rng = random.Random(check)
    parts = [rng.randbytes(5 * MIB), rng.randbytes(5 * MIB), rng.randbytes(3 * MIB)]
    data = b"".join(parts)
    upload(bucket, BIG, parts, algorithm, kind)
    mount = mounter(bucket.name, server=proxy)
    proxy.methods = {"GET"}
    proxy.rates["flip_byte"] = 1.0  # every ranged GET body: one byte flipped

    result = prefetch(mount, "ds")
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"FAILED {BIG}: content does not match {described} in S3" in result.stderr
    assert "verified and pinned" not in result.stdout
    assert proxy.faults["flip_byte"] >= 2  # the first download and the one retry
    assert f"prefetch key={BIG} failed" in mount.log_text()
    assert [d["complete"] for d in status(mount)["datasets"]] in ([], [False])

    proxy.rates["flip_byte"] = 0.0  # the wire is honest again: nothing wrong was kept
    assert sha256_of(mount.path / BIG) == hashlib.sha256(data).hexdigest()
    result = prefetch(mount, "ds")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ds: complete, verified and pinned" in result.stdout
    assert manifest_checks(mount.cache_dir) == {BIG: check}
    drop_page_cache()
    assert sha256_of(mount.path / BIG) == hashlib.sha256(data).hexdigest()
    verify = run_cli("verify", "ds", "--mount", str(mount.path))  # the same check, from disk
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "1 files checked, 0 repaired, 0 failed" in verify.stdout


def test_a_flipped_byte_in_a_single_part_object_is_caught_too(
    bucket: Bucket, mounter: Mounter, proxy: LyingProxy
) -> None:
    small = os.urandom(300_000)  # one GET of the whole object: the store checks its MD5
    large = os.urandom(9 * MIB + 5)  # ranged GETs (8 MiB at most): prefetch's check must
    for key, data in (("ds/small.bin", small), ("ds/large.bin", large)):
        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=data, ChecksumAlgorithm="CRC32")
    mount = mounter(bucket.name, server=proxy)
    proxy.methods, proxy.rates["flip_byte"] = {"GET"}, 1.0
    result = prefetch(mount, "ds")
    assert result.returncode == 4, result.stdout + result.stderr
    what = f"s3://{bucket.name}/ds/small.bin"
    assert f"FAILED ds/small.bin: {what}: body does not match its MD5 ETag" in result.stderr
    # The MD5 did not match; S3's CRC32 was asked for (SSE-KMS?), and did not match either.
    assert "FAILED ds/large.bin: content does not match its CRC32 checksum in S3" in (result.stderr)
    proxy.rates["flip_byte"] = 0.0
    assert prefetch(mount, "ds").returncode == 0
    assert manifest_checks(mount.cache_dir) == {"ds/small.bin": "md5", "ds/large.bin": "md5"}
    drop_page_cache()
    assert (mount.path / "ds" / "small.bin").read_bytes() == small
    assert sha256_of(mount.path / "ds" / "large.bin") == hashlib.sha256(large).hexdigest()


def test_a_single_part_object_without_checksum_failing_its_md5_twice_is_not_pinned(
    bucket: Bucket, mounter: Mounter, proxy: LyingProxy
) -> None:
    """Ranged GETs (no store MD5 check), the same byte flipped every time, no checksum:
    the bytes fail the MD5 ETag twice over; S3 does not say the ETag is no MD5."""
    large = os.urandom(9 * MIB + 5)
    no_checksums = boto3.client(
        "s3",
        endpoint_url=bucket.server.endpoint_url,
        config=botocore.config.Config(request_checksum_calculation="when_required"),
    )
    no_checksums.put_object(Bucket=bucket.name, Key="ds/large.bin", Body=large)
    mount = mounter(bucket.name, server=proxy)
    proxy.methods, proxy.rates["flip_byte"], proxy.flip_middle = {"GET"}, 1.0, True
    result = prefetch(mount, "ds")
    assert result.returncode == 4, result.stdout + result.stderr
    assert (
        "FAILED ds/large.bin: content does not match its ETag (MD5) in S3, twice over with the "
        "same bytes (S3 gives no other checksum for it): if this server's ETags are not MD5s, "
        "mount with --etag-md5 off"
    ) in result.stderr
    assert "size-checked only" not in result.stdout + result.stderr
    assert [d["complete"] for d in status(mount)["datasets"]] in ([], [False])
    proxy.rates["flip_byte"] = 0.0  # nothing wrong was kept
    assert sha256_of(mount.path / "ds" / "large.bin") == hashlib.sha256(large).hexdigest()
    assert prefetch(mount, "ds").returncode == 0
    assert manifest_checks(mount.cache_dir) == {"ds/large.bin": "md5"}


def test_a_composite_checksum_of_undeclared_type_verifies_in_one_download(
    bucket: Bucket, mounter: Mounter
) -> None:
    """moto's HEAD says neither the type nor "-N": full-object and composite are both tried."""
    rng = random.Random(11)
    parts = [rng.randbytes(5 * MIB), rng.randbytes(5 * MIB), rng.randbytes(3 * MIB)]
    upload_untyped(bucket, BIG, parts, "CRC32")
    mount = mounter(bucket.name)
    result = prefetch(mount, "ds", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["bytes_fetched"] == 13 * MIB  # once
    assert manifest_checks(mount.cache_dir) == {BIG: "crc32-composite"}
    verify = run_cli("verify", "ds", "--mount", str(mount.path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "1 files checked, 0 repaired, 0 failed" in verify.stdout
    drop_page_cache()
    assert sha256_of(mount.path / BIG) == hashlib.sha256(b"".join(parts)).hexdigest()


def test_size_checked_only_objects_are_named_and_refused_with_require_checksums(
    bucket: Bucket, mounter: Mounter, proxy: LyingProxy
) -> None:
    """No checksum, a multipart ETag, a server that ignores partNumber: only the size."""
    parts = [os.urandom(5 * MIB), os.urandom(1 * MIB)]
    upload(bucket, BIG, parts, None, None)
    bucket.put("ds/small.bin", b"small and single-part")
    proxy.ignore_part_number = True
    mount = mounter(bucket.name, server=proxy)

    strict = prefetch(mount, "ds", "--require-checksums")
    assert strict.returncode == 4, strict.stdout + strict.stderr
    assert f"FAILED {BIG}: size-checked only" in strict.stderr
    assert "ds/small.bin" not in strict.stderr  # its MD5 ETag verified it

    result = prefetch(mount, "ds")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified and pinned" not in result.stdout
    assert (
        "ds: complete and pinned, 1 object size-checked only, not verified end to end "
        f"(S3 gives no checksum for them and their ETags are not MD5s): {BIG}"
    ) in result.stdout
    assert manifest_checks(mount.cache_dir) == {BIG: "size", "ds/small.bin": "md5"}
    (dataset,) = status(mount)["datasets"]
    assert (dataset["complete"], dataset["size_only"], dataset["size_only_keys"]) == (
        True,
        1,
        [BIG],
    )
    text = run_cli("status", str(mount.path))
    assert "1 object size-checked only, not verified end to end" in text.stdout
    verify = run_cli("verify", "ds", "--mount", str(mount.path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "size-checked only, not verified end to end (S3 gives no" in verify.stdout
    # Already pinned, still refused: --require-checksums is about the check, not the download.
    again = prefetch(mount, "ds", "--require-checksums")
    assert again.returncode == 4 and f"FAILED {BIG}: size-checked only" in again.stderr
    assert (mount.path / BIG).read_bytes() == b"".join(parts)


def test_written_objects_carry_a_checksum_s3_keeps_and_prefetch_verifies_by_it(
    bucket: Bucket, mounter: Mounter
) -> None:
    mount = mounter(bucket.name, "--writable", "--upload-part-size", "5M")
    big, small = os.urandom(13 * MIB + 4321), b"written through the mount\n"
    (mount.path / "out").mkdir()
    (mount.path / "out" / "big.bin").write_bytes(big)
    (mount.path / "out" / "small.txt").write_bytes(small)
    for key, data in (("out/big.bin", big), ("out/small.txt", small)):
        head = bucket.client.head_object(Bucket=bucket.name, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumCRC64NVME"] == b64int(crc64nvme(data), 8), key
    head = bucket.client.head_object(Bucket=bucket.name, Key="out/big.bin")
    assert head["ETag"].endswith('-3"')  # multipart, yet one full-object checksum

    result = prefetch(mount, "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "out: complete, verified and pinned" in result.stdout
    checks = manifest_checks(mount.cache_dir)
    assert checks == {"out/big.bin": "crc64nvme-full", "out/small.txt": "md5"}
    assert (mount.path / "out" / "big.bin").read_bytes() == big


def test_an_irregular_part_layout_is_asked_part_by_part(
    bucket: Bucket, mounter: Mounter, proxy: LyingProxy
) -> None:
    """Parts 5, 6 and 1 MiB: the guess 5+5+2 does not digest to the ETag; each part is asked."""
    parts = [os.urandom(5 * MIB), os.urandom(6 * MIB), os.urandom(1 * MIB)]
    upload(bucket, BIG, parts, None, None)
    mount = mounter(bucket.name, server=proxy)
    result = prefetch(mount, "ds", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["bytes_fetched"] == 12 * MIB
    assert manifest_checks(mount.cache_dir) == {BIG: "mpu-etag"}
    numbers = [
        urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["partNumber"][0]
        for method, path in proxy.seen
        if method == "HEAD" and "partNumber=" in path
    ]
    # Part 1 for the guess, then every part; the bytes were right: nothing fetched twice.
    assert sorted(numbers) == ["1", "1", "2", "3"]
    assert (mount.path / BIG).read_bytes() == b"".join(parts)

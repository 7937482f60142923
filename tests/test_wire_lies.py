"""A lying S3 server never gets a wrong byte to a reader or into the cache (issue 11).

Real mounts, real S3 (moto), and `tests/faultproxy.py` between them telling
the lies S3-compatible servers and proxies tell: a Range ignored, a byte
flipped, a short range, If-Match ignored, a listing that never ends. Every
test asserts the bytes readers got (sha256), errnos, log lines, and that the
cache holds nothing wrong afterwards (read again with the fault off and the
page cache dropped).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import boto3
import botocore.config

from tests.conftest import (
    Bucket,
    Mount,
    Mounter,
    drop_page_cache,
    manifest_checks,
    read_at,
    run_cli,
)
from tests.faultproxy import FaultProxy

MIB = 1024 * 1024
STORE_LOG = "s3cachefs.store.s3: "
LISTING_LOG = "s3cachefs.store.listing: "


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def right_or(err: int, got: bytes | int, want: bytes) -> bool:
    """Whether a read got exactly ``want``, or failed with ``err``."""
    return got == err if isinstance(got, int) else sha(got) == sha(want)


def read_whole(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or -1


def store_lines(mount: Mount, level: str, text: str, log: str = STORE_LOG) -> list[str]:
    """The daemon's log lines from the store (``log``) at ``level`` that contain ``text``."""
    prefix = f"{level} {log}"
    return [ln for ln in mount.log_text().splitlines() if ln.startswith(prefix) and text in ln]


def test_an_ignored_range_never_serves_bytes_of_another_offset(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    big = os.urandom(9 * MIB + 5)  # longer than one GET (8 MiB): every GET of it is ranged
    small = os.urandom(200_000)
    bucket.put("ds/big.bin", big)
    bucket.put("ds/small.bin", small)
    mount = mounter(bucket.name, server=proxy)
    path = mount.path / "ds" / "big.bin"
    proxy.rates["ignore_range"] = 1.0  # 200 with the whole object, bytes from offset 0
    assert read_at(path, 3 * MIB, 65536) == errno.EIO
    assert sha(path.with_name("small.bin").read_bytes()) == sha(small)  # 200 is its answer
    result = run_cli("prefetch", "ds", "--mount", str(mount.path))
    assert result.returncode != 0
    assert "ds/big.bin" in result.stderr and "ignored Range" in result.stderr
    proxy.rates["ignore_range"] = 0.5
    for offset in (3 * MIB, 5 * MIB + 77, 8 * MIB + 1, 4 * MIB + 3):
        got = read_at(path, offset, 65536)
        assert right_or(errno.EIO, got, big[offset : offset + 65536]), offset
    assert proxy.faults["ignore_range"] >= 10
    proxy.rates["ignore_range"] = 0.0
    drop_page_cache()
    assert sha(path.read_bytes()) == sha(big)  # nothing wrong was cached
    [warning] = store_lines(mount, "WARNING", "ignored Range")  # once, however often it lied
    assert warning.endswith(
        f"S3 server ignored Range (answered 200 with the whole object) for "
        f"s3://{bucket.name}/ds/big.bin; retrying"
    )
    assert run_cli("prefetch", "ds", "--mount", str(mount.path)).returncode == 0
    assert run_cli("verify", "ds", "--mount", str(mount.path)).returncode == 0
    drop_page_cache()
    assert sha(path.read_bytes()) == sha(big)


def test_a_flipped_byte_in_a_small_file_is_never_served(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    files = {f"ds/f{i}.bin": os.urandom(20_000 + 50_000 * i) for i in range(6)}
    for key, body in files.items():
        bucket.put(key, body)
    mount = mounter(bucket.name, server=proxy)
    os.listdir(mount.path / "ds")
    proxy.rates["flip_byte"] = 1.0  # every body has one byte flipped, same length
    for key in files:
        assert read_whole(mount.path / key) == errno.EIO, key
    proxy.rates["flip_byte"] = 0.5
    for key, body in files.items():
        assert right_or(errno.EIO, read_whole(mount.path / key), body), key
    assert proxy.faults["flip_byte"] >= 18  # 3 attempts per file at rate 1.0
    proxy.rates["flip_byte"] = 0.0
    drop_page_cache()
    for key, body in files.items():
        assert sha((mount.path / key).read_bytes()) == sha(body), key
    [warning] = store_lines(mount, "WARNING", "body does not match its MD5 ETag")
    assert warning.endswith("; retrying")
    proxy.down = True  # what the cache holds now is right, and is all it serves
    drop_page_cache()
    for key, body in files.items():
        assert sha((mount.path / key).read_bytes()) == sha(body), key


def test_a_short_range_is_never_taken_for_the_whole_one(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    big = os.urandom(9 * MIB + 5)
    small = os.urandom(300_000)
    bucket.put("ds/big.bin", big)
    bucket.put("ds/small.bin", small)
    mount = mounter(bucket.name, server=proxy)
    path = mount.path / "ds" / "big.bin"
    proxy.rates["short_range"] = 1.0  # 206 for half the bytes, with headers that agree
    assert read_at(path, 3 * MIB, 65536) == errno.EIO
    assert read_whole(path.with_name("small.bin")) == errno.EIO
    proxy.rates["short_range"] = 0.5
    for offset in (3 * MIB, 6 * MIB + 11, 9 * MIB - 7):
        got = read_at(path, offset, 65536)
        assert right_or(errno.EIO, got, big[offset : offset + 65536]), offset
    proxy.rates["short_range"] = 0.0
    drop_page_cache()
    assert sha(path.read_bytes()) == sha(big)
    assert sha(path.with_name("small.bin").read_bytes()) == sha(small)
    [warning] = store_lines(mount, "WARNING", "shorter range than asked")
    assert f"for s3://{bucket.name}/ds/" in warning


def test_a_server_ignoring_if_match_never_mixes_versions(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    """rclone serve s3 1.75 ignores If-Match: the response's ETag is what catches it."""
    size = 16 * MIB
    old, new = os.urandom(size), os.urandom(size)
    bucket.put("ds/obj.bin", old)
    mount = mounter(bucket.name, "--metadata-ttl", "300", server=proxy)
    path = mount.path / "ds" / "obj.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sha(os.pread(fd, 131072, 0)) == sha(old[:131072])
        bucket.put("ds/obj.bin", new)  # same size, replaced under the open file
        proxy.rates["strip_if_match"] = 1.0  # the server now answers with the new version
        stale = 0
        for offset in (14 * MIB, 12 * MIB + 5, MIB, 15 * MIB):
            try:
                got = os.pread(fd, 65536, offset)
            except OSError as exc:
                assert exc.errno == errno.ESTALE, offset
                stale += 1
                continue
            assert sha(got) == sha(old[offset : offset + 65536]), offset  # never the new one
        assert stale >= 1  # 14 MiB is beyond any readahead of the first read
        # A fresh open within the metadata TTL: one version whole, or ESTALE; never a mix.
        fresh = read_whole(path)
        assert right_or(errno.ESTALE, fresh, old) or right_or(errno.ESTALE, fresh, new)
        assert proxy.faults["strip_if_match"] >= 1
        # Nothing of the new version is cached under the old one: put the old one back
        # (same bytes, same ETag) and read every byte through the old handle.
        proxy.rates["strip_if_match"] = 0.0
        bucket.put("ds/obj.bin", old)
        drop_page_cache()
        got = b"".join(os.pread(fd, MIB, off) for off in range(0, size, MIB))
        assert sha(got) == sha(old)
    finally:
        os.close(fd)


def test_a_listing_that_never_ends_fails_ls_cat_and_prefetch_promptly(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    files = {f"ds/f{i}.bin": os.urandom(1000 + i) for i in range(6)}
    for key, body in files.items():
        bucket.put(key, body)
    mount = mounter(bucket.name, server=proxy)
    assert os.listdir(mount.path) == ["ds"]  # the root is listed while the server behaves
    proxy.rates["endless_listing"] = 1.0  # IsTruncated=true, the same token, forever
    bucket.server.reset()
    for cmd in (["ls", str(mount.path / "ds")], ["cat", str(mount.path / "ds" / "f0.bin")]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0, cmd
        assert "Input/output error" in result.stderr, result.stderr
    result = run_cli("prefetch", "ds", "--mount", str(mount.path))
    why = f"S3 listing of s3://{bucket.name}/ds/ repeated its continuation token"
    assert result.returncode != 0 and why in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # Two LISTs per attempt (the page and its repeat), not thousands.
    assert bucket.server.counts()["list"] <= 12, bucket.server.counts()
    [error] = store_lines(mount, "ERROR", "repeated its continuation token", LISTING_LOG)
    assert error.endswith(f"{why}: the server is misbehaving")
    proxy.rates["endless_listing"] = 0.0  # nothing of it was kept: the server behaves again
    assert sorted(os.listdir(mount.path / "ds")) == sorted(k.split("/")[1] for k in files)
    assert (mount.path / "ds" / "f3.bin").read_bytes() == files["ds/f3.bin"]


def test_a_server_whose_etags_are_not_md5s_says_what_to_do_and_serves_with_etag_md5_off(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    with_crc, plain = os.urandom(200_000), os.urandom(50_000)
    bucket.put("ds/crc.bin", with_crc)  # the test client sends a CRC32, which S3 keeps
    no_checksums = boto3.client(
        "s3",
        endpoint_url=bucket.server.endpoint_url,
        config=botocore.config.Config(request_checksum_calculation="when_required"),
    )
    no_checksums.put_object(Bucket=bucket.name, Key="ds/plain.bin", Body=plain)
    proxy.etag_not_md5 = True  # consistent, but its ETags are not the MD5s of the bytes
    mount = mounter(bucket.name, server=proxy)
    for name in ("crc.bin", "plain.bin"):
        assert read_whole(mount.path / "ds" / name) == errno.EIO, name
    [warning] = store_lines(mount, "WARNING", "is not the MD5 of its bytes")
    assert warning.endswith(
        f"S3 server's ETag for s3://{bucket.name}/ds/crc.bin is not the MD5 of its bytes "
        "(the same bytes twice): if this server's ETags are not MD5s, mount with "
        "--etag-md5 off; until then such objects fail with EIO"
    )
    for _ in range(4):  # every read fails again: the log does not say so every time
        assert read_whole(mount.path / "ds" / "crc.bin") == errno.EIO
    failed = [
        ln for ln in mount.log_text().splitlines() if "op=read failed" in ln and "/ds/crc.bin" in ln
    ]
    assert 1 <= len(failed) < 5, failed  # at most one per 10 s: one, unless the host stalls
    assert all("more like it in the last" in ln for ln in failed[1:]), failed
    result = run_cli("prefetch", "ds", "--mount", str(mount.path))
    assert result.returncode != 0 and "mount with --etag-md5 off" in result.stderr
    mount.stop()

    off = mounter(bucket.name, "--etag-md5", "off", server=proxy, name="off")
    assert sha(off.path.joinpath("ds", "crc.bin").read_bytes()) == sha(with_crc)
    assert sha(off.path.joinpath("ds", "plain.bin").read_bytes()) == sha(plain)
    # Prefetch does not take the ETag for an MD5 either: S3's checksum, else the size only.
    strict = run_cli("prefetch", "ds", "--require-checksums", "--mount", str(off.path))
    assert strict.returncode == 4, strict.stdout + strict.stderr
    assert "FAILED ds/plain.bin: size-checked only" in strict.stderr
    assert "crc.bin" not in strict.stderr
    result = run_cli("prefetch", "ds", "--mount", str(off.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 object size-checked only" in result.stdout
    assert manifest_checks(off.cache_dir) == {"ds/crc.bin": "crc32-full", "ds/plain.bin": "size"}
    proxy.down = True  # what the cache holds is right, and is all it serves
    drop_page_cache()
    assert sha(off.path.joinpath("ds", "crc.bin").read_bytes()) == sha(with_crc)
    assert sha(off.path.joinpath("ds", "plain.bin").read_bytes()) == sha(plain)
    assert not store_lines(off, "WARNING", "is not the MD5 of its bytes")

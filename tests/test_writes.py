"""Write-through mounts: real FUSE, real S3 server, the fault proxy in front of it.

What a writable mount allows and refuses, on the core and through a mount alike,
is in test_behaviour.py; here is what only a mount shows: crashes, faults,
concurrency, kernel-served datasets, the log lines.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from s3cachefs.cli.locals3 import LocalS3
from tests.conftest import Bucket, Mounter, drop_page_cache, manifest_checks, run_cli, status
from tests.faultproxy import FaultProxy

MIB = 1024 * 1024
PART = "5M"  # the smallest part S3 accepts: a 13 MiB file is three parts


def s3_bytes(bucket: Bucket, key: str) -> bytes:
    return bytes(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())


def s3_has(bucket: Bucket, key: str) -> bool:
    listed = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=key)
    return any(o["Key"] == key for o in listed.get("Contents", []))


def write_file(path: Path, data: bytes, chunk: int = 256 * 1024) -> None:
    with path.open("wb") as f:
        for pos in range(0, len(data), chunk):
            f.write(data[pos : pos + chunk])


def test_a_multipart_file_round_trips_and_reads_back_with_zero_gets(
    bucket: Bucket, mounter: Mounter, s3_server: LocalS3
) -> None:
    mount = mounter(bucket.name, "--writable", "--upload-part-size", PART)
    big, small = os.urandom(13 * MIB + 12345), b'{"text": "invoice 42"}\n'
    (mount.path / "results").mkdir()
    write_file(mount.path / "results" / "big.bin", big)
    write_file(mount.path / "results" / "page-1.json", small)
    assert s3_bytes(bucket, "results/big.bin") == big
    assert s3_bytes(bucket, "results/page-1.json") == small
    head = bucket.client.head_object(Bucket=bucket.name, Key="results/big.bin")
    assert head["ETag"].endswith('-3"'), head["ETag"]  # three parts, not one PUT
    assert s3_has(bucket, "results/")  # mkdir made the directory a marker object

    s3_server.reset()
    drop_page_cache()
    assert (mount.path / "results" / "big.bin").read_bytes() == big
    assert (mount.path / "results" / "page-1.json").read_bytes() == small
    assert s3_server.gets() == []  # written data entered the cache under its new ETag
    assert sorted(os.listdir(mount.path / "results")) == ["big.bin", "page-1.json"]

    # After a restart the written data is still the cache's: still no GET.
    mount.stop()
    mount = mounter(bucket.name, "--writable")
    s3_server.reset()
    assert (mount.path / "results" / "big.bin").read_bytes() == big
    assert s3_server.gets() == []


def test_a_failed_upload_fails_close_with_eio_and_keeps_the_data(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    mount = mounter(bucket.name, "--writable", "--upload-part-size", PART, server=proxy)
    proxy.methods = {"PUT", "POST"}
    proxy.rates["internal"] = 1.0  # every upload request answers 500
    small, big = b"ocr output\n", os.urandom(11 * MIB)
    for name, data in (("small.txt", small), ("big.bin", big)):
        with pytest.raises(OSError) as failed:
            write_file(mount.path / name, data)
        assert failed.value.errno == errno.EIO, name
        assert not s3_has(bucket, name)
    assert "upload of s3://" in mount.log_text()

    left = {x["key"]: x for x in status(mount)["staged"]}
    assert set(left) == {"small.txt", "big.bin"}
    assert left["big.bin"]["state"] == "failed" and left["big.bin"]["size"] == len(big)
    assert "small.txt" not in os.listdir(mount.path)  # not in S3, so not in the tree

    proxy.rates["internal"] = 0.0  # S3 is back: upload what was kept
    result = run_cli("staged", "--upload", "--all", "--mount", str(mount.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert s3_bytes(bucket, "small.txt") == small
    assert s3_bytes(bucket, "big.bin") == big
    assert status(mount)["staged"] == []
    assert (mount.path / "big.bin").read_bytes() == big  # the directory was re-listed


def test_overwrite_and_delete_are_refused_without_their_flags(
    bucket: Bucket, mounter: Mounter
) -> None:
    bucket.put("data/a.txt", b"original")
    bucket.put("data/keep/b.txt", b"b")
    mount = mounter(bucket.name, "--writable")
    target = mount.path / "data" / "a.txt"
    with pytest.raises(PermissionError):
        target.write_bytes(b"replaced")
    with pytest.raises(PermissionError):
        target.unlink()
    with pytest.raises(OSError) as renamed:
        target.rename(mount.path / "data" / "c.txt")
    assert renamed.value.errno == errno.EXDEV  # S3 cannot rename atomically
    with pytest.raises(OSError) as exists:
        (mount.path / "data" / "keep").mkdir()
    assert exists.value.errno == errno.EEXIST
    assert s3_bytes(bucket, "data/a.txt") == b"original"
    log = mount.log_text()
    assert "--allow-overwrite" in log and "--allow-delete" in log
    mount.stop()

    mount = mounter(bucket.name, "--writable", "--allow-overwrite", "--allow-delete")
    target.write_bytes(b"replaced")
    assert s3_bytes(bucket, "data/a.txt") == b"replaced"
    assert target.read_bytes() == b"replaced"
    with pytest.raises(OSError) as partial:  # objects are replaced whole
        os.open(target, os.O_WRONLY)
    assert partial.value.errno == errno.EOPNOTSUPP
    target.unlink()
    assert not s3_has(bucket, "data/a.txt")
    assert not target.exists()
    with pytest.raises(OSError) as not_empty:
        (mount.path / "data" / "keep").rmdir()
    assert not_empty.value.errno == errno.ENOTEMPTY
    (mount.path / "data" / "keep" / "b.txt").unlink()
    (mount.path / "new").mkdir()
    (mount.path / "new").rmdir()
    assert not s3_has(bucket, "new/")


# Kernel-served, the bind is read-only; through FUSE, the daemon refuses (fs/writes.py).
@pytest.mark.parametrize("serve", ["--kernel-serve-pinned", "--no-kernel-serve-pinned"])
def test_read_only_is_the_default_and_pinned_datasets_are_never_writable(
    bucket: Bucket, mounter: Mounter, serve: str
) -> None:
    bucket.put("ds/x.bin", b"x" * 1000)
    mount = mounter(bucket.name)
    with pytest.raises(OSError) as refused:
        (mount.path / "new.txt").write_bytes(b"no")
    assert refused.value.errno == errno.EROFS
    mount.stop()

    mount = mounter(bucket.name, "--writable", "--allow-overwrite", "--allow-delete", serve)
    result = run_cli("prefetch", "ds", "--mount", str(mount.path))
    assert result.returncode == 0, result.stdout + result.stderr
    for attempt in (
        lambda: (mount.path / "ds" / "new.txt").write_bytes(b"no"),
        lambda: (mount.path / "ds" / "x.bin").write_bytes(b"no"),
        (mount.path / "ds" / "x.bin").unlink,
        (mount.path / "ds" / "sub").mkdir,
    ):
        with pytest.raises(OSError) as pinned:
            attempt()
        assert pinned.value.errno == errno.EROFS
    assert s3_bytes(bucket, "ds/x.bin") == b"x" * 1000
    assert not s3_has(bucket, "ds/new.txt")
    (mount.path / "outside.txt").write_bytes(b"yes")  # the rest of the mount is writable
    assert s3_bytes(bucket, "outside.txt") == b"yes"


def test_a_key_created_elsewhere_meanwhile_is_not_replaced(
    bucket: Bucket, mounter: Mounter
) -> None:
    mount = mounter(bucket.name, "--writable")
    f = (mount.path / "race.txt").open("wb")
    f.write(b"ours")
    bucket.put("race.txt", b"theirs")  # another node won the race
    with pytest.raises(OSError) as failed:
        f.close()
    assert failed.value.errno == errno.EIO
    assert s3_bytes(bucket, "race.txt") == b"theirs"
    left = status(mount)["staged"]
    assert [x["key"] for x in left] == ["race.txt"]
    result = run_cli("staged", "--discard", "race.txt", "--mount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert status(mount)["staged"] == []
    assert s3_bytes(bucket, "race.txt") == b"theirs"


WRITER = """
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.write(os.urandom(size))
    print("written", flush=True)
"""


def test_a_crash_mid_upload_leaves_the_file_staged_for_upload_or_discard(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy, tmp_path: Path
) -> None:
    mount = mounter(bucket.name, "--writable", "--upload-part-size", PART, server=proxy)
    proxy.write_delay = 2.0  # uploads crawl: the daemon dies in the middle of one
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(mount.path / name), str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for name, size in (("keep.bin", 12 * MIB), ("drop.bin", 100_000))
    ]
    for w in writers:
        assert w.stdout is not None and w.stdout.readline() == b"written\n"
    time.sleep(1.0)  # both are now inside close(), uploading
    mount.kill9()
    for w in writers:
        assert w.wait(timeout=30) != 0  # close() did not report success
        assert w.stdout is not None
        w.stdout.close()
    staging = list((mount.cache_dir / "v1" / "staging").glob("*.data"))
    expected = {p.stat().st_size: p.read_bytes() for p in staging}
    assert sorted(expected) == [100_000, 12 * MIB]

    proxy.write_delay = 0.0
    mount = mounter(bucket.name, "--writable", "--upload-part-size", PART, server=proxy)
    left = {x["key"]: x for x in status(mount)["staged"]}
    assert set(left) == {"keep.bin", "drop.bin"}
    assert all(x["state"] == "left-over" for x in left.values())
    assert "was never uploaded" in mount.log_text()
    listing = run_cli("staged", "--mount", str(mount.path))
    assert "keep.bin" in listing.stdout and "drop.bin" in listing.stdout

    result = run_cli("staged", "--upload", "keep.bin", "--mount", str(mount.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert s3_bytes(bucket, "keep.bin") == expected[12 * MIB]
    # Discard drops the staged copy only. (The delayed PUT may still have reached S3 after
    # the crash, as it could with a real S3: what is in S3 is whatever S3 acknowledged.)
    result = run_cli("staged", "--discard", "drop.bin", "--mount", str(mount.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert status(mount)["staged"] == []
    assert not list((mount.cache_dir / "v1" / "staging").iterdir())
    uploads = bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
    assert uploads == []  # the crashed multipart upload was aborted, not left to bill
    # (A crash inside CreateMultipartUpload itself cannot know the id: README, lifecycle rule.)


def test_concurrent_writers_to_different_files(bucket: Bucket, mounter: Mounter) -> None:
    mount = mounter(bucket.name, "--writable", "--upload-part-size", PART)
    (mount.path / "out").mkdir()
    files = {f"out/w{i}.bin": os.urandom(i * 1_500_000 + 1000) for i in range(8)}
    errors: list[BaseException] = []

    def writer(key: str) -> None:
        try:
            write_file(mount.path / key, files[key], chunk=100_000)
        except BaseException as exc:  # reported below, with the key
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(key,)) for key in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    for key, data in files.items():
        assert s3_bytes(bucket, key) == data, key
        assert (mount.path / key).read_bytes() == data, key
    writes = status(mount)["writes"]
    assert writes["uploads"] == len(files)


def test_a_relisting_during_an_append_keeps_the_writers_size(
    bucket: Bucket, mounter: Mounter
) -> None:
    mount = mounter(bucket.name, "--writable", "--metadata-ttl", "1")
    p = mount.path / "log.txt"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, b"A" * 100)
    os.fsync(fd)  # durable: S3 holds 100 bytes
    os.write(fd, b"B" * 100)  # staged: 200 bytes
    time.sleep(1.5)  # the directory listing expires
    os.listdir(mount.path)  # relist (readdirplus attrs too)
    size_seen = os.stat(p).st_size
    os.write(fd, b"C" * 100)
    os.close(fd)
    got = s3_bytes(bucket, "log.txt")
    assert got == b"A" * 100 + b"B" * 100 + b"C" * 100
    assert size_seen == 200


def test_a_crash_after_a_successful_fsync_leaves_nothing_to_report(
    bucket: Bucket, mounter: Mounter
) -> None:
    mount = mounter(bucket.name, "--writable")
    fd = os.open(mount.path / "done.json", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b'{"ok": true}\n')
    os.fsync(fd)  # success: S3 acknowledged it
    assert s3_bytes(bucket, "done.json") == b'{"ok": true}\n'
    mount.kill9()
    with contextlib.suppress(OSError):  # the daemon is gone
        os.close(fd)
    mount = mounter(bucket.name, "--writable")
    assert status(mount)["staged"] == []  # acknowledged by S3: nothing was lost
    assert "was uploaded; removed" in mount.log_text()
    assert s3_bytes(bucket, "done.json") == b'{"ok": true}\n'


def test_a_staged_upload_appears_even_with_an_indefinite_ttl(
    bucket: Bucket, mounter: Mounter, s3_server: LocalS3
) -> None:
    proxy = FaultProxy(s3_server.endpoint_url).start()
    try:
        mount = mounter(bucket.name, "--writable", "--metadata-ttl", "indefinite", server=proxy)
        proxy.methods = {"PUT", "POST"}
        proxy.rates["internal"] = 1.0
        with pytest.raises(OSError) as failed:
            (mount.path / "r.json").write_bytes(b"result")
        assert failed.value.errno == errno.EIO
        print("exists right after EIO close:", (mount.path / "r.json").exists())
        time.sleep(1)
        assert not (mount.path / "r.json").exists()  # the job checks: not there (negative dentry)
        proxy.rates["internal"] = 0.0
        result = run_cli("staged", "--upload", "--all", "--mount", str(mount.path))
        assert result.returncode == 0, result.stderr
        assert s3_bytes(bucket, "r.json") == b"result"
        time.sleep(1)
        print("visible after staged --upload:", (mount.path / "r.json").exists())
        assert (mount.path / "r.json").exists()
    finally:
        proxy.stop()


@pytest.mark.parametrize("server", ["refuses", "drops"])
def test_writes_go_on_where_s3_keeps_no_additional_checksums(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy, server: str
) -> None:
    """Older MinIO and Backblaze B2 refuse checksum headers (400 InvalidArgument); older
    Ceph drops them. Either way close() succeeds, with one WARNING, and what was written is
    verified by its MD5 or multipart ETag."""
    if server == "refuses":
        proxy.reject_checksum_headers = True
        said = "refused an upload for its additional checksum"
    else:
        proxy.strip_checksum_headers = True
        said = "S3 server does not keep additional checksums; objects written here are verified"
    bucket.put("out/", b"")
    mount = mounter(bucket.name, "--writable", "--upload-part-size", PART, server=proxy)
    big, small = os.urandom(13 * MIB + 4321), b"written where S3 keeps no checksum\n"
    # The first upload is multipart: refused at its start, it is sent again whole, without.
    write_file(mount.path / "out" / "big.bin", big)
    write_file(mount.path / "out" / "small.txt", small)
    (mount.path / "out" / "sub").mkdir()
    for key, data in (("out/big.bin", big), ("out/small.txt", small)):
        assert hashlib.sha256(s3_bytes(bucket, key)).hexdigest() == hashlib.sha256(data).hexdigest()
        head = bucket.client.head_object(Bucket=bucket.name, Key=key, ChecksumMode="ENABLED")
        assert not any(k.startswith("ChecksumCRC") for k in head), key
    assert s3_has(bucket, "out/sub/")
    head = bucket.client.head_object(Bucket=bucket.name, Key="out/big.bin")
    assert head["ETag"].endswith('-3"')
    assert proxy.faults["reject_checksum"] == (1 if server == "refuses" else 0)
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []
    warned = [line for line in mount.log_text().splitlines() if "uploadchecksums" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and said in warned[0], warned
    assert status(mount)["staged"] == []

    # What S3 holds is verified, from the same cache (no GET), by a mount straight to it:
    # part-size HEADs through this proxy answer Content-Length 0 (tests/faultproxy.py).
    mount.stop()
    mount = mounter(bucket.name)
    result = run_cli("prefetch", "out", "--mount", str(mount.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "out: complete, verified and pinned" in result.stdout
    assert manifest_checks(mount.cache_dir) == {"out/big.bin": "mpu-etag", "out/small.txt": "md5"}
    drop_page_cache()
    assert (mount.path / "out" / "big.bin").read_bytes() == big

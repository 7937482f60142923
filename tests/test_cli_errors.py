"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Bucket, Mounter, mount_cli, run_cli


def _assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    stderr = result.stderr
    assert result.returncode == code, (result.returncode, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("s3cachefs: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def test_missing_mountpoint(bucket: Bucket, tmp_path: Path) -> None:
    result = mount_cli(bucket, tmp_path / "nope", tmp_path / "cache")
    _assert_one_line_error(result, 2, "does not exist")


def test_non_empty_mountpoint(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    (mnt / "someone-elses-file").write_text("x")
    result = mount_cli(bucket, mnt, tmp_path / "cache")
    _assert_one_line_error(result, 2, "not empty")


def test_unknown_bucket(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    result = mount_cli(bucket, mnt, tmp_path / "cache", target="no-such-bucket-here")
    _assert_one_line_error(result, 3, "no such bucket")
    assert not os.path.ismount(mnt)


def test_wrong_endpoint(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mount_cli(bucket, mnt, tmp_path / "cache", endpoint=f"http://127.0.0.1:{port}")
    _assert_one_line_error(result, 2, "cannot reach", str(port))


def test_missing_credentials(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    result = mount_cli(bucket, mnt, tmp_path / "cache", env=env)
    _assert_one_line_error(result, 3, "no AWS credentials")


def test_wrong_credentials_are_not_printed(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    env = dict(os.environ, AWS_PROFILE="no-such-profile")
    result = mount_cli(bucket, mnt, tmp_path / "cache", env=env)
    _assert_one_line_error(result, 3, "no-such-profile")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in result.stderr


def test_unusable_cache_dir(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = mount_cli(bucket, mnt, blocker / "cache")
    _assert_one_line_error(result, 2, "cache dir")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--cache-size", "ten gigs", "bad size"),
        ("--min-free", "5Q", "bad size"),
        ("--metadata-ttl", "soon", "bad TTL"),
        ("--metadata-ttl", "-1", "bad TTL"),
        ("--block-size", "1000", "block size"),
        ("--etag-md5", "no", "--etag-md5: bad value 'no': use auto or off"),
    ],
)
def test_bad_values(
    bucket: Bucket, mnt: Path, tmp_path: Path, option: str, value: str, needle: str
) -> None:
    result = mount_cli(bucket, mnt, tmp_path / "cache", option, value)
    _assert_one_line_error(result, 2, needle)


def test_bad_bucket_name(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    result = mount_cli(bucket, mnt, tmp_path / "cache", target="Bad Bucket!")
    _assert_one_line_error(result, 2, "bad bucket name")


def test_unknown_option_is_one_line() -> None:
    result = run_cli("mount", "--no-such-flag")
    _assert_one_line_error(result, 2)


def test_unmount_of_something_not_mounted(tmp_path: Path) -> None:
    result = run_cli("unmount", str(tmp_path))
    _assert_one_line_error(result, 2, "not mounted")


def test_write_flags_need_writable(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    result = mount_cli(bucket, mnt, tmp_path / "cache", "--allow-delete")
    _assert_one_line_error(result, 2, "--allow-delete", "--writable")


def test_bad_upload_part_size(bucket: Bucket, mnt: Path, tmp_path: Path) -> None:
    result = mount_cli(bucket, mnt, tmp_path / "cache", "--writable", "--upload-part-size", "1M")
    _assert_one_line_error(result, 2, "part size")


def test_staged_actions_need_a_target_and_a_known_one(bucket: Bucket, mounter: Mounter) -> None:
    mount = mounter(bucket.name, "--writable")
    where = ("--mount", str(mount.path))
    _assert_one_line_error(run_cli("staged", "--upload", *where), 2, "needs an ID or KEY")
    _assert_one_line_error(run_cli("staged", "--discard", "nope.txt", *where), 2, "nope.txt")
    listing = run_cli("staged", *where)
    assert listing.returncode == 0 and "nothing staged" in listing.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--endpoint-url", "127.0.0.1:18101"), "bad endpoint URL '127.0.0.1:18101': use http://"),
        (("--endpoint-url", "ftp://127.0.0.1:18101"), "bad endpoint URL"),
        (("--endpoint-url", "http://127.0.0.1:99999"), "bad endpoint URL"),
        (("--endpoint-url", "http://"), "bad endpoint URL"),
        (("--endpoint-url", "http://ak:sk@127.0.0.1:1"), "no credentials in the URL"),
        (("--min-free", "1PB"), "is not below the size of the cache disk"),
        (("--cache-size", "0"), "smaller than one block"),
        (("--s3-concurrency", "0"), "--s3-concurrency: bad number '0': must be at least 1"),
        (("--s3-concurrency", "-3"), "must be at least 1"),
        (("--s3-timeout", "0"), "--s3-timeout: bad timeout '0'"),
        (("--s3-max-attempts", "0"), "--s3-max-attempts: bad number '0': must be at least 1"),
        (("--memory-cache-size", "lots"), "--memory-cache-size: bad size 'lots'"),
        (("--s3-timeout", "indefinite"), "bad timeout 'indefinite'"),
        (("--metadata-ttl", "inf"), "bad TTL 'inf'"),
        (("--kernel-readahead", "1000"), "whole KiB"),
        (("--fetch-size", "64K"), "fetch size 65536 is smaller than the block size"),
        (("--writable", "--upload-part-size", "6G"), "at most 5G"),
    ],
)
def test_nonsense_settings_are_one_line_at_start(
    bucket: Bucket, mnt: Path, tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    cache = tmp_path / "cache"
    if args[0] == "--endpoint-url":
        result = mount_cli(bucket, mnt, cache, endpoint=args[1])
    else:
        result = mount_cli(bucket, mnt, cache, *args)
    _assert_one_line_error(result, 2, needle)
    assert "ak:sk" not in result.stderr and " sk" not in result.stderr
    assert not os.path.ismount(mnt)
    assert not cache.exists()  # refused before the daemon made anything


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--shard", "3/2"), "argument --shard: bad shard '3/2': use I/N with 0 <= I < N"),
        (("--shard", "1/0"), "bad shard"),
        (("--shard", "one/two"), "bad shard"),
        (("--jobs", "0"), "argument --jobs: bad number '0': must be at least 1"),
        (("--jobs", "-2"), "must be at least 1"),
        (("--jobs", "many"), "argument --jobs: bad number 'many'"),
    ],
)
def test_bad_prefetch_arguments_are_usage_errors(args: tuple[str, ...], needle: str) -> None:
    # Checked while parsing: no daemon is asked, and none needs to run.
    result = run_cli("prefetch", "ds", "--mount", "/nonexistent", *args)
    _assert_one_line_error(result, 2, needle)


def test_unknown_prefixed_variables_warn_and_near_misses_fail(
    bucket: Bucket, mnt: Path, tmp_path: Path
) -> None:
    typo = dict(os.environ, S3CACHEFS_MIN_FRE="1G")
    result = mount_cli(bucket, mnt, tmp_path / "cache", env=typo)
    _assert_one_line_error(
        result,
        2,
        "unknown environment variable S3CACHEFS_MIN_FRE (did you mean S3CACHEFS_MIN_FREE?)",
    )
    wrapper = dict(os.environ, S3CACHEFS_BIN="/opt/s3cachefs/bin", S3CACHEFS_SOAK_SECONDS="600")
    result = mount_cli(bucket, mnt, tmp_path / "cache", env=wrapper)
    try:
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        assert {
            "s3cachefs: warning: ignoring environment variable S3CACHEFS_BIN: no such setting",
            "s3cachefs: warning: ignoring environment variable S3CACHEFS_SOAK_SECONDS: "
            "no such setting",
        } <= set(lines)
        assert all(line.startswith("s3cachefs: warning: ignoring environment") for line in lines)
        assert os.path.ismount(mnt)
    finally:
        run_cli("unmount", str(mnt))
    log = (tmp_path / "cache" / "daemon.log").read_text()
    assert "WARNING s3cachefs: ignoring environment variable S3CACHEFS_BIN: no such setting" in log


def test_a_bad_progress_interval_is_one_line(bucket: Bucket, mounter: Mounter) -> None:
    mount = mounter(bucket.name)
    for value in ("soon", "-1", "nan"):
        env = dict(os.environ, S3CACHEFS_PROGRESS_INTERVAL=value)
        result = run_cli("prefetch", "ds", "--mount", str(mount.path), env=env)
        _assert_one_line_error(
            result, 2, f"S3CACHEFS_PROGRESS_INTERVAL: bad value '{value}': use a number"
        )
    assert bucket.server.counts()["list"] == 0  # no prefetch was asked of the daemon

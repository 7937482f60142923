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

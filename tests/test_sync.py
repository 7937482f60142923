"""``s3cachefs sync`` and ``verify --dir``: Sync-before-Run into a plain directory, no FUSE.

Real S3 (moto on 127.0.0.1, requests counted at the server), the real CLI in a
subprocess, faults from tests/faultproxy.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.config

from s3cachefs.datasets import dirmanifest
from tests.conftest import Bucket, run_cli, s3cachefs_cmd
from tests.faultproxy import FaultProxy

MIB = 1 << 20


def fill(bucket: Bucket, count: int = 12, prefix: str = "ds/") -> dict[str, bytes]:
    """``count`` objects in three directories; key (relative to the dataset) -> bytes."""
    data = {}
    for i in range(count):
        rel = f"d{i % 3}/f{i:03d}.bin"
        body = random.Random(i).randbytes(1000 + 1500 * i)
        bucket.put(prefix + rel, body)
        data[rel] = body
    return data


def put_multipart(bucket: Bucket, key: str, body: bytes, part: int = 5 * MIB) -> None:
    client = bucket.client
    upload = client.create_multipart_upload(Bucket=bucket.name, Key=key)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(body), part), 1):
        etag = client.upload_part(
            Bucket=bucket.name,
            Key=key,
            UploadId=upload,
            PartNumber=number,
            Body=body[start : start + part],
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(
        Bucket=bucket.name, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )


def sync(
    bucket: Bucket,
    dest: Path,
    *extra: str,
    endpoint: str | None = None,
    env: dict[str, str] | None = None,
    dataset: str = "ds",
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "sync",
        f"s3://{bucket.name}/{dataset}",
        str(dest),
        "--endpoint-url",
        endpoint or bucket.server.endpoint_url,
        *extra,
        env=env,
    )


def tree(dest: Path) -> dict[str, bytes]:
    """Every file under DEST but the sync's state: relative path -> bytes."""
    found = {}
    for root, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if d != dirmanifest.STATE_DIR or Path(root) != dest]
        for name in files:
            path = Path(root) / name
            found[str(path.relative_to(dest))] = path.read_bytes()
    return found


def gets(bucket: Bucket) -> int:
    return bucket.server.counts()["get"]


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3cachefs: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_sync_verifies_every_object_and_a_second_run_fetches_nothing(
    bucket: Bucket, tmp_path: Path
) -> None:
    data = fill(bucket)
    big = random.Random(99).randbytes(5 * MIB + 1234)
    put_multipart(bucket, "ds/big/multi.bin", big)
    data["big/multi.bin"] = big
    bucket.put("ds/d0/", b"")  # a directory marker: not a file
    dest = tmp_path / "dest"

    result = sync(bucket, dest)
    assert result.returncode == 0, result.stderr
    assert f"{dest}: complete and verified" in result.stdout
    assert tree(dest) == data
    assert gets(bucket) == len(data)  # each object once, whole
    manifest = json.loads((dest / ".s3cachefs" / "manifest.json").read_text())
    assert manifest["complete"] is True
    checks = {k: v[3][0] for k, v in manifest["objects"].items()}
    assert checks.pop("big/multi.bin") == "mpu-etag"  # the multipart ETag over its 2 parts
    assert set(checks.values()) == {"md5"}
    assert not list((dest / ".s3cachefs" / "tmp").iterdir())

    bucket.server.reset()
    again = sync(bucket, dest)
    assert again.returncode == 0, again.stderr
    assert gets(bucket) == 0
    verified = run_cli("verify", "--dir", str(dest))
    assert verified.returncode == 0, verified.stderr
    assert f"{len(data)} files checked" in verified.stdout


def test_incremental_runs_fetch_only_changes_and_delete_only_with_the_flag(
    bucket: Bucket, tmp_path: Path
) -> None:
    data = fill(bucket)
    dest = tmp_path / "dest"
    assert sync(bucket, dest).returncode == 0
    bucket.put("ds/d1/f001.bin", b"changed content")
    bucket.put("ds/new/one.bin", b"a new object")
    bucket.delete("ds/d2/f002.bin")
    bucket.server.reset()

    kept = sync(bucket, dest)
    assert kept.returncode == 0, kept.stderr
    assert gets(bucket) == 2  # the changed object and the new one, nothing else
    assert "1 files S3 no longer lists were kept" in kept.stdout
    files = tree(dest)
    assert files["d1/f001.bin"] == b"changed content"
    assert files["new/one.bin"] == b"a new object"
    assert files["d2/f002.bin"] == data["d2/f002.bin"]  # kept without --delete
    assert run_cli("verify", "--dir", str(dest)).returncode == 0

    bucket.server.reset()
    deleted = sync(bucket, dest, "--delete")
    assert deleted.returncode == 0, deleted.stderr
    assert gets(bucket) == 0
    assert "d2/f002.bin" not in tree(dest)
    assert len(tree(dest)) == len(data) + 1 - 1


def test_four_shards_together_are_the_dataset(bucket: Bucket, tmp_path: Path) -> None:
    data = fill(bucket, 24)
    union: dict[str, bytes] = {}
    listed: list[str] = []
    for index in range(4):
        dest, keys = tmp_path / f"shard{index}", tmp_path / f"keys{index}.txt"
        result = sync(bucket, dest, "--shard", f"{index}/4", "--list-out", str(keys))
        assert result.returncode == 0, result.stderr
        files = tree(dest)
        assert not set(files) & set(union)  # disjoint
        union.update(files)
        shard_keys = keys.read_text().split()
        assert sorted(f"ds/{rel}" for rel in files) == shard_keys
        listed += shard_keys
    assert union == data
    assert sorted(listed) == sorted(f"ds/{rel}" for rel in data)
    assert gets(bucket) == len(data)


def test_verify_dir_catches_a_flipped_byte(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket)
    dest = tmp_path / "dest"
    assert sync(bucket, dest).returncode == 0
    target = dest / "d1" / "f004.bin"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))  # same size
    result = run_cli("verify", "--dir", str(dest))
    assert result.returncode == 4
    assert "FAILED d1/f004.bin: content does not match its ETag (MD5)" in result.stderr
    assert "1 failed" in result.stdout
    # The next sync sees a file that is not what it recorded (mtime) and fetches it again.
    bucket.server.reset()
    assert sync(bucket, dest).returncode == 0
    assert gets(bucket) == 1
    assert run_cli("verify", "--dir", str(dest)).returncode == 0


def test_a_lying_server_never_leaves_a_wrong_file(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy
) -> None:
    data = fill(bucket, 6)
    big = random.Random(7).randbytes(5 * MIB + 99)
    put_multipart(bucket, "ds/big/multi.bin", big)  # no MD5 ETag: our digest must catch it
    data["big/multi.bin"] = big
    dest = tmp_path / "dest"
    proxy.rates["flip_byte"] = 1.0  # every GET body has one byte flipped
    result = sync(bucket, dest, endpoint=proxy.endpoint_url)
    assert result.returncode == 4, result.stderr
    assert tree(dest) == {}
    assert "FAILED ds/big/multi.bin: content does not match its multipart ETag" in result.stderr
    assert result.stderr.count("FAILED ") == len(data)
    assert f"{dest}: NOT complete: {len(data)} objects missing" in result.stderr
    assert run_cli("verify", "--dir", str(dest)).returncode == 4  # not complete

    proxy.rates["flip_byte"] = 0.0
    assert sync(bucket, dest, endpoint=proxy.endpoint_url).returncode == 0
    assert tree(dest) == data
    assert run_cli("verify", "--dir", str(dest)).returncode == 0


class Watcher:
    """Reads every file that appears under DEST, as a reader would, while a sync runs:
    a file under its final name must always be whole and right."""

    def __init__(self, dest: Path, data: dict[str, bytes]) -> None:
        self.dest, self.data = dest, data
        self.wrong: list[str] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                for rel, body in tree(self.dest).items():
                    self.seen.add(rel)
                    if body != self.data.get(rel):
                        self.wrong.append(rel)


def test_kill9_mid_sync_then_resume_fetches_nothing_verified_again(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy
) -> None:
    data = fill(bucket, 150)
    dest = tmp_path / "dest"
    journal = dest / ".s3cachefs" / "journal.jsonl"
    cmd = s3cachefs_cmd(
        "sync", f"s3://{bucket.name}/ds", str(dest), "--endpoint-url", proxy.endpoint_url
    )
    with Watcher(dest, data) as watcher:
        proc = subprocess.Popen([*cmd, "--jobs", "2"], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not journal.exists() or journal.read_text().count('"k"') < 20:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
            proxy.down = True  # the rest cannot finish: the run is surely killed mid-way
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert watcher.wrong == [] and watcher.seen
    recorded = dirmanifest.load(dest)
    assert recorded is not None and not recorded.complete
    done = len(recorded.objects)
    assert 20 <= done < len(data)
    assert set(tree(dest)) >= set(recorded.objects)

    proxy.down = False
    bucket.server.reset()
    with Watcher(dest, data) as watcher:
        result = sync(bucket, dest)
    assert result.returncode == 0, result.stderr
    assert watcher.wrong == []
    # Nothing recorded as verified is fetched again; everything else is. (Counted per key:
    # a GET the killed run had in flight may reach the server after the reset.)
    fetched = [r.path.removeprefix(f"/{bucket.name}/ds/") for r in bucket.server.gets()]
    assert not set(fetched) & set(recorded.objects)
    assert set(fetched) == set(data) - set(recorded.objects)
    assert len(fetched) <= len(data) - done + 2  # at most --jobs strays
    assert tree(dest) == data
    assert not list((dest / ".s3cachefs" / "tmp").iterdir())
    assert run_cli("verify", "--dir", str(dest)).returncode == 0


@contextlib.contextmanager
def nobody_dir() -> Iterator[Path]:
    """A directory nobody owns, in a place nobody can reach (tmp_path's parents are 0700)."""
    top = Path(tempfile.mkdtemp(prefix="s3cachefs-nobody-"))
    try:
        top.chmod(0o755)
        os.chown(top, 65534, 65534)
        yield top
    finally:
        shutil.rmtree(top)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as user nobody. The interpreter and its packages may live where nobody
    cannot go (pyenv under /root): then the system's python3 with our site-packages;
    failing that too, nobody keeps one capability, to read and search files (writes
    stay nobody's: DEST must be nobody's, root's directories refuse it)."""
    site = sysconfig.get_paths()["purelib"]
    code = (
        f"import site, sys; site.addsitedir({site!r}); "
        "from s3cachefs.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    command = None
    for python in (sys.executable, "/usr/bin/python3"):
        probe = ["runuser", "-u", "nobody", "--", python, "-c", code, "--version"]
        if subprocess.run(probe, capture_output=True, cwd="/", check=False).returncode == 0:
            command = ["runuser", "-u", "nobody", "--", python]
            break
    if command is None:
        caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        ids = ["--reuid=65534", "--regid=65534", "--clear-groups"]
        command = ["setpriv", *ids, *caps, sys.executable]
    return subprocess.run(
        [*command, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        check=False,
    )


def test_sync_as_root_and_as_nobody(bucket: Bucket, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "this test runs the CLI as root and as nobody"
    data = fill(bucket)
    assert sync(bucket, tmp_path / "as-root").returncode == 0
    assert tree(tmp_path / "as-root") == data
    with nobody_dir() as top:
        dest = top / "dest"
        url = bucket.server.endpoint_url
        result = as_nobody("sync", f"s3://{bucket.name}/ds", str(dest), "--endpoint-url", url)
        assert result.returncode == 0, result.stderr
        assert tree(dest) == data
        assert {p.stat().st_uid for p in dest.rglob("*")} == {65534}
        assert as_nobody("verify", "--dir", str(dest)).returncode == 0
        # nobody cannot write into root's directory: one line, exit 2
        refused = as_nobody(
            "sync", f"s3://{bucket.name}/ds", str(tmp_path / "x"), "--endpoint-url", url
        )
        assert refused.returncode == 2
        assert refused.stderr.startswith("s3cachefs: ") and len(refused.stderr.splitlines()) == 1


def test_dry_run_json_and_list_out(bucket: Bucket, tmp_path: Path) -> None:
    data = fill(bucket)
    dest = tmp_path / "dest"
    dry = sync(bucket, dest, "--dry-run", "--list-out", str(tmp_path / "keys.txt"))
    assert dry.returncode == 0, dry.stderr
    assert f"{len(data)} objects" in dry.stdout and ": fits" in dry.stdout
    assert not dest.exists() and gets(bucket) == 0
    assert (tmp_path / "keys.txt").read_text().split() == sorted(f"ds/{k}" for k in data)

    result = sync(bucket, dest, "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert {e["event"] for e in events} <= {"progress", "done"}
    done = events[-1]
    assert done["event"] == "done" and done["ok"] and done["complete"]
    assert done["files_total"] == done["files_fetched"] == len(data)
    assert done["failed_objects"] == {}


def test_bad_input_is_one_line_and_a_non_zero_exit(bucket: Bucket, tmp_path: Path) -> None:
    fill(bucket, 3)
    dest = tmp_path / "dest"
    bad = run_cli("sync", "s3://Bad Bucket!/ds", str(dest))
    one_line_error(bad, 2, "bad bucket name")
    missing = run_cli(
        "sync",
        "s3://no-such-bucket-here/ds",
        str(dest),
        "--endpoint-url",
        bucket.server.endpoint_url,
    )
    one_line_error(missing, 3, "no such bucket")

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    one_line_error(sync(bucket, dest, env=env), 3, "no AWS credentials")

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = sync(bucket, dest, endpoint=f"http://127.0.0.1:{port}")
    one_line_error(unreachable, 2, "cannot reach", str(port))

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(sync(bucket, blocker), 2, "not a directory")
    one_line_error(sync(bucket, blocker / "below"), 2, "not writable")
    assert not dest.exists()  # nothing was written by the failed runs
    # As `prefetch`: a dataset with no objects (a typo) is no dataset, exit 2.
    one_line_error(sync(bucket, dest, dataset="ds-typo"), 2, "ds-typo/ holds no objects")
    assert not dest.exists()


def test_a_full_disk_is_refused_with_the_numbers(bucket: Bucket, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "this test mounts a small tmpfs"
    bucket.put("ds/huge.bin", os.urandom(2 * MIB))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        result = sync(bucket, small / "dest")
        one_line_error(result, 2, "does not fit", "2.0 MiB to download", "1.0 MiB free")
        assert gets(bucket) == 0
        assert tree(small / "dest") == {}
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_etags_that_are_not_md5s_size_only_and_require_checksums(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy
) -> None:
    """A server whose single-part ETags are not MD5s (proxy ``etag_not_md5``), as for
    prefetch: objects with an additional checksum verify by it (auto and off); without
    one, auto fails them (S3 does not say the ETag is no MD5), ``--etag-md5 off``
    size-checks them, named, and ``--require-checksums`` fails them."""
    bucket.put("ds/crc/a.bin", b"a" * 3000)  # the test client sends a CRC32, which S3 keeps
    bucket.put("ds/crc/b.bin", b"b" * 4000)
    no_checksums = boto3.client(
        "s3",
        endpoint_url=bucket.server.endpoint_url,
        config=botocore.config.Config(request_checksum_calculation="when_required"),
    )
    for name in ("c.bin", "d.bin"):
        no_checksums.put_object(Bucket=bucket.name, Key=f"ds/plain/{name}", Body=b"p" * 5000)
    proxy.etag_not_md5 = True
    url = proxy.endpoint_url

    def checks(dest: Path) -> dict[str, str]:
        manifest = json.loads((dest / ".s3cachefs" / "manifest.json").read_text())
        return {k: v[3][0] for k, v in manifest["objects"].items()}

    auto = sync(bucket, tmp_path / "auto", endpoint=url)
    assert auto.returncode == 4
    for name in ("c.bin", "d.bin"):
        assert f"FAILED ds/plain/{name}: content does not match its ETag (MD5)" in auto.stderr
    assert checks(tmp_path / "auto") == {"crc/a.bin": "crc32-full", "crc/b.bin": "crc32-full"}
    assert set(tree(tmp_path / "auto")) == {"crc/a.bin", "crc/b.bin"}

    off = sync(bucket, tmp_path / "off", "--etag-md5", "off", endpoint=url)
    assert off.returncode == 0, off.stderr
    assert "2 objects size-checked only" in off.stdout
    assert checks(tmp_path / "off") == {
        "crc/a.bin": "crc32-full",
        "crc/b.bin": "crc32-full",
        "plain/c.bin": "size",
        "plain/d.bin": "size",
    }
    assert run_cli("verify", "--dir", str(tmp_path / "off")).returncode == 0

    strict = sync(
        bucket, tmp_path / "strict", "--etag-md5", "off", "--require-checksums", endpoint=url
    )
    assert strict.returncode == 4
    assert strict.stderr.count("S3 gives nothing to verify it end to end against") == 2
    assert set(tree(tmp_path / "strict")) == {"crc/a.bin", "crc/b.bin"}

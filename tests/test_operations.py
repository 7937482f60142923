"""Running it as a system daemon: config precedence, sd_notify, systemd units."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import http.server
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import ClassVar

import pyfuse3
import pytest

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import ConfigError
from s3cachefs.base.settings import SETTINGS
from s3cachefs.cli.parser import build_parser, lazy
from s3cachefs.cli.settings import mount_config, resolve
from s3cachefs.datasets.dirsync import DEFAULT_JOBS
from s3cachefs.fs.operations import ThrottledWarnings, _errno_mapped
from tests.conftest import Bucket, Mounter, mount_cli, run_cli, s3cachefs_cmd

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def _foreground(bucket: Bucket, mnt: Path, cache: Path) -> list[str]:
    return s3cachefs_cmd(
        "mount",
        bucket.name,
        str(mnt),
        "--foreground",
        "--endpoint-url",
        bucket.server.endpoint_url,
        "--cache-dir",
        str(cache),
    )


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["mount", *argv])


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text(
        'source = "datasets/v3"\nmountpoint = "/mnt/x"\ncache-size = "100G"\n'
        'min_free = "1G"\nmetadata-ttl = "indefinite"\nallow-other = true\n'
        "s3-concurrency = 4\n"
    )
    env = {"S3CACHEFS_CACHE_SIZE": "200G", "S3CACHEFS_S3_CONCURRENCY": "8", "HOME": "/root"}
    values = resolve(_args("--config", str(config), "--s3-concurrency", "32"), env)
    cfg = mount_config(values)
    assert (cfg.bucket, cfg.prefix, str(cfg.mountpoint)) == ("datasets", "v3/", "/mnt/x")
    assert cfg.cache_size == 200 * GIB  # env beats file
    assert cfg.min_free == GIB  # file beats default; underscores work too
    assert cfg.s3_concurrency == 32  # flag beats env and file
    assert cfg.allow_other and cfg.metadata_ttl > 10**8
    plain = mount_config(resolve(_args("bkt", "/mnt/y"), {}))
    assert (plain.cache_size, plain.min_free, plain.allow_other) == (10 * GIB, 5 * GIB, False)


def test_the_command_line_loads_s3_and_fuse_libraries_only_for_the_commands_using_them() -> None:
    """`status`, `prefetch`, `unmount` talk to a daemon: boto3 and awscrt (`sync`'s)
    and pyfuse3/trio (the daemon's) would only slow every start (issue 12)."""
    probe = (
        "import sys\n"
        "from s3cachefs.cli.parser import build_parser\n"
        "build_parser().parse_args(['status'])\n"
        "heavy = ('boto3', 'botocore', 's3transfer', 'awscrt', 'pyfuse3', 'trio', 'psutil')\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
    # Each subcommand's lazy target is there (a typo would only show when it runs).
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        func = sub.get_default("func")
        assert isinstance(func, lazy) and callable(func.target()), name
    # sync's default --jobs is written down in the parser (to leave dirsync unloaded).
    sync = build_parser().parse_args(["sync", "s3://b/d", "dest"])
    assert sync.jobs == DEFAULT_JOBS


def test_each_setting_is_defined_once_in_the_table() -> None:
    """MountConfig's defaults are the table's: one setting fills each field, and a mount
    with nothing set is MountConfig with nothing set."""
    built = {"bucket", "prefix", "mountpoint", "cache_dir"}  # made by mount_config
    filled = [s.field_name for s in SETTINGS if s.field_name is not None]
    assert len(filled) == len(set(filled))
    assert set(filled) == {f.name for f in dataclasses.fields(MountConfig)} - built
    # A default written anywhere but the table (or mapped wrongly) makes these differ.
    plain = mount_config(resolve(_args("bkt", "/mnt/y", "--cache-dir", "/c"), {}))
    assert plain == MountConfig("bkt", "", Path("/mnt/y"), Path("/c"))


def test_s3_max_attempts_and_memory_cache_size_are_settings(tmp_path: Path) -> None:
    plain = mount_config(resolve(_args("bkt", "/mnt/y"), {}))
    assert (plain.s3_max_attempts, plain.memory_cache_bytes) == (3, 64 << 20)
    config = tmp_path / "m.toml"
    config.write_text('s3-max-attempts = 5\nmemory_cache_size = "16M"\n')
    from_file = mount_config(resolve(_args("bkt", "/mnt/y", "--config", str(config)), {}))
    assert (from_file.s3_max_attempts, from_file.memory_cache_bytes) == (5, 16 << 20)
    env = {"S3CACHEFS_S3_MAX_ATTEMPTS": "7", "S3CACHEFS_MEMORY_CACHE_SIZE": "0"}
    from_env = mount_config(resolve(_args("bkt", "/mnt/y", "--config", str(config)), env))
    assert (from_env.s3_max_attempts, from_env.memory_cache_bytes) == (7, 0)
    flags = _args("bkt", "/mnt/y", "--s3-max-attempts", "1", "--memory-cache-size", "1G")
    from_flags = mount_config(resolve(flags, env))
    assert (from_flags.s3_max_attempts, from_flags.memory_cache_bytes) == (1, 1 << 30)


def test_the_readme_lists_every_mount_option_with_the_table_default() -> None:
    text = (REPO / "README.md").read_text()
    table = text.split("| option | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [row.split(" | ") for row in table.strip().splitlines()[1:]]
    settings = {s.name: s for s in SETTINGS}
    documented: set[str] = set()
    for row in rows:
        names = re.findall(r"--(?:\[no-\])?([a-z0-9-]+)", row[0])
        documented.update(names)
        assert set(names) <= {*settings, "config"}, row[0]  # no option that is gone
        cell = row[1].strip()
        for setting in (settings[n] for n in names if n in settings):
            if cell in ("on", "off") and setting.kind in ("switch", "toggle"):
                assert cell == setting.shown_default, setting.name
            elif re.fullmatch(r"`[^`]*`", cell) and setting.default is not None:
                assert cell == f"`{setting.shown_default}`", setting.name
    assert {s.name for s in SETTINGS if s.flag} <= documented


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ('sourse = "typo"\n', {}, "unknown key 'sourse'"),
        ('cache-size = "lots"\n', {}, "cache-size: bad size"),
        ("allow-other = 3\n", {}, "allow-other: bad boolean"),
        ("not toml [\n", {}, "not valid TOML"),
        ("", {"S3CACHEFS_CACHE_SIZ": "1G"}, "unknown environment variable S3CACHEFS_CACHE_SIZ"),
        ("", {"S3CACHEFS_METADATA_TTL": "-5"}, "S3CACHEFS_METADATA_TTL: bad TTL"),
        ('etag-md5 = "no"\n', {}, "etag-md5: bad value 'no': use auto or off"),
        ("", {"S3CACHEFS_ETAG_MD5": "md5"}, "S3CACHEFS_ETAG_MD5: bad value 'md5': use auto or"),
        ("s3-max-attempts = 0\n", {}, "s3-max-attempts: bad number 0: must be at least 1"),
        ("s3_max_attempts = 2.5\n", {}, "s3_max_attempts: bad number 2.5"),
        ("", {"S3CACHEFS_S3_MAX_ATTEMPTS": "x"}, "S3CACHEFS_S3_MAX_ATTEMPTS: bad number 'x'"),
        ("memory-cache-size = -1\n", {}, "memory-cache-size: bad size -1"),
        ("", {"S3CACHEFS_MEMORY_CACHE_SIZE": "lots"}, "S3CACHEFS_MEMORY_CACHE_SIZE: bad size"),
    ],
)
def test_config_errors_name_their_source(
    tmp_path: Path, text: str, env: dict[str, str], needle: str
) -> None:
    config = tmp_path / "m.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        resolve(_args("bkt", str(tmp_path), "--config", str(config)), env)


def test_etag_md5_is_auto_unless_the_file_environment_or_flag_says_off(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text('etag-md5 = "off"\n')
    assert mount_config(resolve(_args("bkt", "/mnt/y"), {})).etag_md5s
    from_file = resolve(_args("bkt", "/mnt/y", "--config", str(config)), {})
    assert mount_config(from_file).etag_md5 == "off"
    from_env = resolve(_args("bkt", "/mnt/y"), {"S3CACHEFS_ETAG_MD5": "OFF"})
    assert not mount_config(from_env).etag_md5s
    flag = _args("bkt", "/mnt/y", "--config", str(config), "--etag-md5", "auto")
    assert mount_config(resolve(flag, {"S3CACHEFS_ETAG_MD5": "off"})).etag_md5s


def test_eio_warnings_are_throttled_per_operation_and_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    warnings = ThrottledWarnings(10.0, clock=lambda: now[0])
    failed = "s3://b/k: S3 unavailable (503) after retries"
    with caplog.at_level(logging.WARNING, logger="s3cachefs.fs.operations"):
        for _ in range(5):
            warnings.warning("read", failed)
        warnings.warning("read", "s3://b/other: S3 unavailable (503) after retries")
        warnings.warning("open", failed)
        now[0] = 9.9
        warnings.warning("read", failed)
        now[0] = 12.0
        warnings.warning("read", failed)
        warnings.warning("read", failed)
        now[0] = 30.0
        warnings.warning("read", failed)
        # Unexpected exceptions are ERRORs (Sentry), every one.
        for _ in range(2):
            with pytest.raises(pyfuse3.FUSEError), _errno_mapped("read"):
                raise RuntimeError("a bug")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"op=read failed: {failed}"),
        ("WARNING", "op=read failed: s3://b/other: S3 unavailable (503) after retries"),
        ("WARNING", f"op=open failed: {failed}"),
        ("WARNING", f"op=read failed: {failed} (5 more like it in the last 12 s not logged)"),
        ("WARNING", f"op=read failed: {failed} (1 more like it in the last 18 s not logged)"),
        ("ERROR", "op=read failed unexpectedly"),
        ("ERROR", "op=read failed unexpectedly"),
    ]


def test_config_errors_reach_the_user_as_one_line(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text('source = "bkt"\nmountpoint = "/tmp"\ncache_sise = "1G"\n')
    result = run_cli("mount", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"s3cachefs: {config}: unknown key 'cache_sise'"
    missing = run_cli("mount", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_mount_and_prefetch_from_one_config_file(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("ds/a.bin", b"a" * 1000)
    bucket.put("ds/sub/b.bin", b"b" * 2000)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "node.toml"
    config.write_text(
        f'source = "{bucket.name}"\nmountpoint = "{mnt}"\n'
        f'endpoint-url = "{bucket.server.endpoint_url}"\ncache-dir = "{tmp_path / "cache"}"\n'
        'min-free = 0\nprefetch = ["ds"]\n'
    )
    assert run_cli("mount", "--config", str(config)).returncode == 0
    try:
        result = run_cli("prefetch", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert "ds: complete, verified and pinned" in result.stdout
        assert (mnt / "ds" / "sub" / "b.bin").read_bytes() == b"b" * 2000
    finally:
        assert run_cli("unmount", str(mnt)).returncode == 0


def test_sd_notify_ready_status_and_stopping(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("f.txt", b"data")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        proc = subprocess.Popen(
            _foreground(bucket, mnt, tmp_path / "cache"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            ready = sock.recv(4096).decode().splitlines()
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=cache ") and "hit ratio" in ready[1]
            assert (mnt / "f.txt").read_bytes() == b"data"  # READY meant usable
            proc.send_signal(signal.SIGTERM)
            stopping = sock.recv(4096).decode().splitlines()
            assert stopping[0] == "STOPPING=1"
            assert proc.wait(timeout=30) == 0
            assert not os.path.ismount(mnt)
        finally:
            if proc.poll() is None:
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
                proc.kill()
                proc.wait()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as shipped, with ExecStart pointed at the s3cachefs this test runs."""
    installed = shutil.which("s3cachefs")
    assert installed is not None
    for unit in ("s3cachefs@.service", "s3cachefs-prefetch@.service"):
        text = (REPO / "systemd" / unit).read_text()
        instance = unit.replace("@.", "@datasets.")
        (tmp_path / instance).write_text(text.replace("/usr/local/bin/s3cachefs", installed))
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "s3cachefs@datasets.service"),
            str(tmp_path / "s3cachefs-prefetch@datasets.service"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_parses_and_counts(bucket: Bucket, mounter: Mounter) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    bucket.put("ds/page.png", os.urandom(300_000))
    port = _free_port()
    mount = mounter(bucket.name, "--metrics-address", f"127.0.0.1:{port}")
    assert len((mount.path / "ds" / "page.png").read_bytes()) == 300_000
    assert run_cli("prefetch", "ds", "--mount", str(mount.path)).returncode == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("s3cachefs_cache_misses_total", ())] >= 1
    assert samples[("s3cachefs_cache_bytes_from_s3_total", ())] == 300_000
    assert samples[("s3cachefs_s3_requests_total", (("operation", "get"),))] >= 1
    assert samples[("s3cachefs_fuse_requests_total", (("operation", "read"),))] >= 1
    assert samples[("s3cachefs_cache_pinned_bytes", ())] == 300_000
    assert samples[("s3cachefs_dataset_complete", (("dataset", "ds"),))] == 1
    assert samples[("s3cachefs_process_resident_memory_bytes", ())] > 10_000_000
    assert samples[("s3cachefs_disk_free_bytes", ())] > 0
    latency = ("s3cachefs_s3_request_seconds_count", (("operation", "get"), ("outcome", "ok")))
    assert samples[latency] >= 1


def test_bad_metrics_address_is_one_line(bucket: Bucket, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = mount_cli(bucket, mnt, tmp_path / "c", "--metrics-address", "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("s3cachefs: bad metrics address 'nowhere'")
    assert not os.path.ismount(mnt)


class _Envelopes(http.server.BaseHTTPRequestHandler):
    """A stand-in Sentry: keeps the body of every envelope POSTed to it."""

    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        elif self.headers.get("Content-Encoding") == "br":
            import brotli

            body = brotli.decompress(body)
        self.received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_unexpected_errors_reach_sentry_without_secrets(
    bucket: Bucket, mounter: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Envelopes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("SENTRY_DSN", f"http://publickey@127.0.0.1:{server.server_port}/42")
        monkeypatch.setenv("SENTRY_ENVIRONMENT", "ci")
        bucket.put("f.txt", b"data")
        mount = mounter(bucket.name)
        assert (mount.path / "f.txt").read_bytes() == b"data"
        result = run_cli("sentry-test", "--mount", str(mount.path))
        assert result.returncode == 0, result.stderr
        assert mount.stop() == 0  # the daemon flushes Sentry on the way out
        events = [e for e in _Envelopes.received if b"raised on purpose" in e]
        assert events, _Envelopes.received
        event = events[0].decode()
        assert '"release":"s3cachefs@' in event.replace(" ", "")
        assert '"environment":"ci"' in event.replace(" ", "")
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in event
    finally:
        server.shutdown()
        server.server_close()


def test_scrub_removes_secrets_and_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    from s3cachefs.daemon.reporting import scrub

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    event = {
        "message": f"failed with key {secret}",
        "extra": ["https://b.s3/k?X-Amz-Signature=abcdef123&X-Amz-Credential=AKIA/x"],
        "n": 3,
    }
    clean = scrub(event, [secret])
    assert secret not in str(clean) and "abcdef123" not in str(clean) and "AKIA" not in str(clean)
    assert clean["n"] == 3 and "[redacted]" in clean["message"]


def test_journald_gets_one_prefixed_line_per_event(bucket: Bucket, tmp_path: Path) -> None:
    """Under systemd (JOURNAL_STREAM set) every stderr line carries its syslog priority."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "occupied").write_text("x")  # a start-up failure: an ERROR-free, one-line reason
    env = dict(os.environ, JOURNAL_STREAM="8:12345")
    result = subprocess.run(
        _foreground(bucket, mnt, tmp_path / "c"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("is not empty")
    (mnt / "occupied").unlink()
    proc = subprocess.Popen(
        _foreground(bucket, mnt, tmp_path / "c"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.listdir(mnt)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    lines = err.strip().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>INFO s3cachefs.daemon.app: mounted ") for line in lines)

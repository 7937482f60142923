"""``s3cachefs`` command line: parse, run, print one clear line on failure.

Exit codes (README, "Exit codes"):
    0  success
    1  unexpected internal error (a bug: see the log)
    2  bad usage or configuration (flags, sizes, mountpoint, cache dir)
    3  S3 refused or could not be reached (bucket, credentials, endpoint)
    4  prefetch or verify ended with objects missing or failed (they are listed)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from s3cachefs import __version__
from s3cachefs.cli.client import request
from s3cachefs.cli.settings import add_mount_options, jobs_arg, mount_config, resolve, shard_arg
from s3cachefs.daemon.cachedir import DAEMON_UMASK, check_min_free, claim_cache_dir
from s3cachefs.daemon.config import MountConfig
from s3cachefs.daemon.errors import ConfigError, S3CacheFSError, StoreError
from s3cachefs.daemon.logs import setup_logging
from s3cachefs.daemon.mountpoint import is_stale, unmount
from s3cachefs.daemon.runtime import read_record, remove_record

log = logging.getLogger("s3cachefs")

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_S3, EXIT_INCOMPLETE = 0, 1, 2, 3, 4
# How long `mount` waits for the daemon to report the mount usable.
START_TIMEOUT = 120.0


def exit_code_for(exc: S3CacheFSError) -> int:
    return EXIT_S3 if isinstance(exc, StoreError) else EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"s3cachefs: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="s3cachefs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"s3cachefs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount BUCKET[/PREFIX] at MOUNTPOINT (read-only by default)")
    add_mount_options(m)
    m.add_argument("--foreground", action="store_true", help="stay attached (systemd, debugging)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("unmount", help="unmount (also cleans a stale mount of a dead daemon)")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    u.add_argument("--lazy", action="store_true", help="detach now even if files are open")

    p = sub.add_parser("prefetch", help="download a dataset into the cache, verify and pin it")
    p.add_argument(
        "dataset",
        metavar="DATASET",
        nargs="?",
        help="prefix under the mount, or a path in it (default: `prefetch` in --config)",
    )
    p.add_argument("--config", type=Path, help="a mount's TOML file: its mountpoint, datasets")
    p.add_argument("--mount", type=Path, help="the mount to use (default: the only one)")
    p.add_argument(
        "--jobs",
        type=jobs_arg,
        help="concurrent GETs (default: half of the mount's --s3-concurrency, 32)",
    )
    p.add_argument("--dry-run", action="store_true", help="count, size and whether it fits")
    p.add_argument(
        "--require-checksums",
        action="store_true",
        help="fail objects that S3 gives nothing to verify end to end against (size-checked only)",
    )
    p.add_argument(
        "--shard", metavar="I/N", type=shard_arg, help="only shard I of N (stable hash of the key)"
    )
    p.add_argument("--list-out", type=Path, help="write the (shard's) keys to this file")
    p.add_argument("--json", action="store_true", help="machine-readable progress events")

    st = sub.add_parser("status", help="mounts, cache, pinned datasets, jobs, recent errors")
    st.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?")
    st.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="re-check a pinned dataset, re-fetch what fails")
    v.add_argument("dataset", metavar="DATASET")
    v.add_argument("--mount", type=Path)
    v.add_argument("--json", action="store_true")

    e = sub.add_parser("evict", help="unpin a dataset and free its cache space")
    e.add_argument("dataset", metavar="DATASET")
    e.add_argument("--mount", type=Path)

    w = sub.add_parser("staged", help="files written but not uploaded: list, --upload, --discard")
    w.add_argument("targets", metavar="ID|KEY", nargs="*", help="staged files (see the list)")
    action = w.add_mutually_exclusive_group()
    action.add_argument("--upload", action="store_true", help="upload them now")
    action.add_argument("--discard", action="store_true", help="delete the staged data")
    w.add_argument("--all", action="store_true", help="every staged file")
    w.add_argument("--mount", type=Path)
    w.add_argument("--json", action="store_true")

    t = sub.add_parser("sentry-test", help="make the daemon report a test error to Sentry")
    t.add_argument("--mount", type=Path)

    d = sub.add_parser("demo", help="run the quick start against an embedded local S3 server")
    d.add_argument("--workdir", type=Path, help="where to mount and cache (default: a temp dir)")
    return parser


def cmd_mount(args: argparse.Namespace, argv: Sequence[str]) -> int:
    notes: list[str] = []
    values = resolve(args, os.environ, notes)  # bad sizes etc. fail here, before anything starts
    config = mount_config(values)
    if not args.foreground:
        for note in notes:
            print(f"s3cachefs: warning: {note}", file=sys.stderr)
        return _mount_in_background(argv, config)
    os.umask(DAEMON_UMASK)  # every file the daemon creates is 0600, every directory 0700
    ready_fd: int | None = args.ready_fd
    level = values["log-level"]

    def on_ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)

    try:
        log_file = None
        # Before the log: nothing is written into a directory that is not a cache.
        notes += check_min_free(config.cache_dir, config.min_free)
        notes += claim_cache_dir(config.cache_dir)
        if ready_fd is not None:
            log_file = values["log-file"] or config.cache_dir / "daemon.log"
            try:
                setup_logging(level, log_file)
            except OSError as exc:
                raise ConfigError(f"cannot write log file {log_file}: {exc.strerror}") from None
        else:
            setup_logging(level)
        for note in notes:
            log.warning("%s", note)
        from s3cachefs.daemon.app import run_daemon  # imports pyfuse3: only for the daemon

        run_daemon(config, on_ready)
    except S3CacheFSError as exc:
        if ready_fd is not None:
            _report(ready_fd, exit_code_for(exc), str(exc))
        raise
    except Exception as exc:
        log.exception("daemon failed")
        if ready_fd is not None:
            _report(ready_fd, EXIT_BUG, f"internal error: {type(exc).__name__}: {exc}")
        raise
    return EXIT_OK


def _report(fd: int, code: int, message: str) -> None:
    with contextlib.suppress(OSError):  # the waiting parent is gone; the log has it
        os.write(fd, f"ERROR {code} {message}\n".encode())


def _mount_in_background(argv: Sequence[str], config: MountConfig) -> int:
    """Start the daemon detached; return once it reports the mount usable, or its error."""
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "s3cachefs", *argv, "--foreground", "--ready-fd", str(write_fd)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(write_fd,),
        start_new_session=True,
    )
    os.close(write_fd)
    message = b""
    deadline = time.monotonic() + START_TIMEOUT
    with os.fdopen(read_fd, "rb") as pipe:
        while b"\n" not in message and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.5)
            if ready:
                chunk = os.read(pipe.fileno(), 4096)
                if not chunk:
                    break
                message += chunk
    line = message.decode(errors="replace").strip()
    if line == "READY":
        print(f"mounted {config.source} at {config.mountpoint} (daemon pid {proc.pid})")
        return EXIT_OK
    if line.startswith("ERROR "):
        _, code, text = line.split(" ", 2)
        print(f"s3cachefs: {text}", file=sys.stderr)
        return int(code)
    if proc.poll() is None:
        proc.terminate()
        print(f"s3cachefs: daemon did not become ready in {START_TIMEOUT:.0f}s", file=sys.stderr)
    else:
        log_file = config.cache_dir / "daemon.log"
        print(
            f"s3cachefs: daemon exited during start-up (code {proc.returncode}); see {log_file}",
            file=sys.stderr,
        )
    return EXIT_BUG


def cmd_unmount(args: argparse.Namespace) -> int:
    path: Path = args.mountpoint.absolute()
    stale = is_stale(path)
    if not stale and not os.path.ismount(path):
        raise ConfigError(f"{path} is not mounted")
    record = read_record(path)
    if record is not None and not stale:
        # Kernel-served datasets are binds on the mount: the daemon unmounts its own first.
        with contextlib.suppress(ConfigError, OSError, ValueError):
            for _ in request(record, {"op": "unbind"}):
                pass
    unmount(path, lazy=args.lazy or stale)
    if record is not None and _wait_for_exit(record.pid, timeout=30.0):
        print(f"unmounted {path}")
    elif stale:
        remove_record(path)
        print(f"cleaned stale mount {path}")
    else:
        print(f"unmounted {path}")
    return EXIT_OK


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait for the daemon to finish flushing; True if it was running and is now gone."""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return False
    except psutil.TimeoutExpired:
        print(f"s3cachefs: daemon pid {pid} still running after {timeout:.0f}s", file=sys.stderr)
        return False
    return True


def _dispatch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.command == "mount":
        return cmd_mount(args, argv)
    if args.command == "unmount":
        return cmd_unmount(args)
    if args.command == "demo":
        from s3cachefs.cli.demo import run_demo

        return run_demo(args.workdir)
    from s3cachefs.cli import jobs  # prefetch, status, verify, evict

    return int(getattr(jobs, f"cmd_{args.command.replace('-', '_')}")(args))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except S3CacheFSError as exc:
        print(f"s3cachefs: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001  a bug: its traceback went to the log; the user gets one line
        print(f"s3cachefs: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BUG

"""``mount`` (in the background, or as the daemon in the foreground) and ``unmount``."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import ConfigError, S3CacheFSError
from s3cachefs.base.logs import setup_logging
from s3cachefs.cache.cachedir import DAEMON_UMASK, check_min_free, claim_cache_dir
from s3cachefs.cli.exits import EXIT_BUG, EXIT_BUSY, EXIT_OK, exit_code_for
from s3cachefs.cli.settings import mount_config, resolve
from s3cachefs.daemon.client import request
from s3cachefs.daemon.holders import Holder, holders
from s3cachefs.daemon.mountpoint import fuse_mount_at, is_stale, remove_stale, unmount
from s3cachefs.daemon.runtime import MountRecord, read_record, remove_record
from s3cachefs.datasets.binds import MountEntry

# Not __name__: the daemon's own lines (settings warnings) read "s3cachefs: ...".
log = logging.getLogger("s3cachefs")

# How long `mount` waits for the daemon to report the mount usable.
START_TIMEOUT = 120.0


def cmd_mount(args: argparse.Namespace) -> int:
    """In the foreground: be the daemon. Otherwise start ``args.argv`` again in the
    background, with ``--foreground``, and wait for its word."""
    notes: list[str] = []
    values = resolve(args, os.environ, notes)  # bad sizes etc. fail here, before anything starts
    config = mount_config(values)
    if not args.foreground:
        for note in notes:
            print(f"s3cachefs: warning: {note}", file=sys.stderr)
        return _mount_in_background(args.argv, config)
    os.umask(DAEMON_UMASK)  # every file the daemon creates is 0600, every directory 0700
    ready_fd: int | None = args.ready_fd
    level = values["log-level"]

    def on_ready(warning: str) -> None:
        if ready_fd is not None:  # one line: the warning must not hold a newline
            os.write(ready_fd, f"READY {' '.join(warning.split())}".rstrip().encode() + b"\n")
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
        # All closed and flushed: no collection of the heap (boto3's models, ...) at exit,
        # which made every stop 0.2-0.4 s longer. atexit and std stream flushes still run.
        gc.freeze()
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
    if line == "READY" or line.startswith("READY "):
        print(f"mounted {config.source} at {config.mountpoint} (daemon pid {proc.pid})")
        if line != "READY":
            print(f"s3cachefs: warning: {line.removeprefix('READY ')}", file=sys.stderr)
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
    """Unmount here; say so (exit 5) when the daemon keeps serving another mount of it.

    A container runtime or ``unshare -m`` holds a copy of the mount in its own
    mount namespace: unmounting the path here does not end the FUSE connection,
    and the daemon goes on serving the copy. That is refused up front (nothing
    changes) unless ``--lazy``; copies that receive our unmount by propagation
    do not count, and whatever still holds it after the unmount is reported.
    """
    path: Path = args.mountpoint.absolute()
    mount = fuse_mount_at(os.path.realpath(path))  # under a mount-root dataset's overlay
    if is_stale(path):  # its daemon is gone: so is every copy's
        overlays = remove_stale(path)  # with the overlays that daemon left on it
        record = read_record(path)
        if record is not None and not psutil.pid_exists(record.pid):
            remove_record(path, record.pid)
        also = f" and the {overlays} kernel-serve overlays its daemon left on it"
        print(f"cleaned stale mount {path}{also if overlays else ''}")
        return EXIT_OK
    if mount is None and not os.path.ismount(path):
        raise ConfigError(f"{path} is not mounted")
    if mount is not None and not mount.fstype.startswith("fuse"):  # e.g. the bind under it
        raise ConfigError(f"{path} is not an s3cachefs mount ({mount.fstype})")
    record = _record_of(path, mount)
    held = [h for h in _holders(mount) if not h.follows]
    if held and not args.lazy:
        _report_held(path, record, held, "refused: ")
        return EXIT_BUSY
    # Kernel-served datasets are binds on the mount: the daemon unmounts its own first.
    _ask(record, "unbind")
    try:
        unmount(path, lazy=args.lazy, mount=mount)
    except ConfigError:
        _ask(record, "rebind")  # still mounted: the kernel serves the datasets again
        busy = _holders(mount)
        if busy:  # e.g. a busy copy that our unmount propagates to
            _report_held(path, record, busy, "cannot unmount, busy: ")
            return EXIT_BUSY
        raise
    left = _holders(mount)
    if left:
        if args.lazy:
            where = "; ".join(h.describe() for h in left)
            print(f"unmounted {path} here; still mounted in {where}: the daemon serves it there")
            return EXIT_OK
        _report_held(path, record, left, "unmounted here, but ")
        return EXIT_BUSY
    if record is not None:
        _wait_for_exit(record.pid, timeout=30.0)
    print(f"unmounted {path}")
    return EXIT_OK


def _holders(mount: MountEntry | None) -> list[Holder]:
    return holders(mount, mount.mount_point) if mount is not None else []


def _ask(record: MountRecord | None, op: str) -> None:
    """A best-effort request to the daemon of the mount (an older daemon may not know it)."""
    if record is not None:
        with contextlib.suppress(ConfigError, OSError, ValueError):
            for _ in request(record, {"op": op}):
                pass


def _record_of(path: Path, mount: MountEntry | None) -> MountRecord | None:
    """The runtime record of the daemon whose mount is on ``path`` (not of an older one)."""
    record = read_record(path)
    if record is None or mount is None or not record.device:
        return record
    return record if (record.device, record.mount_id) == (mount.device, mount.id) else None


def _report_held(path: Path, record: MountRecord | None, held: list[Holder], what: str) -> None:
    where = "; ".join(h.describe() for h in held)
    daemon = f"daemon pid {record.pid}" if record else "its daemon"
    print(
        f"s3cachefs: {what}{path} is still mounted in {where}; the {daemon} keeps serving it "
        "there. Unmount it there or stop those processes (--lazy: detach it here anyway)",
        file=sys.stderr,
    )


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait for the daemon to finish flushing; True if it was running and is now gone.

    A zombie counts as gone: its work is done, only its parent has not reaped it yet.
    """
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    print(f"s3cachefs: daemon pid {pid} still running after {timeout:.0f}s", file=sys.stderr)
    return False

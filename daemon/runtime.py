"""Per-mount runtime records (``/run/s3cachefs``): which daemon serves which mountpoint.

``unmount`` uses them to wait for the daemon to finish (so a remount on the
same cache dir can start at once); the control socket lives beside them. The
directory is 0700: only the daemon's user reads it.

Two daemons can have served the same path: an old one whose mount lives on in
another mount namespace, and a new one mounted on the path since. A record
names its daemon's pid and mount (device ``major:minor``, mount id); each
daemon's socket carries its pid in its name; a daemon removes a record only if
it is its own.

A pid means something only in its own PID namespace: in containers the daemon
is often PID 1, which exists in every container. A record also names its
daemon's PID namespace; from another namespace a daemon is alive when its
control socket accepts a connection.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/s3cachefs")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/s3cachefs-{os.getuid()}"  # noqa: S108
    return Path(base) / "s3cachefs"


@dataclass(frozen=True)
class MountRecord:
    pid: int
    mountpoint: str
    source: str
    cache_dir: str
    socket: str
    device: str = ""  # "major:minor" of the daemon's FUSE mount ("": an earlier release)
    mount_id: int = 0
    pid_ns: int = 0  # inode of the daemon's PID namespace (0: an earlier release)


def pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid), 0 if unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _path(mountpoint: Path) -> Path:
    # abspath, not resolve(): stat-ing our own mountpoint before the FUSE loop runs deadlocks.
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir() / f"mount-{digest}.json"


def control_socket_path(mountpoint: Path, pid: int) -> Path:
    path = _path(mountpoint)
    return path.with_name(f"{path.stem}-{pid}.sock")


def all_records() -> list[MountRecord]:
    """Records of daemons that are still alive (stale ones are skipped)."""
    records = []
    for path in sorted(runtime_dir().glob("mount-*.json")):
        try:
            record = MountRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _record_alive(record.pid, record.pid_ns, record.socket):
            records.append(record)
    return records


def _record_alive(pid: int, pid_ns: int, sock: str) -> bool:
    """Whether the daemon of a record lives: by pid in our PID namespace, else by its socket."""
    if not pid_ns or pid_ns == pid_namespace():
        return _alive(pid)
    return _answers(sock)


def _answers(path: str) -> bool:
    """A listening socket accepts a connection; a dead daemon's refuses (or is gone)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
            return False
        except OSError:
            return True  # busy or not ours to reach: never take it for dead
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_records() -> int:
    """Remove the records and sockets of daemons that died without cleaning up (kill -9)."""
    removed = 0
    for path in runtime_dir().glob("mount-*.json"):
        try:
            data = json.loads(path.read_text())
            pid, pid_ns, own = int(data["pid"]), int(data.get("pid_ns", 0)), str(data["socket"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pid, pid_ns, own = 0, 0, ""
        if pid and _record_alive(pid, pid_ns, own):
            continue
        path.unlink(missing_ok=True)
        path.with_suffix(".sock").unlink(missing_ok=True)  # named so by earlier releases
        if own.startswith(str(runtime_dir()) + "/"):  # the dead daemon's own socket
            Path(own).unlink(missing_ok=True)
        removed += 1
    for sock in runtime_dir().glob("mount-*-*.sock"):
        pid_text = sock.stem.rpartition("-")[2]
        # The pid may be of another PID namespace: a socket that still answers is kept.
        if pid_text.isdigit() and not _alive(int(pid_text)) and not _answers(str(sock)):
            sock.unlink(missing_ok=True)
    return removed


def write_record(record: MountRecord) -> Path:
    path = _path(Path(record.mountpoint))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep_dead_records()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)
    return path


def read_record(mountpoint: Path) -> MountRecord | None:
    try:
        return MountRecord(**json.loads(_path(mountpoint).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove_record(mountpoint: Path, pid: int | None = None) -> None:
    """Remove the record of ``mountpoint``; with ``pid``, only if it is that daemon's."""
    if pid is not None:
        record = read_record(mountpoint)
        if record is not None and record.pid != pid:
            return  # another daemon's, mounted on the path since
    _path(mountpoint).unlink(missing_ok=True)

"""Per-mount runtime records (``/run/s3cachefs``): which daemon serves which mountpoint.

``unmount`` uses them to wait for the daemon to finish (so a remount on the
same cache dir can start at once); the control socket lives beside them. The
directory is 0700: only the daemon's user reads it.

Two daemons can have served the same path: an old one whose mount lives on in
another mount namespace, and a new one mounted on the path since. A record
names its daemon's pid and mount (device ``major:minor``, mount id); each
daemon's socket carries its pid in its name; a daemon removes a record only if
it is its own.
"""

from __future__ import annotations

import hashlib
import json
import os
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
        if _alive(record.pid):
            records.append(record)
    return records


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
            pid = int(json.loads(path.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = 0
        if pid and _alive(pid):
            continue
        path.unlink(missing_ok=True)
        path.with_suffix(".sock").unlink(missing_ok=True)  # named so by earlier releases
        removed += 1
    for sock in runtime_dir().glob("mount-*-*.sock"):
        pid_text = sock.stem.rpartition("-")[2]
        if pid_text.isdigit() and not _alive(int(pid_text)):
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

"""The cache dir before anything is written into it: ours, private, and really a cache.

A cache dir holds key names, the bucket and object data, so it is 0700 and
owned by the daemon's user; the daemon runs under umask 077 so that every file
it creates (log, index database and its -wal/-shm, format file, blocks,
manifests, staging) is 0600. A directory that already holds something else
(a data folder given by mistake) is refused before a byte is written into it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil

from s3cachefs.base.errors import CacheDirError

FORMAT_VERSION = 1
LAYOUT = f"v{FORMAT_VERSION}"
# What a daemon writes at the top of a cache dir before its layout exists
# (a start that failed early), and what a fresh filesystem holds.
_EARLY_ENTRIES = {"lock", "daemon.log", "lost+found"}
# Any one of these in LAYOUT/ marks the directory as an s3cachefs cache.
_LAYOUT_MARKS = ("format.json", "index", "objects")
# The daemon's umask: nothing it creates is readable by other users.
DAEMON_UMASK = 0o077


def claim_cache_dir(path: Path) -> list[str]:
    """Create ``path`` or accept it as a cache dir; refuse in one line (CacheDirError).

    Accepted: a missing or empty directory, or one holding an s3cachefs cache.
    The layout directory is created at once, so a start that fails later
    leaves a directory the next start recognises. Returns notes to log.
    """
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        entries = []
    except NotADirectoryError:
        raise CacheDirError(f"cache dir {path} is not a directory") from None
    except OSError as exc:
        raise CacheDirError(f"cannot read cache dir {path}: {exc.strerror}") from None
    if not _holds_cache(path, entries):
        foreign = sorted(set(entries) - _EARLY_ENTRIES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CacheDirError(
                f"cache dir {path} is not empty and holds no s3cachefs cache ({shown}); "
                "give an empty or new directory"
            )
    notes = ensure_private_dir(path)
    try:
        (path / LAYOUT).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CacheDirError(f"cannot use cache dir {path}: {exc.strerror}") from None
    return notes


def _holds_cache(path: Path, entries: list[str]) -> bool:
    if LAYOUT not in entries:
        return False
    try:
        inside = set(os.listdir(path / LAYOUT))
    except OSError:
        return False
    return not inside or any(mark in inside for mark in _LAYOUT_MARKS)


def ensure_private_dir(path: Path) -> list[str]:
    """``path`` exists, is ours and is 0700 (made so if it was looser). Returns notes."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise CacheDirError(f"cannot create cache dir {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"cache dir {path} is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise CacheDirError(
            f"cache dir {path} belongs to uid {st.st_uid}, not to this daemon's uid {uid}: "
            "chown it or give another --cache-dir"
        )
    notes = []
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise CacheDirError(
                f"cache dir {path} is mode {mode:04o} (other users can read it) and cannot "
                f"be made 0700: {exc.strerror}"
            ) from None
        notes.append(
            f"cache dir {path} was mode {mode:04o}; made it 0700 (it holds key names and data)"
        )
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise CacheDirError(f"cache dir {path} is not readable and writable")
    return notes


def check_min_free(path: Path, min_free: int) -> list[str]:
    """Refuse a ``--min-free`` the disk can never honour; note one it does not honour now.

    Without this, every block would be "served uncached" with no hint why.
    Asks the nearest existing directory, so a refusal changes nothing on disk.
    """
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    disk = psutil.disk_usage(str(where))
    if min_free >= disk.total:
        raise CacheDirError(
            f"--min-free {_human(min_free)} is not below the size of the cache disk "
            f"({_human(disk.total)} at {where}): nothing could ever be cached; "
            "give a smaller --min-free"
        )
    if min_free > disk.free:
        return [
            f"the cache disk has {_human(disk.free)} free at {where}, less than --min-free "
            f"{_human(min_free)}: blocks are served uncached until space is freed"
        ]
    return []


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"

"""`evict_dir`: delete a synced directory's files (`DatasetProvider.evict`, directory mode).

Under the sync lock (``DEST/.s3cachefs/lock``: never while a sync writes into
DEST), only the files the manifest records the syncs wrote (verified, or kept
after S3 dropped them) and the state folder go; anything else in DEST stays,
and DEST itself goes only if that leaves it empty. Never outside DEST
(`dirplan.leaves_dest`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from contextlib import suppress
from pathlib import Path

from s3cachefs.base.errors import ConfigError
from s3cachefs.datasets import dirmanifest as dm
from s3cachefs.datasets.dirplan import leaves_dest, prune


def evict_dir(dest: Path) -> int:
    """Bytes freed; ConfigError if DEST is no synced dataset, a sync is writing into it, or
    a file cannot be removed (what was removed stays removed)."""
    state = dm.state_dir(dest)
    try:
        if not state.is_dir():
            raise ConfigError(f"{dest} is not a synced dataset: nothing evicted")
        with (state / "lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another sync is writing into {dest}: not evicted") from None
            manifest = dm.load(dest)  # as it is now that no sync runs
            if manifest is None:
                raise ConfigError(f"{dest} is not a synced dataset: nothing evicted")
            freed = 0
            for rel in sorted({*manifest.objects, *manifest.kept}):
                if leaves_dest(dest, rel):
                    continue
                path = dest / rel
                with suppress(FileNotFoundError):
                    st = os.lstat(path)
                    path.unlink()
                    freed += st.st_size if stat.S_ISREG(st.st_mode) else 0
                prune(path.parent, dest)
            shutil.rmtree(state)
    except OSError as exc:
        raise ConfigError(f"{dest}: cannot evict ({exc.strerror or exc})") from None
    with suppress(OSError):
        dest.rmdir()  # only if nothing else is left in it
    return freed

"""Wiring of `fs.passthrough`: whether this daemon uses it, and says why not.

On by default where available: root (registering a backing file needs
CAP_SYS_ADMIN), Linux >= 6.9 (FUSE passthrough), the patched pyfuse3
(`packaging/build-passthrough.sh`, run by ``./quickstart test``), a read-only
mount (an inode passed through cannot be opened for writing: ETXTBSY) and a cache
dir not on overlayfs (the kernel allows a backing file on a non-stacked fs only:
ELOOP). Otherwise files are read through the FUSE path, CRC-checked, and one line
says why: info when nobody asked (a user who never asked should not see a warning
at every start), a warning under ``--passthrough``; ``--no-passthrough`` is silent.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pyfuse3

from s3cachefs.base.config import MountConfig
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets import binds
from s3cachefs.fs.operations import Operations
from s3cachefs.fs.passthrough import Passthrough

log = logging.getLogger(__name__)

KERNEL_MIN = (6, 9)


def unavailable(config: MountConfig, release: str | None = None) -> str | None:
    """Why passthrough cannot be used here, or None if it can."""
    if config.writable:
        return "the mount is writable (--writable)"
    if os.geteuid() != 0:
        return "not root (registering a backing file needs CAP_SYS_ADMIN)"
    found = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    if found is None or (int(found[1]), int(found[2])) < KERNEL_MIN:
        return "Linux >= 6.9 needed"
    if not hasattr(pyfuse3, "passthrough_open"):
        return "pyfuse3 is not the patched build (packaging/build-passthrough.sh)"
    if fs_type(config.cache_dir) == "overlay":
        return "the cache dir is on overlayfs (backing files must be on a non-stacked fs)"
    return None


def fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on, from mountinfo ("" if not found)."""
    real = Path(os.path.realpath(path))
    for candidate in (real, *real.parents):
        stack = binds.stack_at(candidate)
        if stack:
            return stack[-1].fstype
    return ""


def setting(config: MountConfig) -> str:
    return {None: "auto", True: "on", False: "off"}[config.passthrough]


def passthrough(config: MountConfig, ops: Operations, cache: BlockCache) -> Passthrough | None:
    """The daemon's `Passthrough`, given to ``ops``; None where it is off (one line why,
    unless --no-passthrough)."""
    if config.passthrough is False:
        ops.passthrough_off = "--no-passthrough"
        return None
    why = unavailable(config)
    if why is not None:
        ops.passthrough_off = why
        level = logging.WARNING if config.passthrough else logging.INFO
        log.log(level, "passthrough off: %s; files are read through FUSE", why)
        return None
    p = Passthrough(
        cache,
        pyfuse3.passthrough_open,  # type: ignore[attr-defined,unused-ignore]
        pyfuse3.passthrough_close,  # type: ignore[attr-defined,unused-ignore]
        check_max=config.passthrough_check_max,
        asked=bool(config.passthrough),
    )
    ops.use_passthrough(p)
    log.info("passthrough on: files complete in the cache are read by the kernel")
    return p


def describe(config: MountConfig, ops: Operations) -> dict[str, object]:
    """For `status --json`: the setting (auto, on, off), whether it is in use, and why not."""
    if ops.passthrough is None:
        return {"setting": setting(config), "enabled": False, "why_off": ops.passthrough_off}
    return {"setting": setting(config), **ops.passthrough.describe()}

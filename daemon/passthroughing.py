"""Wiring of `fs.passthrough` (``--passthrough``): whether this daemon can use it.

It needs root (registering a backing file needs CAP_SYS_ADMIN), Linux >= 6.9
(FUSE passthrough), the patched pyfuse3 (`packaging/build-passthrough.sh`, run by
``./quickstart test``) and a read-only mount (an inode passed through cannot be
opened for writing: ETXTBSY). Otherwise one line says why, and files are read
through the FUSE path, CRC-checked, as without the setting.
"""

from __future__ import annotations

import logging
import os
import re

import pyfuse3

from s3cachefs.base.config import MountConfig
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.fs.operations import Operations
from s3cachefs.fs.passthrough import Passthrough

log = logging.getLogger(__name__)

KERNEL_MIN = (6, 9)


def unavailable(config: MountConfig, release: str | None = None) -> str | None:
    """Why ``--passthrough`` cannot be used here, or None if it can."""
    if config.writable:
        return "the mount is writable (--writable)"
    if os.geteuid() != 0:
        return "not root (registering a backing file needs CAP_SYS_ADMIN)"
    found = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    if found is None or (int(found[1]), int(found[2])) < KERNEL_MIN:
        return "Linux >= 6.9 needed"
    if not hasattr(pyfuse3, "passthrough_open"):
        return "pyfuse3 is not the patched build (packaging/build-passthrough.sh)"
    return None


def passthrough(config: MountConfig, ops: Operations, cache: BlockCache) -> Passthrough | None:
    """The daemon's `Passthrough`, given to ``ops``; None where it is off (one line where
    it was asked for)."""
    if not config.passthrough:
        return None
    why = unavailable(config)
    if why is not None:
        log.warning("passthrough off: %s; files are read through FUSE", why)
        return None
    p = Passthrough(
        cache,
        pyfuse3.passthrough_open,  # type: ignore[attr-defined,unused-ignore]
        pyfuse3.passthrough_close,  # type: ignore[attr-defined,unused-ignore]
        check_max=config.passthrough_check_max,
    )
    ops.use_passthrough(p)
    log.info("passthrough on: files complete in the cache are read by the kernel")
    return p

"""Wiring of `datasets.readserve` to the FUSE view: what it is offered.

The datasets layer sees nothing of `fs`; this adapter gives it each reading
handle's last close, offered only when the version it read is the one its name
means now (`closed`). No re-listing: read-serve needs ``--metadata-ttl
indefinite`` (`base.config`), under which the FUSE view never lists again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from s3cachefs.base.config import MountConfig
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets import overlay
from s3cachefs.datasets.pins import PinStore
from s3cachefs.datasets.readserve import ReadServe
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import FileHandle

log = logging.getLogger(__name__)


def read_serve(
    config: MountConfig, core: FsCore, cache: BlockCache, pins: PinStore
) -> ReadServe | None:
    """The daemon's `ReadServe`, wired to ``core``; None where it is off (one INFO line
    where overlays are what is missing)."""
    if not config.read_serve or config.writable or os.geteuid() != 0:
        return None
    why = overlay.unavailable()
    if why is not None:
        log.info("read-serve off: %s; files cached by reading are served through FUSE", why)
        return None
    serve = ReadServe(
        mountpoint=config.mountpoint,
        mount_prefix=config.prefix,
        cache=cache,
        pins=pins,
        enabled=True,
        allow_other=config.allow_other,
        verify_interval=config.verify_interval,
    )
    core.on_closed = closed(core, serve)
    return serve


def closed(core: FsCore, serve: ReadServe) -> Callable[[FileHandle], None]:
    def offer(handle: FileHandle) -> None:
        node = handle.node
        if handle.staged is not None or handle.writable or not handle.served or node.retired:
            return
        parent = core.tree.get(node.parent)
        current = parent is not None and (parent.children or {}).get(node.name) == node.ino
        if current and node.etag == handle.version.etag and not node.pinned:
            serve.offer(handle.version, node.mtime_ns)

    return offer

"""Wiring of `datasets.readserve` to the FUSE view: what it is offered, how it re-lists.

The datasets layer sees nothing of `fs`; this adapter gives it the two things
it needs: each reading handle's last close, offered only when the version it
read is the one its name means now (`closed`), and a directory's files as the
FUSE view lists them, listed again now (`lister`), so both paths agree on what
is current.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import S3CacheFSError
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.datasets import overlay
from s3cachefs.datasets.pins import PinStore
from s3cachefs.datasets.readserve import MIN_TTL, ReadServe
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import ROOT_INODE, FileHandle

log = logging.getLogger(__name__)


def read_serve(
    config: MountConfig, core: FsCore, cache: BlockCache, pins: PinStore
) -> ReadServe | None:
    """The daemon's `ReadServe`, wired to ``core``; None where it is off (one INFO line
    where overlays are what is missing)."""
    if not config.read_serve or config.writable or os.geteuid() != 0:
        return None
    why = overlay.unavailable()
    if config.metadata_ttl < MIN_TTL:
        why = f"--metadata-ttl {config.metadata_ttl:g} asks for a listing at every lookup"
    if why is not None:
        log.info("read-serve off: %s; files cached by reading are served through FUSE", why)
        return None
    serve = ReadServe(
        mountpoint=config.mountpoint,
        mount_prefix=config.prefix,
        cache=cache,
        pins=pins,
        enabled=True,
        metadata_ttl=config.metadata_ttl,
        lister=lister(core),
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


def lister(core: FsCore) -> Callable[[str], Awaitable[dict[str, str] | None]]:
    async def listed(rel_dir: str) -> dict[str, str] | None:
        tree = core.tree
        try:
            node = tree.node(ROOT_INODE)
            for name in filter(None, rel_dir.split("/")):
                child = await tree.lookup(node.ino, name)
                if child is None or not child.is_dir:
                    return {}
                node = child
            tree.relist(node)  # now, not when the FUSE view's listing runs out
            children = await tree.children(node)
        except S3CacheFSError as exc:  # S3 unreachable: as the FUSE view, keep the last
            log.info("read-serve: cannot list %r again: %s", rel_dir, exc)
            return None
        files = {}
        for name, ino in children.items():
            child = tree.get(ino)
            if child is not None and not child.is_dir:
                files[name] = child.etag
        return files

    return listed

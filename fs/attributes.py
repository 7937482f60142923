"""What the kernel is told about a name and about the filesystem: attributes and statfs.

- Modes: files 0444 and directories 0555 on a read-only mount; 0644 and 0755
  on a writable one, except inside a pinned dataset, which is never writable.
  The kernel checks them (``default_permissions``); everything is owned by the
  daemon's user.
- A directory has 2 links and a file 1 (no hard links in S3); sizes in 512-byte
  blocks are rounded up; atime, mtime and ctime are S3's Last-Modified.
- Entry and attribute timeouts are the tree's (`Tree.timeout`: the metadata
  TTL, or indefinite inside a pinned dataset).
- A missing name is a negative entry the kernel may cache for the metadata TTL:
  the listing that answered it is trusted as long.
- statfs: the cache's size and what is free in it, in cache blocks; no inode
  counts (S3 has none); names up to `MAX_NAME_BYTES`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.fs.nodes import Node
from s3cachefs.store.keys import MAX_NAME_BYTES

DIR_MODE = {False: 0o555, True: 0o755}  # writable -> permission bits
FILE_MODE = {False: 0o444, True: 0o644}


@dataclass(frozen=True)
class Attributes:
    """One directory entry as the kernel gets it; ``ino`` 0 is a negative entry."""

    ino: int
    mode: int  # type and permission bits
    nlink: int
    size: int
    blocks: int  # in 512-byte units
    block_size: int  # the preferred I/O size
    uid: int
    gid: int
    mtime_ns: int  # also atime and ctime
    timeout: float  # entry and attribute timeout, seconds


def attributes(
    node: Node, *, writable: bool, timeout: float, uid: int, gid: int, block_size: int
) -> Attributes:
    """``node``'s attributes; ``writable``: the mount takes writes and the node is not pinned."""
    if node.is_dir:
        mode, nlink = stat.S_IFDIR | DIR_MODE[writable], 2
    else:
        mode, nlink = stat.S_IFREG | FILE_MODE[writable], 1
    return Attributes(
        ino=node.ino,
        mode=mode,
        nlink=nlink,
        size=node.size,
        blocks=-(-node.size // 512),
        block_size=block_size,
        uid=uid,
        gid=gid,
        mtime_ns=node.mtime_ns,
        timeout=timeout,
    )


def negative(timeout: float) -> Attributes:
    """A missing name, which the kernel may remember for ``timeout`` seconds."""
    return Attributes(0, 0, 0, 0, 0, 0, 0, 0, 0, timeout)


@dataclass(frozen=True)
class FsStats:
    """statfs figures."""

    block_size: int
    blocks: int
    free_blocks: int  # for everybody: there is no reserve
    files: int = 0  # inodes: S3 has no such limit
    free_files: int = 0
    name_max: int = MAX_NAME_BYTES


def fs_stats(cache: BlockCache) -> FsStats:
    """The cache's size and free space, in its blocks."""
    free = max(0, cache.cache_size - cache.used_bytes)
    return FsStats(
        block_size=cache.block_size,
        blocks=cache.cache_size // cache.block_size,
        free_blocks=free // cache.block_size,
    )

"""The records of the filesystem core: a `Node` per inode, a handle per open file or directory.

Plain data, no behaviour: the tree (`fs.tree`), the handles (`fs.handles`),
the version rules (`fs.versions`) and the writes (`fs.writes`) all change
them, on the trio thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.staging.records import Staged

ROOT_INODE = 1


@dataclass
class Node:
    """A file (an object) or a directory (a prefix)."""

    ino: int
    parent: int
    name: str
    key: str  # object key, or the prefix ending in "/" for a directory
    is_dir: bool
    size: int = 0
    etag: str = ""
    mtime_ns: int = 0
    # directories: name -> inode, and when that listing was taken
    children: dict[str, int] | None = None
    listed_at: float | None = None
    # files: ETag of the last open, to tell the kernel whether its pages are still good
    opened_etag: str | None = None
    # files: the ETag the listing gave (``etag`` is the server's, see `fs.versions`)
    listed_etag: str = ""
    # files: the version whose bytes this inode returned (the kernel may cache them)
    served_etag: str | None = None
    retired: bool = False  # S3 holds another version: the name gets a new inode
    lookups: int = 0  # the kernel's lookup count of this inode
    handles: int = 0  # open file handles
    # inside a pinned dataset: answered from its manifest, never expires
    pinned: bool = False
    pin_generation: int = -1
    # a file being written through this mount: reads come from the staged bytes
    staged: Staged | None = None


@dataclass
class FileHandle:
    node: Node
    version: ObjectVersion
    next_offset: int = 0  # where a sequential reader reads next
    sequential_run: int = 0  # consecutive sequential reads, sizes the readahead window
    readahead_until: int = 0  # blocks before this one have been asked for ahead of the reader
    staged: Staged | None = None  # reading or writing a file being written
    writable: bool = False
    fd: int | None = None  # a reader's own descriptor of the staged data
    served: bool = False  # it returned bytes: it is never re-bound to another version


@dataclass
class DirHandle:
    ino: int
    entries: list[tuple[str, int]] = field(default_factory=list)

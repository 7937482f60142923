"""Property tests: block arithmetic, size parsing and key-to-name mapping."""

from __future__ import annotations

import itertools
import posixpath
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from s3cachefs.base.values import parse_size
from s3cachefs.cache.blockcache import BlockCache
from s3cachefs.cache.blocks import block_span, blocks_for_range
from s3cachefs.fs.core import FsCore
from s3cachefs.fs.nodes import ROOT_INODE
from s3cachefs.store.keys import MAX_NAME_BYTES, valid_name
from s3cachefs.testing.memorystore import MemoryStore

block_sizes = st.sampled_from([1 << 16, 1 << 20, 1 << 22])


@given(st.integers(0, 1 << 34), st.integers(0, 1 << 26), st.integers(0, 1 << 34), block_sizes)
def test_blocks_for_range_cover_exactly_the_requested_bytes(
    offset: int, length: int, size: int, block_size: int
) -> None:
    indices = blocks_for_range(offset, length, block_size, size)
    end = min(offset + length, size)
    if offset >= end:
        assert not indices
        return
    spans = [block_span(i, block_size, size) for i in indices]
    assert spans[0][0] <= offset < spans[0][1]
    assert spans[-1][0] < end <= spans[-1][1]
    for (_, a_end), (b_start, _) in itertools.pairwise(spans):
        assert a_end == b_start
    assert all(start < stop <= size for start, stop in spans)


@given(
    st.integers(0, 1 << 40),
    st.sampled_from(["", "K", "M", "G", "T"]),
    st.sampled_from(["", "B", "iB"]),
)
def test_parse_size_units(number: int, unit: str, suffix: str) -> None:
    text = f"{number}{unit}{suffix if unit else ''}"
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    assert parse_size(text) == number * factor
    assert parse_size(text.lower()) == number * factor


@given(st.text(max_size=300))
def test_valid_names_are_safe_single_path_components(segment: str) -> None:
    if valid_name(segment):
        assert "/" not in segment and "\0" not in segment
        assert segment not in ("", ".", "..")
        assert len(segment.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="ab./\0", min_size=1, max_size=8), min_size=1, max_size=8))
def test_crafted_keys_never_map_outside_the_mount(keys: list[str]) -> None:
    """List the tree the filesystem core builds from hostile keys: every entry is a safe
    name, no path climbs out of the mount, and every key of only safe segments shows up."""
    store = MemoryStore()
    for key in keys:
        store.put(key, b"x")
    limiter = trio.CapacityLimiter(1)
    cache = BlockCache(  # never opened: listing touches no cache
        Path("/nonexistent"),
        store,
        block_size=1 << 20,
        cache_size=1 << 30,
        min_free=0,
        memory_bytes=0,
        s3_limiter=limiter,
        disk_limiter=limiter,
    )
    core = FsCore(store, cache, prefix="", metadata_ttl=60, s3_limiter=limiter)
    seen: set[str] = set()

    async def walk(ino: int, path: str) -> None:
        fh = await core.opendir(ino)
        for name, node, _ in core.readdir(fh, 0):
            assert valid_name(name), name
            child = f"{path}/{name}"
            assert posixpath.normpath("/mnt" + child).startswith("/mnt/"), child
            if node.is_dir:
                await walk(node.ino, child)
            else:
                seen.add(child.lstrip("/"))
        core.releasedir(fh)

    trio.run(walk, ROOT_INODE, "")
    safe = {k for k in keys if all(valid_name(p) for p in k.split("/"))}
    prefixes = {k[:i] for k in keys for i, c in enumerate(k) if c == "/"}
    assert seen == safe - prefixes  # a key that is also a directory is hidden by it

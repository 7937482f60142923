"""Property tests: block arithmetic, size parsing and key-to-name mapping."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from s3cachefs.daemon.blockcache import block_span, blocks_for_range
from s3cachefs.daemon.config import parse_size
from s3cachefs.fs.names import MAX_NAME_BYTES, valid_name

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


@given(st.lists(st.text(alphabet="ab./\0", max_size=6), max_size=6))
def test_a_key_never_maps_outside_the_mount(parts: list[str]) -> None:
    """Walking a key segment by segment, skipping at the first invalid one, never climbs up."""
    key = "/".join(parts)
    depth = 0
    for segment in key.split("/"):
        if not valid_name(segment):
            break
        depth += 1
        assert segment != ".."
    assert depth >= 0

"""`store.crc.crc32`: zlib's CRC-32, value for value, whichever engine computes it.

The cache's block CRCs recorded by one engine are checked by another (a mount
without isal reads a cache written with it): any difference would turn every
cached block into a miss. zlib is the reference here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from s3cachefs.store import crc
from s3cachefs.store.crc import crc32


def test_isal_is_the_engine_in_use() -> None:
    """isal is a dependency (pyproject): missing here is a broken install, a failure, not a
    skip; zlib is the fallback only for a platform without an isal wheel."""
    import isal.isal_zlib

    assert crc.ENGINE == "isal"
    assert crc._crc32 is isal.isal_zlib.crc32


def test_empty_and_one_byte_and_a_start_value() -> None:
    assert crc32(b"") == zlib.crc32(b"") == 0
    assert crc32(b"", 12345) == zlib.crc32(b"", 12345) == 12345
    for byte in (b"\x00", b"\x01", b"a", b"\xff"):
        assert crc32(byte) == zlib.crc32(byte)
        assert crc32(byte, 0xFFFFFFFF) == zlib.crc32(byte, 0xFFFFFFFF)
    assert crc32(memoryview(b"")) == 0
    assert crc32(memoryview(b"xyz")[1:2]) == zlib.crc32(b"y")


def test_memoryview_slices_of_a_block_buffer() -> None:
    """As the bulk worker and the checks pass them: slices of one reused buffer."""
    buf = bytearray(os.urandom(1 << 20))
    view = memoryview(buf)
    for start, end in [(0, 1 << 20), (0, 1), (1, 2), (7, 65_543), (999_999, 1 << 20), (5, 5)]:
        piece = view[start:end]
        assert crc32(piece) == zlib.crc32(bytes(buf[start:end]))
    # Running: blocks fed in order give the whole buffer's CRC.
    value = 0
    for start in range(0, len(buf), 100_003):
        value = crc32(view[start : start + 100_003], value)
    assert value == zlib.crc32(buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 0xFFFFFFFF), st.integers(0, 5000))
def test_same_values_as_zlib(data: bytes, value: int, cut: int) -> None:
    assert crc32(data, value) == zlib.crc32(data, value)
    head, tail = data[:cut], memoryview(data)[cut:]
    assert crc32(tail, crc32(head)) == zlib.crc32(data)


def test_zlib_where_isal_is_missing() -> None:
    """The fallback: the same values from zlib when ``import isal`` fails."""
    code = (
        "import sys, zlib; sys.modules['isal'] = None\n"
        "from s3cachefs.store import crc\n"
        "data = bytes(range(256)) * 17\n"
        "assert crc._crc32 is zlib.crc32, crc._crc32\n"
        "print(crc.ENGINE, crc.crc32(data), crc.crc32(memoryview(data)[3:9], 7))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    data = bytes(range(256)) * 17
    assert out == ["zlib", str(zlib.crc32(data)), str(zlib.crc32(data[3:9], 7))]

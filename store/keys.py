"""Which S3 key segments can be file names, and the rules when they cannot.

S3 keys are arbitrary strings; a POSIX directory entry is not. A segment is
skipped (with a warning by the caller) when it is empty (``a//b``, or the
``dir/`` marker object), ``.`` or ``..``, contains NUL, or is longer than
255 bytes in UTF-8. Segments are taken from the key by splitting on ``/``, so
a name never contains a slash and a skipped segment hides everything below it:
no key can map to a path outside the mount.
"""

from __future__ import annotations

MAX_NAME_BYTES = 255


def valid_name(segment: str) -> bool:
    """True if ``segment`` can be shown as one directory entry."""
    if segment in ("", ".", "..") or "\0" in segment or "/" in segment:
        return False
    return len(segment.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES

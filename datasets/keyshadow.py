"""`Shadowed`: keys hidden by a directory of the same name, found as a listing streams by.

With ``a`` and ``a/b`` in S3, the FUSE view shows ``a`` as a directory (the
directory wins), so a reader can never open the key ``a`` as a file:
`prefetch` neither pins it nor lists it among the dataset's keys, as `sync`
does not write it (`datasets.dirplan`); each says so in one WARNING.

S3 lists keys in UTF-8 binary order: every ``a/...`` comes after ``a`` and
before any key from ``a0`` on, so a key is held back only while a later key
may still be under it (``a!``, ``a-x`` sort between ``a`` and ``a/``).
"""

from __future__ import annotations

import logging

from s3cachefs.store.types import ObjectInfo

log = logging.getLogger(__name__)
SHOWN = 5  # hidden keys named in the warning


class Shadowed:
    """Feed each page's file keys (no directory markers) in listing order; get back those
    known to be files so far, then the rest from `flush`. ``hidden``: the keys dropped."""

    def __init__(self) -> None:
        self._held: list[ObjectInfo] = []
        self.hidden: list[str] = []

    def feed(self, files: list[ObjectInfo]) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for info in files:
            held: list[ObjectInfo] = []
            for h in self._held:
                if info.key.startswith(h.key + "/"):
                    self.hidden.append(h.key)
                elif info.key < h.key + "/":
                    held.append(h)  # a key under h may still come
                else:
                    out.append(h)  # past every key under h
            self._held = [*held, info]
        return out

    def flush(self) -> list[ObjectInfo]:
        """The keys held at the end of the listing: files, all of them."""
        out, self._held = self._held, []
        return out

    def warn(self, who: str, prefix: str) -> int:
        """One WARNING naming the first hidden keys, if any; how many were hidden."""
        if self.hidden:
            log.warning(
                "%s skipped %d keys under %s that are also a directory (the directory wins): %s",
                who,
                len(self.hidden),
                prefix or "the bucket",
                ", ".join(self.hidden[:SHOWN]),
            )
        return len(self.hidden)

"""End-to-end object checks: what a check is (`Check`), and whether the bytes are it (`Digest`).

Block CRCs (`cache.blockcache`) protect the cache's own copy; they are computed
from the bytes as they arrived, so they cannot catch bytes that were already
wrong on the wire. The whole object is therefore checked once more against a
digest S3 computed from what it stored. The kinds of check, in order of
preference (which one S3 offers for an object is `store.checkplan`):

- ``md5``: a single-part ETag is the MD5 of the content (no request needed).
- ``<algo>-full`` / ``<algo>-composite``: an S3 additional checksum (HEAD with
  ``ChecksumMode=ENABLED``; algo is crc32, crc32c, crc64nvme, sha1 or sha256).
  Full-object: the digest of the whole content. Composite (``value-N``): the
  digest of the concatenated per-part digests, which needs the part layout.
- ``mpu-etag``: a multipart ETag is the MD5 of the concatenated part MD5s plus
  ``-N``, checkable once the part sizes are known. ``HEAD ?partNumber=1`` gives
  the first part's size and the part count; parts are assumed equal except the
  last (what every uploader does), and if that does not match, each part is
  HEADed before the object is declared bad.
- ``<algo>-either``: a multipart object's checksum whose HEAD says neither its
  type nor a ``-N`` suffix (moto, for uploads that declared no type): the
  full-object and the composite digest over the part layout are both computed
  in the one read, and the object passes if either is S3's value.
- ``size``: none of the above (no checksum, a non-MD5 ETag, a server that does
  not answer part HEADs). Only the size and the block CRCs were checked; status
  and prefetch say so, and ``prefetch --require-checksums`` refuses the object.
- ``local-md5``: only in manifests written before these checks existed: the MD5
  of what was pinned, recorded by this cache, not by S3 (not end to end).

Digests run in worker threads over the cached file; hashlib, `store.crc` and awscrt
release the GIL on large buffers. awscrt (CRC32C, CRC64NVME) is imported on
first use: the bulk worker process imports this module and starts without it.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from s3cachefs.store.crc import crc32

if TYPE_CHECKING:
    from collections.abc import Callable


ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
# Kinds that compare against a digest S3 computed: the rest are not end to end.
NOT_END_TO_END = ("size", "local-md5")


@dataclass(frozen=True)
class Check:
    """What an object's bytes must digest to, and how (see the module docstring)."""

    kind: str
    value: str = ""  # hex for md5/mpu-etag/local-md5, base64 (no "-N") for S3 checksums
    parts: tuple[int, ...] = ()  # part sizes, for composite checksums and mpu-etag
    guessed: bool = False  # parts assumed equal but the last; not yet confirmed by S3

    @property
    def end_to_end(self) -> bool:
        return self.kind not in NOT_END_TO_END

    @property
    def algorithm(self) -> str:
        return self.kind.split("-")[0]

    def describe(self) -> str:
        """What was checked, for messages: "its CRC64NVME checksum"."""
        if self.kind == "md5":
            return "its ETag (MD5)"
        if self.kind == "mpu-etag":
            return f"its multipart ETag ({len(self.parts)} parts)"
        if self.kind.endswith("-composite"):
            return f"its {self.algorithm.upper()} checksum ({len(self.parts)} parts)"
        if self.kind.endswith(("-full", "-either")):
            either = f" (full-object or over {len(self.parts)} parts)"
            return f"its {self.algorithm.upper()} checksum{either if self.parts else ''}"
        if self.kind == "local-md5":
            return "the MD5 recorded when it was pinned"
        return "its size"

    def encode(self) -> list[Any]:
        """For the manifest: [kind, value, [[part size, count], ...]] (runs of equal parts)."""
        runs: list[list[int]] = []
        for size in self.parts:
            if runs and runs[-1][0] == size:
                runs[-1][1] += 1
            else:
                runs.append([size, 1])
        return [self.kind, self.value, runs]

    @classmethod
    def decode(cls, data: Any) -> Check:
        kind, value, runs = data
        parts = tuple(int(size) for size, count in runs for _ in range(int(count)))
        return cls(str(kind), str(value), parts)


# ---- digests over the bytes ------------------------------------------------


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A CRC with hashlib's interface: ``fn(data, previous) -> int``, big-endian digest."""

    def __init__(self, fn: Callable[[Any, int], int], width: int) -> None:
        self._fn, self._width, self._value = fn, width, 0

    def update(self, data: bytes | memoryview, /) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


def _crt() -> Any:
    """awscrt's checksums, imported here: ~80 ms to import, only where a CRC needs it."""
    from awscrt import checksums

    return checksums


def new_hasher(algorithm: str) -> _Hasher:
    """A running digest for ``algorithm`` (md5 or one of `ALGORITHMS`)."""
    if algorithm == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algorithm == "sha1":
        return hashlib.sha1(usedforsecurity=False)
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "crc32":
        return _Crc(crc32, 4)
    if algorithm == "crc32c":
        return _Crc(_crt().crc32c, 4)
    if algorithm == "crc64nvme":
        return _Crc(_crt().crc64nvme, 8)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def crc64nvme(data: bytes, previous: int = 0) -> int:
    """CRC64NVME (S3's default additional checksum), at C speed."""
    return int(_crt().crc64nvme(data, previous))


def combine_crc64nvme(first: int, second: int, second_length: int) -> int:
    """The CRC64NVME of two pieces back to back, from theirs (multipart uploads)."""
    return int(_crt().combine_crc64nvme(first, second, second_length))


def b64(digest: bytes | int, width: int = 8) -> str:
    """S3's encoding of a checksum: base64 of the big-endian digest."""
    raw = digest.to_bytes(width, "big") if isinstance(digest, int) else digest
    return base64.b64encode(raw).decode()


class Digest:
    """The digest of an object's bytes, fed in order, in the terms of one `Check`.

    Not thread-safe; used by one worker thread at a time.
    """

    def __init__(self, check: Check) -> None:
        self.check = check
        self.fed = 0
        self._whole: _Hasher | None = None
        self._part: _Hasher | None = None
        self._part_digests: list[bytes] = []
        self._part_left = 0
        self._next_part = 0
        kind = check.kind
        # "-either": the whole and the parts, both from the one read.
        if kind in ("md5", "local-md5") or kind.endswith(("-full", "-either")):
            self._whole = new_hasher("md5" if "md5" in kind else check.algorithm)
        if kind == "mpu-etag" or kind.endswith(("-composite", "-either")):
            self._part_algorithm = "md5" if kind == "mpu-etag" else check.algorithm
            self._start_part()

    def _start_part(self) -> None:
        while self._next_part < len(self.check.parts):
            self._part_left = self.check.parts[self._next_part]
            self._next_part += 1
            self._part = new_hasher(self._part_algorithm)
            if self._part_left:
                return
            self._part_digests.append(self._part.digest())  # an empty part
        self._part = None

    def update(self, data: bytes) -> None:
        self.fed += len(data)
        if self._whole is not None:
            self._whole.update(data)
        view = memoryview(data)
        while view and self._part is not None:
            piece = view[: self._part_left]
            self._part.update(piece)
            self._part_left -= len(piece)
            view = view[len(piece) :]
            if self._part_left == 0:
                self._part_digests.append(self._part.digest())
                self._start_part()

    def result(self) -> str:
        """What the bytes fed digest to, encoded like `Check.value` ("" for a size check).

        For "-either": the full-object digest, a space, the composite one.
        """
        kind = self.check.kind
        if kind.endswith("-either"):
            return f"{self._whole_result()} {self._composite_result()}"
        if self._whole is not None:
            return self._whole_result()
        if kind == "mpu-etag":
            md5 = hashlib.md5(b"".join(self._part_digests), usedforsecurity=False)
            return f"{md5.hexdigest()}-{len(self._part_digests)}"
        if kind.endswith("-composite"):
            return self._composite_result()
        return ""

    def _whole_result(self) -> str:
        assert self._whole is not None
        raw = self._whole.digest()
        return raw.hex() if "md5" in self.check.kind else b64(raw)

    def _composite_result(self) -> str:
        combined = new_hasher(self.check.algorithm)
        combined.update(b"".join(self._part_digests))
        return b64(combined.digest())

    def _layout_fed(self) -> bool:
        """Every byte fed, in the part layout expected."""
        parts = self.check.parts
        return self.fed == sum(parts) and len(self._part_digests) == len(parts)

    def matches(self) -> bool:
        """Every byte fed, in the layout expected, and the digest is S3's."""
        if self.check.kind.endswith("-either"):
            whole, _, composite = self.result().partition(" ")
            return self.check.value in (whole, composite if self._layout_fed() else None)
        if self.check.parts and not self._layout_fed():
            return False
        return self.result() == self.check.value


def resolved(check: Check, result: str) -> Check:
    """An "-either" check that matched, as the one of its two that did (else ``check``)."""
    if not check.kind.endswith("-either"):
        return check
    whole = result.partition(" ")[0]
    if whole == check.value:
        return Check(f"{check.algorithm}-full", check.value)
    return Check(f"{check.algorithm}-composite", check.value, check.parts)

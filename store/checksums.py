"""End-to-end object checks: what S3 says an object is, and whether the cached bytes are it.

Block CRCs (`daemon.blockcache`) protect the cache's own copy; they are computed
from the bytes as they arrived, so they cannot catch bytes that were already
wrong on the wire. The whole object is therefore checked once more against a
digest S3 computed from what it stored. In order of preference:

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

A single-part object with an MD5 ETag is checked by MD5 even when it also has
an additional checksum: both are S3's digest of the stored bytes, and MD5 costs
no HEAD per object (datasets of many small files). Should the MD5 check fail,
the object is asked for an additional checksum (SSE-KMS ETags look like MD5s
but are not). Without one, it is size-checked only when S3 says the ETag is no
MD5 (SSE-KMS, SSE-C) or the mount has ``--etag-md5 off``; otherwise it fails
(a server or proxy that corrupts the same way every time looks just the same).

What moto 5.2 (the test server) supports, found by experiment (with awscrt):
PutObject/UploadPart with ChecksumAlgorithm CRC32, CRC32C, SHA1, SHA256,
CRC64NVME: stored as the client sent them (not re-checked). CreateMultipartUpload
ChecksumType FULL_OBJECT and COMPOSITE: both, computed by moto at completion;
but moto computes CRC32C with the optional ``crc32c`` package and otherwise
stores a plain CRC32 labelled CRC32C (wrong), and CRC64NVME only with awscrt.
HEAD/GET with ChecksumMode=ENABLED: x-amz-checksum-<algo> on both;
x-amz-checksum-type on GET, and on HEAD only for uploads that declared a type;
a composite value has its ``-N`` suffix on GET but not on HEAD. HEAD with
PartNumber: the part's Content-Length and x-amz-mp-parts-count (its ETag is the
part's, unlike AWS, so If-Match cannot be combined with it).
GetObjectAttributes: Checksum yes, ObjectParts no. A multipart upload that
declared no algorithm has no checksum at all.

Digests run in worker threads over the cached file; hashlib, zlib and awscrt
release the GIL on large buffers.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from awscrt import checksums as crt

from s3cachefs.base.errors import (
    AccessDeniedError,
    CredentialsError,
    NotFoundError,
    StaleError,
    StoreError,
    TransientError,
)
from s3cachefs.store.responses import etag_md5

if TYPE_CHECKING:
    from collections.abc import Callable

    from s3cachefs.store.types import ChecksumHead, ObjectInfo, ObjectStore

_MULTIPART_ETAG = re.compile(r'^"?([0-9a-f]{32})-([0-9]+)"?$')
ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
# Kinds that compare against a digest S3 computed: the rest are not end to end.
NOT_END_TO_END = ("size", "local-md5")


def multipart_parts(etag: str) -> int | None:
    """The part count of a multipart ETag (``"<md5 of part md5s>-N"``), else None."""
    match = _MULTIPART_ETAG.match(etag)
    return int(match.group(2)) if match else None


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


def new_hasher(algorithm: str) -> _Hasher:
    """A running digest for ``algorithm`` (md5 or one of `ALGORITHMS`)."""
    if algorithm == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algorithm == "sha1":
        return hashlib.sha1(usedforsecurity=False)
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "crc32":
        return _Crc(zlib.crc32, 4)
    if algorithm == "crc32c":
        return _Crc(crt.crc32c, 4)
    if algorithm == "crc64nvme":
        return _Crc(crt.crc64nvme, 8)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def crc64nvme(data: bytes, previous: int = 0) -> int:
    """CRC64NVME (S3's default additional checksum), at C speed."""
    return int(crt.crc64nvme(data, previous))


def combine_crc64nvme(first: int, second: int, second_length: int) -> int:
    """The CRC64NVME of two pieces back to back, from theirs (multipart uploads)."""
    return int(crt.combine_crc64nvme(first, second, second_length))


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


# ---- what S3 says: the check for one object ---------------------------------


def plan(
    store: ObjectStore, info: ObjectInfo, *, ask_s3: bool = False, etag_md5s: bool = True
) -> Check:
    """The best check S3 offers for this object version (blocking: HEADs; StoreError).

    Without ``ask_s3`` an MD5 ETag is taken as it is (no request). With it (an MD5
    check that failed, or ``--etag-md5 off``), S3's additional checksum comes first;
    then a 32-hex ETag is still an MD5 unless S3 says it is not (SSE-KMS, SSE-C) or
    ``etag_md5s`` is False (``--etag-md5 off``); else the object is size-checked only.
    """
    md5 = etag_md5(info.etag)
    if md5 is not None and not ask_s3:
        return Check("md5", md5)
    head = _checksum_head(store, info)
    count = multipart_parts(info.etag)
    if head is not None and head.algorithm and head.value:
        check = _by_checksum(store, info, head.algorithm, head.value, head.checksum_type)
        if check is not None:
            return check
    if count is not None:
        layout = part_layout(store, info, count)
        if layout is not None:
            return Check("mpu-etag", info.etag.strip('"'), *layout)
    if md5 is not None and etag_md5s and not (head is not None and head.etag_not_md5):
        return Check("md5", md5)  # S3 does not say otherwise: the MD5 it is
    return Check("size")


def _by_checksum(
    store: ObjectStore, info: ObjectInfo, algorithm: str, value: str, checksum_type: str | None
) -> Check | None:
    """The check by S3's additional checksum; None if a composite one has no part layout."""
    value, _, suffix = value.partition("-")
    count = multipart_parts(info.etag)
    composite = checksum_type == "COMPOSITE" or (checksum_type is None and bool(suffix))
    # A multipart object's checksum of unknown type (S3 has no composite CRC64NVME).
    either = checksum_type is None and not suffix and count is not None
    either = either and algorithm != "crc64nvme"
    if not composite and not either:
        return Check(f"{algorithm}-full", value)
    layout = part_layout(store, info, int(suffix) if suffix.isdigit() else count)
    if layout is not None:
        return Check(f"{algorithm}-{'either' if either else 'composite'}", value, *layout)
    return Check(f"{algorithm}-full", value) if either else None  # no layout: full it can be


def _checksum_head(store: ObjectStore, info: ObjectInfo) -> ChecksumHead | None:
    """S3's additional checksum (`StaleError` if the object changed); None if refused.

    A server without checksums may refuse the ChecksumMode header itself
    (Backblaze B2: 400 InvalidArgument): the object has none, the ETag may still do.
    """
    try:
        return store.head_checksum(info.key, info.etag)
    except (TransientError, NotFoundError, AccessDeniedError, StaleError):
        raise
    except StoreError:
        return None


def part_layout(
    store: ObjectStore, info: ObjectInfo, count: int | None
) -> tuple[tuple[int, ...], bool] | None:
    """(part sizes, guessed) from ``HEAD ?partNumber=1``; None if the server does not say.

    Guessed: every part the size of the first but the last, which holds the rest.
    When that cannot add up, every part is asked (`exact_layout`).
    """
    first = _part(store, info.key, 1)
    if first is None:
        return None
    size, total = first
    if count is not None and total != count:
        return None  # the server's part count is not the ETag's: not this layout
    last = info.size - size * (total - 1)
    if total == 1:
        return ((info.size,), False) if size == info.size else None
    if 0 < last <= size:
        return (size,) * (total - 1) + (last,), True
    exact = exact_layout(store, info, total)
    return None if exact is None else (exact, False)


def exact_layout(store: ObjectStore, info: ObjectInfo, count: int) -> tuple[int, ...] | None:
    """Every part's size, one ``HEAD ?partNumber=N`` each; None if they do not add up."""
    sizes = []
    for number in range(1, count + 1):
        part = _part(store, info.key, number)
        if part is None:
            return None
        sizes.append(part[0])
    return tuple(sizes) if sum(sizes) == info.size else None


def confirmed(store: ObjectStore, info: ObjectInfo, check: Check) -> Check:
    """A guessed layout asked part by part: the check with the layout S3 gives.

    The guess stands (no longer marked guessed) when S3 does not say otherwise.
    """
    exact = exact_layout(store, info, len(check.parts)) if check.guessed else None
    return replace(check, parts=exact or check.parts, guessed=False)


def _part(store: ObjectStore, key: str, number: int) -> tuple[int, int] | None:
    """(size, part count) of one part; None when the server does not do part HEADs."""
    try:
        part = store.head_part(key, number)
    except (TransientError, NotFoundError, CredentialsError):
        raise
    except StoreError:  # e.g. 400/501 from a server without partNumber, 416 past the last
        return None
    if part.parts_count is None:  # the server ignored partNumber: the whole object's HEAD
        return None
    return part.size, part.parts_count

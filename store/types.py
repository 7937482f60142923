"""What every object store is: the `ObjectStore` protocol and the types it speaks.

`S3Store` (`store.s3`) implements it over boto3; the in-memory fake
(`s3cachefs.testing.memorystore`) implements it for tests. The cache, the
filesystem, datasets and staging depend on this module, not on either store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """One object version as a listing or HEAD saw it."""

    key: str
    size: int
    etag: str
    mtime_ns: int


@dataclass(frozen=True)
class ChecksumHead:
    """What ``HEAD`` with ``ChecksumMode=ENABLED`` says of one object version."""

    algorithm: str | None  # "crc32", "crc32c", "crc64nvme", "sha1", "sha256"; None: no checksum
    value: str | None  # base64, as S3 gives it (some servers append "-N" to a composite one)
    checksum_type: str | None  # "FULL_OBJECT", "COMPOSITE", or None when not said
    # S3 says the ETag is not the MD5 of the bytes: SSE-KMS (or DSSE) or SSE-C encryption.
    etag_not_md5: bool = False


@dataclass(frozen=True)
class PartHead:
    """What ``HEAD ?partNumber=N`` says: the part's size and the object's part count."""

    size: int
    parts_count: int | None  # None: the server ignored partNumber (whole-object answer)


# The checksum this tool's uploads carry (`put_object`, multipart FULL_OBJECT): S3's own
# default since 2024, one value for the whole object whatever its parts, and moto keeps it.
UPLOAD_CHECKSUM: Final = "CRC64NVME"


@dataclass
class Listing:
    """One directory level: objects directly under a prefix, and sub-prefixes."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)


class ObjectStore(Protocol):
    """What the cache and the filesystem need from S3."""

    @property
    def bucket(self) -> str: ...

    @property
    def requests(self) -> Counter[str]:
        """Requests sent so far, by operation (``get``, ``list``, ``head``).

        Live: worker threads count into it. Read one count from it; take a copy
        (to iterate, sum or subtract) with `request_counts`.
        """
        ...

    def request_counts(self) -> Counter[str]:
        """A copy of `requests`, taken under the lock the worker threads count under."""
        ...

    def check_bucket(self) -> None: ...

    def list_dir(self, prefix: str) -> Listing:
        """All objects and sub-prefixes directly under ``prefix`` (every page)."""
        ...

    def list_tree(self, prefix: str) -> Iterator[list[ObjectInfo]]:
        """Every object under ``prefix`` at any depth, one page (up to 1,000) at a time."""
        ...

    def head(self, key: str) -> ObjectInfo: ...

    def head_checksum(self, key: str, etag: str) -> ChecksumHead:
        """The additional checksum of version ``etag`` (`StaleError` if it changed)."""
        ...

    def head_part(self, key: str, number: int) -> PartHead:
        """Part ``number`` (from 1) of ``key``: its size and the part count."""
        ...

    def iter_range(
        self,
        key: str,
        etag: str,
        start: int,
        end: int,
        chunk: int,
        first: int = 0,
        *,
        size: int,
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of version ``etag`` of ``key``, in ``chunk``-sized pieces.

        One ranged GET, conditional on the ETag (`StaleError` if the object
        changed); ``size`` is the version's size, which the response must
        confirm (`store.responses`). Each piece is yielded as soon as it has
        arrived, so the first block of a long GET is served before the last one
        is in; a GET of a whole single-part object yields nothing before the
        body matched its MD5 ETag. With ``first``, the first chunk comes as two
        pieces, ``first`` bytes and the rest (`piece_size`): a cold reader of
        the start is served sooner.
        """
        ...

    # Writes (writable mounts). ``create_only`` sends If-None-Match: * so that a
    # key someone else created meanwhile is never replaced (`AlreadyExistsError`).

    # Every write carries Content-MD5 and a CRC64NVME that S3 checks and keeps
    # (``crc64nvme`` of ``data``, computed here if not given), so what this tool
    # writes is end-to-end verifiable by `store.checksums` later. A server that
    # refuses the CRC (`store.uploadchecksums`) gets Content-MD5 only: `put_object`
    # falls back by itself; a multipart upload raises `ChecksumsRefusedError` and its
    # caller starts it again with ``with_checksums=False``.

    @property
    def sends_checksums(self) -> bool:
        """False once the server refused additional checksums (a multipart upload's choice)."""
        ...

    def checksums_refused(self, reason: str) -> None:
        """An upload refused for its checksums succeeded without: none from now on (WARNING)."""
        ...

    def put_object(
        self, key: str, data: bytes, *, create_only: bool, crc64nvme: int | None = None
    ) -> str:
        """Store ``data`` as ``key`` in one PUT; returns the new ETag."""
        ...

    def create_multipart(self, key: str, *, with_checksums: bool = True) -> str:
        """Start a multipart upload (full-object CRC64NVME, or none); returns its upload id."""
        ...

    def upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        data: bytes,
        *,
        crc64nvme: int | None = None,
        with_checksums: bool = True,
    ) -> str:
        """Upload part ``number`` (from 1); returns the part's ETag."""
        ...

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        etags: list[str],
        *,
        create_only: bool,
        part_crcs: list[int] | None = None,
        crc64nvme: int | None = None,
    ) -> str:
        """Make the parts one object; returns its ETag.

        ``part_crcs`` (each part's CRC64NVME) and ``crc64nvme`` (the whole
        object's) let S3 check the assembled object against what was sent
        (none given: an upload started without checksums).
        """
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    def delete_object(self, key: str) -> None: ...

"""The in-memory `ObjectStore`: no network, exact request counters, injectable faults.

Test support only (the runtime path never imports `s3cachefs.testing`). It
behaves as S3 does where the core relies on it: conditional GETs (`StaleError`
with the current ETag), size checks, part layouts and additional checksums,
create-only writes, and servers that refuse checksum headers.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

from s3cachefs.base.errors import (
    AlreadyExistsError,
    BadResponseError,
    ChecksumsRefusedError,
    NotFoundError,
    StaleError,
    StoreError,
)
from s3cachefs.store import checksums
from s3cachefs.store.bodies import piece_size
from s3cachefs.store.types import ChecksumHead, Listing, ObjectInfo, PartHead
from s3cachefs.store.uploadchecksums import ChecksumSupport


class MemoryStore:
    """An in-process `ObjectStore` for unit tests of the core: no network, exact counters.

    ``fail_next`` makes the next N GETs raise the given error (fault injection by
    wrapping the interface, not by patching boto3).
    """

    def __init__(self, bucket: str = "mem") -> None:
        self._bucket = bucket
        self._objects: dict[str, tuple[bytes, str, int]] = {}
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self.get_delay = 0.0
        self.fail_next: list[StoreError] = []
        self.fail_puts: list[StoreError] = []  # the next N writes raise these
        self._uploads: dict[str, dict[int, bytes]] = {}
        self._part_md5s: dict[str, list[str]] = {}
        # Per key: the part sizes of a multipart object, and its additional checksum.
        self._layouts: dict[str, list[int]] = {}
        self._checksums: dict[str, ChecksumHead] = {}
        self.part_heads = True  # False: a server that ignores partNumber
        # Requests whose checksum headers the server refuses: "put", "create", "part",
        # "complete", and "head" (ChecksumMode, as Backblaze B2 does).
        self.refuse_checksums: set[str] = set()
        self._support = ChecksumSupport(bucket)
        self._plain_uploads: set[str] = set()  # multipart uploads started without checksums

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def sends_checksums(self) -> bool:
        return self._support.sends

    def checksums_refused(self, reason: str) -> None:
        self._support.refused(reason)

    def _refuse(self, step: str, key: str) -> None:
        if step in self.refuse_checksums:
            raise ChecksumsRefusedError(f"{key}: InvalidArgument: Unsupported checksum header")

    @property
    def requests(self) -> Counter[str]:
        return self._requests

    def request_counts(self) -> Counter[str]:
        # The first request of a new kind adds a key: a copy racing it, unlocked, could
        # fail with "dictionary changed size during iteration".
        with self._lock:
            return self._requests.copy()

    def put(
        self, key: str, data: bytes, mtime_ns: int = 1_700_000_000 * 10**9, *, kms: bool = False
    ) -> str:
        """A single-part object with no additional checksum (a test's upload).

        ``kms``: encrypted with SSE-KMS, so its 32-hex ETag is not the MD5 of the bytes.
        """
        md5 = hashlib.md5((b"kms:" if kms else b"") + data, usedforsecurity=False)
        etag = f'"{md5.hexdigest()}"'
        with self._lock:
            self._objects[key] = (data, etag, mtime_ns)
            self._layouts.pop(key, None)
            self._checksums.pop(key, None)
            if kms:
                self._checksums[key] = ChecksumHead(None, None, None, etag_not_md5=True)
        return etag

    def put_parts(
        self, key: str, parts: list[bytes], checksum: str | None = None, full: bool = False
    ) -> str:
        """A multipart object, with S3's ``checksum`` algorithm, composite (or ``full``)."""
        data = b"".join(parts)
        digests = b"".join(hashlib.md5(p, usedforsecurity=False).digest() for p in parts)
        etag = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'
        with self._lock:
            self._objects[key] = (data, etag, time.time_ns())
            self._layouts[key] = [len(p) for p in parts]
            self._checksums.pop(key, None)
        if checksum is not None:
            layout = () if full else tuple(len(p) for p in parts)
            kind = f"{checksum}-{'full' if full else 'composite'}"
            digest = checksums.Digest(checksums.Check(kind, parts=layout))
            digest.update(data)
            value = digest.result() + ("" if full else f"-{len(parts)}")
            head = ChecksumHead(checksum, value, "FULL_OBJECT" if full else "COMPOSITE")
            with self._lock:
                self._checksums[key] = head
        return etag

    def delete(self, key: str) -> None:
        with self._lock:
            del self._objects[key]
            self._layouts.pop(key, None)
            self._checksums.pop(key, None)

    def _count(self, op: str) -> None:
        with self._lock:
            self._requests[op] += 1

    def check_bucket(self) -> None:
        self._count("head_bucket")

    def list_dir(self, prefix: str) -> Listing:
        self._count("list")
        listing = Listing()
        seen: set[str] = set()
        with self._lock:
            items = sorted(self._objects.items())
        for key, (data, etag, mtime) in items:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            head, sep, _ = rest.partition("/")
            if sep:
                sub = prefix + head + "/"
                if sub not in seen:
                    seen.add(sub)
                    listing.prefixes.append(sub)
            else:
                listing.objects.append(ObjectInfo(key, len(data), etag, mtime))
        return listing

    def list_tree(self, prefix: str) -> Iterator[list[ObjectInfo]]:
        with self._lock:
            items = sorted(self._objects.items())
        found = [
            ObjectInfo(key, len(data), etag, mtime)
            for key, (data, etag, mtime) in items
            if key.startswith(prefix)
        ]
        for start in range(0, max(1, len(found)), 1000):
            self._count("list")
            yield found[start : start + 1000]

    def head(self, key: str) -> ObjectInfo:
        self._count("head")
        with self._lock:
            if key not in self._objects:
                raise NotFoundError(f"{key}: not found")
            data, etag, mtime = self._objects[key]
        return ObjectInfo(key, len(data), etag, mtime)

    def head_checksum(self, key: str, etag: str) -> ChecksumHead:
        if "head" in self.refuse_checksums:  # HEAD with ChecksumMode: no body, a bare 400
            self._count("head")
            raise StoreError(f"{key}: S3 error 400")
        if self.head(key).etag != etag:
            raise StaleError(f"{key}: changed in S3 since it was opened")
        with self._lock:
            return self._checksums.get(key, ChecksumHead(None, None, None))

    def head_part(self, key: str, number: int) -> PartHead:
        info = self.head(key)
        with self._lock:
            layout = self._layouts.get(key, [info.size])
        if not self.part_heads:
            return PartHead(info.size, None)
        if not 1 <= number <= len(layout):
            raise StoreError(f"{key}: S3 error InvalidPartNumber")
        return PartHead(layout[number - 1], len(layout) if key in self._layouts else None)

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
        self._count("get")
        if self.get_delay:
            time.sleep(self.get_delay)
        with self._lock:
            if self.fail_next:
                raise self.fail_next.pop(0)
            if key not in self._objects:
                raise NotFoundError(f"{key}: not found")
            data, current, _ = self._objects[key]
        if current != etag:
            raise StaleError(f"{key}: changed in S3 since it was opened", current_etag=current)
        if size != len(data):  # as S3Store's response check would find
            raise BadResponseError(key, "size_mismatch", f"the object has {len(data)} bytes")
        pos = start
        while pos < end:
            size = min(piece_size(pos - start, chunk, first), end - pos)
            yield data[pos : pos + size]
            pos += size

    def _write(
        self,
        key: str,
        data: bytes,
        create_only: bool,
        crc: int | None,
        parts: list[int] | None = None,
    ) -> str:
        with self._lock:
            if self.fail_puts:
                raise self.fail_puts.pop(0)
            if create_only and key in self._objects:
                raise AlreadyExistsError(f"{key}: already exists")
        if crc is not None and crc != checksums.crc64nvme(data):  # S3 refuses an altered body
            raise StoreError(f"{key}: S3 error BadDigest")
        etag = self.put(key, data, time.time_ns())
        if parts is not None:
            with self._lock:
                digests = b"".join(bytes.fromhex(e) for e in self._part_md5s.pop(key))
                etag = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'
                self._objects[key] = (data, etag, time.time_ns())
                self._layouts[key] = parts
        if crc is not None:
            with self._lock:
                self._checksums[key] = ChecksumHead("crc64nvme", checksums.b64(crc), "FULL_OBJECT")
        return etag

    def put_object(
        self, key: str, data: bytes, *, create_only: bool, crc64nvme: int | None = None
    ) -> str:
        def send(with_checksums: bool) -> str:
            self._count("put")
            if not with_checksums:
                return self._write(key, data, create_only, None)
            self._refuse("put", key)
            crc = checksums.crc64nvme(data) if crc64nvme is None else crc64nvme
            return self._write(key, data, create_only, crc)

        return self._support.put(send)

    def create_multipart(self, key: str, *, with_checksums: bool = True) -> str:
        self._count("multipart")
        if with_checksums:
            self._refuse("create", key)
        upload_id = f"up{len(self._uploads) + 1}"
        self._uploads[upload_id] = {}
        if not with_checksums:
            self._plain_uploads.add(upload_id)
        return upload_id

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
        self._count("put_part")
        if with_checksums:
            self._refuse("part", key)
        with self._lock:
            if self.fail_puts:
                raise self.fail_puts.pop(0)
            if upload_id not in self._uploads:
                raise StoreError(f"{key}: S3 error NoSuchUpload")
            if with_checksums == (upload_id in self._plain_uploads):  # all parts alike
                raise StoreError(f"{key}: S3 error InvalidRequest (checksums of part {number})")
            if with_checksums and crc64nvme is not None and crc64nvme != checksums.crc64nvme(data):
                raise StoreError(f"{key}: S3 error BadDigest")
            self._uploads[upload_id][number] = data
        return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'

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
        self._count("multipart")
        plain = upload_id in self._plain_uploads
        if part_crcs or crc64nvme is not None:
            if plain:
                raise StoreError(f"{key}: S3 error InvalidRequest (checksums of a plain upload)")
            self._refuse("complete", key)
        with self._lock:
            if create_only and key in self._objects:  # S3 keeps the upload: it can be aborted
                raise AlreadyExistsError(f"{key}: already exists")
            parts = self._uploads.pop(upload_id)
            self._plain_uploads.discard(upload_id)
            self._part_md5s[key] = [e.strip('"') for e in etags]
        data = b"".join(parts[n] for n in range(1, len(etags) + 1))
        crc: int | None = None  # S3 computes a full-object one for an upload that declared it
        if not plain:
            crc = checksums.crc64nvme(data) if crc64nvme is None else crc64nvme
        sizes = [len(parts[n]) for n in range(1, len(etags) + 1)]
        return self._write(key, data, create_only, crc, sizes)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._count("multipart")
        self._uploads.pop(upload_id, None)
        self._plain_uploads.discard(upload_id)

    def delete_object(self, key: str) -> None:
        self._count("delete")
        with self._lock:
            self._objects.pop(key, None)

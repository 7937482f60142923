"""The write half of `S3Store`: single PUTs, multipart uploads, deletes.

Every write carries Content-MD5, and a CRC64NVME while the server takes it
(`store.uploadchecksums`); a create-only write sends If-None-Match: * and a 412
becomes `AlreadyExistsError` (`errortable.created`). A mixin: `S3Store`
provides the client, the bucket, the request context (count, translate,
observe) and the HEAD that asks whether S3 kept a checksum.
"""

from __future__ import annotations

import base64
import hashlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from s3cachefs.base.errors import StoreError
from s3cachefs.store import checksums
from s3cachefs.store.errortable import created, refusals
from s3cachefs.store.types import UPLOAD_CHECKSUM, ChecksumHead
from s3cachefs.store.uploadchecksums import ChecksumSupport

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3Writes:
    """Writes over `S3Store`'s client (thread-safe, as the client is)."""

    # Set up by S3Store.
    _bucket: str
    _client: S3Client
    _checksums: ChecksumSupport

    def _request(self, op: str, what: str) -> AbstractContextManager[None]:
        raise NotImplementedError  # S3Store's: count, translate errors, observe

    def head_checksum(self, key: str, etag: str) -> ChecksumHead:
        raise NotImplementedError  # S3Store's

    @property
    def sends_checksums(self) -> bool:
        return self._checksums.sends

    def checksums_refused(self, reason: str) -> None:
        self._checksums.refused(reason)

    def put_object(
        self, key: str, data: bytes, *, create_only: bool, crc64nvme: int | None = None
    ) -> str:
        what = f"s3://{self._bucket}/{key}"
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}

        def send(with_checksums: bool) -> str:
            sums: dict[str, Any] = {}
            if with_checksums:  # with the value: both S3 and moto keep it
                crc = checksums.crc64nvme(data) if crc64nvme is None else crc64nvme
                sums = {
                    "ChecksumAlgorithm": UPLOAD_CHECKSUM,
                    "ChecksumCRC64NVME": checksums.b64(crc),
                }
            with created(what), self._request("put", what), refusals(what, with_checksums):
                resp = self._client.put_object(
                    Bucket=self._bucket,
                    Key=key,
                    Body=data,
                    ContentMD5=_content_md5(data),
                    **extra,
                    **sums,
                )
            if with_checksums:
                self._kept(key, resp)
            return str(resp["ETag"])

        return self._checksums.put(send)

    def create_multipart(self, key: str, *, with_checksums: bool = True) -> str:
        what = f"s3://{self._bucket}/{key}"
        sums: dict[str, Any] = (
            {"ChecksumAlgorithm": UPLOAD_CHECKSUM, "ChecksumType": "FULL_OBJECT"}
            if with_checksums
            else {}
        )
        with self._request("multipart", what), refusals(what, with_checksums):
            resp = self._client.create_multipart_upload(Bucket=self._bucket, Key=key, **sums)
        return resp["UploadId"]

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
        what = f"s3://{self._bucket}/{key} part {number}"
        sums: dict[str, Any] = {}
        if with_checksums:
            crc = checksums.crc64nvme(data) if crc64nvme is None else crc64nvme
            sums = {"ChecksumAlgorithm": UPLOAD_CHECKSUM, "ChecksumCRC64NVME": checksums.b64(crc)}
        with self._request("put_part", what), refusals(what, with_checksums):
            resp = self._client.upload_part(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ContentMD5=_content_md5(data),
                **sums,
            )
        return resp["ETag"]

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
        what = f"s3://{self._bucket}/{key}"
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
        parts: list[dict[str, Any]] = [
            {"ETag": etag, "PartNumber": n} for n, etag in enumerate(etags, start=1)
        ]
        for part, crc in zip(parts, part_crcs or [], strict=False):
            part["ChecksumCRC64NVME"] = checksums.b64(crc)
        if crc64nvme is not None:  # S3 checks the assembled object against it
            extra.update(ChecksumCRC64NVME=checksums.b64(crc64nvme), ChecksumType="FULL_OBJECT")
        sent = bool(part_crcs) or crc64nvme is not None
        with created(what), self._request("multipart", what), refusals(what, sent):
            resp = self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                **extra,
            )
        if sent:
            self._kept(key, resp)
        return resp["ETag"]

    def _kept(self, key: str, resp: Any) -> None:
        """After an upload with checksums: whether S3 kept one (its echo, else a HEAD)."""
        if not self._checksums.wants_probe(echoed=bool(resp.get(f"Checksum{UPLOAD_CHECKSUM}"))):
            return
        try:
            head = self.head_checksum(key, str(resp["ETag"]))
        except StoreError:  # replaced meanwhile, or S3 unavailable: ask after the next upload
            return
        self._checksums.kept(head.algorithm is not None)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        with self._request("multipart", f"s3://{self._bucket}/{key}"):
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)

    def delete_object(self, key: str) -> None:
        with self._request("delete", f"s3://{self._bucket}/{key}"):
            self._client.delete_object(Bucket=self._bucket, Key=key)


def _content_md5(data: bytes) -> str:
    """Content-MD5: S3 rejects a body that arrived altered (BadDigest)."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()

"""What the S3 server does with the additional checksums that uploads carry, per store.

Every upload sends Content-MD5 and a CRC64NVME (`store.s3writes`); S3 checks both
and keeps the CRC, so what this tool writes is verifiable end to end later
(`store.checksums`). S3-compatible servers differ, as their code and bug
trackers show:

- refuse: 400 InvalidArgument for a checksum header they do not know. MinIO
  before CRC64NVME (early 2025) refuses CreateMultipartUpload with
  ``x-amz-checksum-algorithm: CRC64NVME`` ("Invalid checksum provided.") and
  ignores the header on PutObject/UploadPart; Backblaze B2 refuses any
  ``x-amz-checksum-*`` or ``x-amz-sdk-checksum-algorithm`` header ("Unsupported
  header '...' received for this API call."); other gateways and emulators
  answer InvalidRequest, or 501 NotImplemented.
- ignore: Ceph RGW before its checksum support stores the object, no checksum.

A refused upload is sent again without them (a multipart upload from its
start, so that all of it is alike). When that succeeds, the server is known to
refuse them: later uploads from this store carry Content-MD5 only, which every
server checks. An ignored checksum shows after the first upload: the response
does not echo it, and HEAD with ChecksumMode finds none. Either way, one
WARNING; objects written there are verified by their MD5 or multipart ETag.

Not refusals: BadDigest (the body did not match Content-MD5 or the CRC: it was
altered on the way) and XAmzContentSHA256Mismatch (it did not match the signed
payload hash; servers that cannot parse aws-chunked trailers say so too, but
uploads never send those: their checksums are explicit headers, and the
client's ``request_checksum_calculation`` is "when_required", so botocore adds
no CRC32 of its own to a request sent without checksums).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final

from s3cachefs.base.errors import ChecksumsRefusedError

log = logging.getLogger(__name__)

# Error codes (or bare HTTP statuses) that may mean "I do not know that header".
REFUSAL_CODES: Final = frozenset(
    {"InvalidArgument", "InvalidRequest", "NotImplemented", "BadRequest", "400", "501"}
)
PROBES: Final = 3  # HEADs after uploads before giving up on knowing whether S3 keeps them
NOT_KEPT: Final = (
    "S3 server does not keep additional checksums; objects written here are verified "
    "by their MD5/multipart ETag only"
)


class ChecksumSupport:
    """Whether one store's server takes and keeps additional checksums. Thread-safe."""

    def __init__(self, bucket: str) -> None:
        self._bucket = bucket
        self._lock = threading.Lock()
        self._refused = False
        self._kept: bool | None = None  # None: not known yet
        self._probes = PROBES

    @property
    def sends(self) -> bool:
        """Whether uploads still carry additional checksums."""
        return not self._refused

    def refused(self, reason: str) -> None:
        """An upload refused with checksums succeeded without: send none from now on."""
        with self._lock:
            if self._refused:
                return
            self._refused = True
        log.warning(
            "S3 server refused an upload for its additional checksum (%s) and took it "
            "without: uploads to s3://%s now carry Content-MD5 only (S3 still rejects a "
            "body that arrived altered); objects written here are verified by their "
            "MD5/multipart ETag only",
            reason,
            self._bucket,
        )

    def wants_probe(self, echoed: bool) -> bool:
        """After an upload with checksums: whether to ask S3 (HEAD) if it kept them.

        ``echoed``: the response named the checksum, as S3 does when it keeps one.
        """
        with self._lock:
            if echoed and self._kept is None:
                self._kept = True
            if self._kept is not None or self._probes == 0:
                return False
            self._probes -= 1
            return True

    def kept(self, kept: bool) -> None:
        """What a HEAD with ChecksumMode found; one WARNING if nothing."""
        with self._lock:
            if self._kept is not None:
                return
            self._kept = kept
        if not kept:
            log.warning("%s (s3://%s)", NOT_KEPT, self._bucket)

    def put(self, send: Callable[[bool], str]) -> str:
        """One request, with checksums while the server takes them (``send(checksums)``).

        Refused for them: once more without, and if S3 takes that, it refuses
        them. Any error of the second request is the upload's own.
        """
        if not self.sends:
            return send(False)
        try:
            return send(True)
        except ChecksumsRefusedError as exc:
            reason = str(exc)
        etag = send(False)
        self.refused(reason)
        return etag

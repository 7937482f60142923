"""End-to-end object checks (`store.checksums`): known vectors, S3's own values, planning."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3cachefs.base.config import MountConfig
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.ledger import Ledger
from s3cachefs.datasets.pins import Manifest, PinStore
from s3cachefs.datasets.prefetch import PrefetchJob
from s3cachefs.store.checkplan import plan
from s3cachefs.store.checksums import (
    Check,
    Digest,
    combine_crc64nvme,
    crc64nvme,
    resolved,
)
from s3cachefs.store.s3 import S3Store, checksum_head
from s3cachefs.store.types import ObjectInfo
from s3cachefs.testing.memorystore import MemoryStore
from tests.conftest import Bucket
from tests.test_blockcache import make_cache, read_back, run_with

MIB = 1024 * 1024
CHECK = b"123456789"  # the standard check input of CRC catalogues


def digest_of(check: Check, data: bytes, chunk: int | None = None) -> Digest:
    digest = Digest(check)
    step = chunk or max(1, len(data))
    for pos in range(0, len(data), step):
        digest.update(data[pos : pos + step])
    return digest


def b64int(value: int, width: int) -> str:
    return base64.b64encode(value.to_bytes(width, "big")).decode()


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("crc32", b64int(0xCBF43926, 4)),  # CRC-32/ISO-HDLC check value
        ("crc32c", b64int(0xE3069283, 4)),  # CRC-32/ISCSI
        ("crc64nvme", b64int(0xAE8B14860A799888, 8)),  # CRC-64/NVME
        ("sha1", base64.b64encode(hashlib.sha1(CHECK).digest()).decode()),
        ("sha256", base64.b64encode(hashlib.sha256(CHECK).digest()).decode()),
    ],
)
def test_full_object_digests_match_the_catalogue_check_values(
    algorithm: str, expected: str
) -> None:
    check = Check(f"{algorithm}-full", expected)
    for chunk in (None, 1, 4):  # however the bytes are fed
        digest = digest_of(check, CHECK, chunk)
        assert digest.result() == expected
        assert digest.matches()
    assert not digest_of(check, b"123456780").matches()


def test_composite_and_multipart_etag_digest_each_part_then_the_digests() -> None:
    parts = [b"a" * 5, b"bb" * 4, b"c"]
    data = b"".join(parts)
    layout = tuple(len(p) for p in parts)
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    etag = f"{hashlib.md5(md5s).hexdigest()}-3"
    crcs = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)
    composite = base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode()
    for chunk in (None, 1, 3, 7):  # feeds that cross part boundaries anywhere
        assert digest_of(Check("mpu-etag", etag, layout), data, chunk).matches()
        assert digest_of(Check("crc32-composite", composite, layout), data, chunk).matches()
    # The right bytes in the wrong layout, or a flipped byte, do not match.
    assert not digest_of(Check("mpu-etag", etag, (6, 7, 1)), data).matches()
    flipped = data[:7] + b"X" + data[8:]
    assert not digest_of(Check("mpu-etag", etag, layout), flipped).matches()
    assert not digest_of(Check("mpu-etag", etag, layout), data[:-1]).matches()  # too short


def test_crc64nvme_of_parts_combines_into_the_whole_objects() -> None:
    data = random.Random(1).randbytes(3 * MIB + 17)
    a, b = data[: 2 * MIB], data[2 * MIB :]
    assert combine_crc64nvme(crc64nvme(a), crc64nvme(b), len(b)) == crc64nvme(data)


# CRC32C is left out: moto computes it only with the optional crc32c package, and
# otherwise stores a plain CRC32 under that name. S3 has no composite CRC64NVME.
S3_CHECKSUMS = [
    (algorithm, kind)
    for algorithm in ("CRC32", "SHA1", "SHA256", "CRC64NVME")
    for kind in ("COMPOSITE", "FULL_OBJECT")
    if (algorithm, kind) != ("CRC64NVME", "COMPOSITE")
]


@pytest.mark.parametrize(("algorithm", "kind"), S3_CHECKSUMS)
def test_digests_equal_what_the_s3_server_computed(
    bucket: Bucket, tmp_path: Path, algorithm: str, kind: str
) -> None:
    """A 13 MiB multipart upload (5 MiB parts): our digest of its bytes is S3's checksum."""
    rng = random.Random(algorithm + kind)
    parts = [rng.randbytes(5 * MIB), rng.randbytes(5 * MIB), rng.randbytes(3 * MIB)]
    key = f"mp-{algorithm}-{kind}"
    upload(bucket, key, parts, algorithm, kind)
    info = head_info(bucket, key)
    store = s3_store(bucket, tmp_path)
    check = plan(store, info)
    suffix = "composite" if kind == "COMPOSITE" else "full"
    assert check.kind == f"{algorithm.lower()}-{suffix}"
    assert check.parts == ((5 * MIB, 5 * MIB, 3 * MIB) if kind == "COMPOSITE" else ())
    assert digest_of(check, b"".join(parts), 1 * MIB).matches()


def test_a_multipart_object_without_checksums_is_checked_by_its_etag(
    bucket: Bucket, tmp_path: Path
) -> None:
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(3 * MIB)]
    upload(bucket, "mp-plain", parts, None, None)
    info = head_info(bucket, "mp-plain")
    store = s3_store(bucket, tmp_path)
    check = plan(store, info)
    assert (check.kind, check.parts, check.guessed) == (
        "mpu-etag",
        (5 * MIB,) * 2 + (3 * MIB,),
        True,
    )
    assert check.value == info.etag.strip('"')
    assert digest_of(check, b"".join(parts)).matches()
    assert store.requests["head"] == 2  # the checksum HEAD, then part 1's


def upload(
    bucket: Bucket, key: str, parts: list[bytes], algorithm: str | None, kind: str | None
) -> None:
    client = bucket.client
    extra: dict[str, Any] = {}
    if algorithm:
        extra = {"ChecksumAlgorithm": algorithm, "ChecksumType": kind}
    upload_id = client.create_multipart_upload(Bucket=bucket.name, Key=key, **extra)["UploadId"]
    done = []
    for number, body in enumerate(parts, start=1):
        part_extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
        sent = client.upload_part(
            Bucket=bucket.name,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            **part_extra,
        )
        entry = {"ETag": sent["ETag"], "PartNumber": number}
        entry.update({k: v for k, v in sent.items() if k.startswith("Checksum")})
        done.append(entry)
    client.complete_multipart_upload(
        Bucket=bucket.name, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
    )


def head_info(bucket: Bucket, key: str) -> ObjectInfo:
    head = bucket.client.head_object(Bucket=bucket.name, Key=key)
    return ObjectInfo(key, head["ContentLength"], head["ETag"], 0)


def s3_store(bucket: Bucket, tmp_path: Path) -> S3Store:
    config = MountConfig(
        bucket=bucket.name,
        prefix="",
        mountpoint=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        endpoint_url=bucket.server.endpoint_url,
    )
    store = S3Store(config)
    store.check_bucket()
    return store


def info_of(store: MemoryStore, key: str) -> ObjectInfo:
    return store.head(key)


def test_planning_prefers_md5_then_checksums_then_the_part_layout_then_size() -> None:
    store = MemoryStore()
    store.put("single", b"x" * 1000)
    check = plan(store, info_of(store, "single"))
    assert check == Check("md5", hashlib.md5(b"x" * 1000).hexdigest())
    assert store.requests["head"] == 1  # ours, to get the info: planning asked nothing

    parts = [b"a" * 100, b"b" * 100, b"c" * 40]
    store.put_parts("crc", parts, "crc32c")
    check = plan(store, info_of(store, "crc"))
    assert (check.kind, check.parts) == ("crc32c-composite", (100, 100, 40))
    assert digest_of(check, b"".join(parts)).matches()

    store.put_parts("full", parts, "sha256", full=True)
    assert plan(store, info_of(store, "full")).kind == "sha256-full"

    # Parts of unequal sizes (the last larger than the first): every part is asked.
    odd = [b"a" * 100, b"b" * 50, b"c" * 300]
    store.put_parts("odd", odd)
    check = plan(store, info_of(store, "odd"))
    assert (check.kind, check.parts, check.guessed) == ("mpu-etag", (100, 50, 300), False)
    assert digest_of(check, b"".join(odd)).matches()

    # A server that ignores partNumber, and no checksum: the size is all there is.
    store.part_heads = False
    assert plan(store, info_of(store, "odd")) == Check("size")
    assert plan(store, info_of(store, "full")).kind == "sha256-full"  # needs no layout


def test_what_this_tool_writes_carries_a_checksum_s3_keeps(bucket: Bucket, tmp_path: Path) -> None:
    store = s3_store(bucket, tmp_path)
    small = os.urandom(1000)
    etag = store.put_object("one", small, create_only=True)
    assert plan(store, ObjectInfo("one", len(small), etag, 0), ask_s3=True) == Check(
        "crc64nvme-full", b64int(crc64nvme(small), 8)
    )
    parts = [os.urandom(5 * MIB), os.urandom(2 * MIB)]
    upload_id = store.create_multipart("two")
    etags = [store.upload_part("two", upload_id, n, p) for n, p in enumerate(parts, start=1)]
    whole = combine_crc64nvme(crc64nvme(parts[0]), crc64nvme(parts[1]), len(parts[1]))
    crcs = [crc64nvme(p) for p in parts]
    etag = store.complete_multipart(
        "two", upload_id, etags, create_only=True, part_crcs=crcs, crc64nvme=whole
    )
    head = bucket.client.head_object(Bucket=bucket.name, Key="two", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == b64int(whole, 8)
    check = plan(store, ObjectInfo("two", 7 * MIB, etag, 0))
    assert check.kind == "crc64nvme-full"
    assert digest_of(check, b"".join(parts)).matches()


def test_manifests_record_the_check_and_older_manifests_still_load(tmp_path: Path) -> None:
    pins = PinStore(tmp_path, "b", Ledger(1 << 20))
    pins.load()
    manifest = Manifest("b", "ds/", None, complete=True)
    infos = {
        "ds/a": ObjectInfo("ds/a", 10, '"' + "1" * 32 + '"', 1),
        "ds/b": ObjectInfo("ds/b", 30, '"' + "2" * 32 + '-3"', 2),
        "ds/c": ObjectInfo("ds/c", 30, '"' + "3" * 32 + '-2"', 3),
    }
    manifest.objects.update(infos)
    manifest.checks["ds/a"] = Check("md5", "1" * 32)
    manifest.checks["ds/b"] = Check("mpu-etag", "2" * 32 + "-3", (12, 12, 6))
    manifest.checks["ds/c"] = Check("size")
    pins.save(manifest)
    saved = json.loads((pins.dir / f"{manifest.id}.json").read_text())
    assert saved["checks"]["ds/b"] == ["mpu-etag", "2" * 32 + "-3", [[12, 2], [6, 1]]]

    again = PinStore(tmp_path, "b", Ledger(1 << 20))
    again.load()
    loaded = again.manifests[manifest.id]
    assert loaded.checks == manifest.checks
    assert loaded.size_only() == ["ds/c"]

    # A manifest from before end-to-end checks: no "checks"; MD5s of what was pinned.
    del saved["checks"]
    saved["objects"][1][4] = "f" * 32  # the multipart object's content MD5, recorded locally
    (pins.dir / f"{manifest.id}.json").write_text(json.dumps(saved))
    old = PinStore(tmp_path, "b", Ledger(1 << 20))
    old.load()
    legacy = old.manifests[manifest.id]
    assert legacy.check("ds/a") == Check("md5", "1" * 32)
    assert legacy.check("ds/b") == Check("local-md5", "f" * 32)
    assert legacy.check("ds/c") == Check("size")
    assert legacy.size_only() == ["ds/b", "ds/c"]  # never verified end to end


class FlippingStore(MemoryStore):
    """A store whose GET bodies have one byte flipped while ``flip`` is set (same length)."""

    flip = True

    def iter_range(
        self, key: str, etag: str, start: int, end: int, chunk: int, first: int = 0, *, size: int
    ) -> Iterator[bytes]:
        for n, piece in enumerate(
            super().iter_range(key, etag, start, end, chunk, first, size=size)
        ):
            if self.flip and n == 0:
                flipped = bytearray(piece)
                flipped[len(flipped) // 2] ^= 0xFF
                yield bytes(flipped)
            else:
                yield piece


def test_prefetch_keeps_nothing_of_an_object_that_fails_then_pins_it_when_right(
    tmp_path: Path,
) -> None:
    """The core path, without a kernel: a flipped byte fails the multipart ETag check."""
    store = FlippingStore()
    parts = [b"a" * 200_000, b"b" * 200_000, b"c" * 50_000]
    store.put_parts("ds/big", parts)
    cache = make_cache(tmp_path, store)
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()
    finals: list[dict[str, Any]] = []

    async def body() -> None:
        for flip in (True, False):
            store.flip = flip
            job = PrefetchJob(store, cache, pins, prefix="ds/", shard=None, jobs=2)
            finals.append(await job.run(ignore))
            if flip:  # its blocks' CRCs were of wrong bytes: none of them is kept
                assert cache.used_bytes == 0

    async def ignore(event: dict[str, Any]) -> None:
        pass

    run_with(cache, body)
    failed, done = finals
    assert failed["failed_objects"] == {
        "ds/big": "content does not match its multipart ETag (3 parts) in S3"
    }
    assert (done["ok"], done["size_only"]) == (True, 0)
    (manifest,) = pins.manifests.values()
    assert manifest.checks["ds/big"] == Check(
        "mpu-etag", store.head("ds/big").etag.strip('"'), (200_000, 200_000, 50_000)
    )
    read_back(
        cache,
        ObjectVersion(store.bucket, "ds/big", store.head("ds/big").etag, 450_000),
        b"".join(parts),
    )


async def _ignore(event: dict[str, Any]) -> None:
    pass


def prefetch_ds(
    store: MemoryStore, tmp_path: Path, etag_md5s: bool = True
) -> tuple[dict[str, Any], PinStore, Any]:
    """One prefetch job of ``ds/`` over a fresh cache: (its final report, the pins, the cache)."""
    cache = make_cache(tmp_path, store)
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()
    finals: list[dict[str, Any]] = []

    async def body() -> None:
        job = PrefetchJob(store, cache, pins, prefix="ds/", shard=None, jobs=2, etag_md5s=etag_md5s)
        finals.append(await job.run(_ignore))

    run_with(cache, body)
    return finals[0], pins, cache


def test_an_md5_etag_failed_twice_by_the_same_bytes_fails_unless_s3_says_it_is_no_md5(
    tmp_path: Path,
) -> None:
    """A server corrupting the same way every time looks like an SSE-KMS ETag: not taken for one."""
    store = FlippingStore()  # every GET flips the same byte; MemoryStore checks no MD5
    data = random.Random(5).randbytes(1 * MIB)
    store.put("ds/big", data)
    final, pins, cache = prefetch_ds(store, tmp_path / "auto")
    assert (final["ok"], final["complete"], final["size_only"]) == (False, False, 0)
    assert final["failed_objects"] == {
        "ds/big": "content does not match its ETag (MD5) in S3, twice over with the same bytes "
        "(S3 gives no other checksum for it): if this server's ETags are not MD5s, "
        "mount with --etag-md5 off"
    }
    assert cache.used_bytes == 0 and not pins.pinned_oids()  # nothing of it kept

    # The user says the ETags are not MD5s: size-checked only, and said so.
    final, pins, cache = prefetch_ds(store, tmp_path / "off", etag_md5s=False)
    assert (final["ok"], final["size_only_keys"]) == (True, ["ds/big"])
    (manifest,) = pins.manifests.values()
    assert manifest.checks["ds/big"] == Check("size")

    # S3 says so (SSE-KMS): the ETag is no MD5, the honest bytes are size-checked only.
    kms = MemoryStore()
    kms.put("ds/kms", data, kms=True)
    final, pins, cache = prefetch_ds(kms, tmp_path / "kms")
    assert (final["ok"], final["size_only_keys"], final["bytes_fetched"]) == (
        True,
        ["ds/kms"],
        len(data),  # downloaded once: S3 said why the MD5 did not match
    )
    (manifest,) = pins.manifests.values()
    assert manifest.checks["ds/kms"] == Check("size")
    read_back(cache, ObjectVersion(kms.bucket, "ds/kms", kms.head("ds/kms").etag, len(data)), data)


def test_the_checksum_head_says_when_s3_encrypts_with_kms(bucket: Bucket, tmp_path: Path) -> None:
    bucket.client.put_object(
        Bucket=bucket.name, Key="kms", Body=b"secret" * 100, ServerSideEncryption="aws:kms"
    )
    bucket.put("plain", b"open" * 100)
    store = s3_store(bucket, tmp_path)
    for key, encrypted in (("kms", True), ("plain", False)):
        assert store.head_checksum(key, store.head(key).etag).etag_not_md5 is encrypted, key


def test_sse_headers_say_the_etag_is_no_md5() -> None:
    plain = checksum_head({"ETag": '"' + "a" * 32 + '"', "ServerSideEncryption": "AES256"})
    assert not plain.etag_not_md5
    for extra in (
        {"ServerSideEncryption": "aws:kms"},
        {"ServerSideEncryption": "aws:kms:dsse"},
        {"SSECustomerAlgorithm": "AES256"},
    ):
        head = checksum_head({"ChecksumCRC32": "AAAAAA==", **extra})
        assert (head.algorithm, head.etag_not_md5) == ("crc32", True), extra


def test_an_older_manifests_md5_that_is_not_the_etags_is_not_taken_for_an_s3_check(
    tmp_path: Path,
) -> None:
    """The previous release pinned SSE-KMS objects by size, recording the MD5 it computed."""
    data = b"encrypted at rest" * 1000
    store = MemoryStore()
    etag = store.put("ds/kms", data, kms=True)
    ok = store.put("ds/plain", b"plain")
    local = hashlib.md5(data).hexdigest()
    assert etag.strip('"') != local
    cache = make_cache(tmp_path, store)
    old = {  # written by hand, as that release wrote it: no "checks", MD5s in the rows
        "format": 1,
        "bucket": store.bucket,
        "prefix": "ds/",
        "shard": None,
        "complete": True,
        "verified_at": 1.0,
        "objects": [
            ["ds/kms", len(data), etag, 1, local],
            ["ds/plain", 5, ok, 1, ok.strip('"')],
        ],
    }
    pins_dir = cache.root / "pins"
    pins_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(store.bucket, "ds/", None)
    (pins_dir / f"{manifest.id}.json").write_text(json.dumps(old))
    pins = PinStore(cache.root, store.bucket, cache.ledger)
    pins.load()
    legacy = pins.manifests[manifest.id]
    assert legacy.check("ds/kms") == Check("local-md5", local)  # not Check("md5", etag)
    assert legacy.check("ds/plain") == Check("md5", ok.strip('"'))
    assert legacy.size_only() == ["ds/kms"]

    # A prefetch asks S3 again: what it says (SSE-KMS), not the old MD5, goes in the manifest.
    finals: list[dict[str, Any]] = []

    async def body() -> None:
        job = PrefetchJob(store, cache, pins, prefix="ds/", shard=None, jobs=2)
        finals.append(await job.run(_ignore))

    run_with(cache, body)
    assert (finals[0]["ok"], finals[0]["size_only_keys"]) == (True, ["ds/kms"])
    renewed = pins.manifests[manifest.id]
    assert renewed.checks == {"ds/kms": Check("size"), "ds/plain": Check("md5", ok.strip('"'))}
    assert "ds/kms" not in renewed.md5


def test_a_composite_checksum_of_undeclared_type_passes_as_either(
    bucket: Bucket, tmp_path: Path
) -> None:
    """moto's HEAD of a composite upload that declared no type: no type, no "-N"."""
    rng = random.Random(7)
    parts = [rng.randbytes(5 * MIB), rng.randbytes(5 * MIB), rng.randbytes(2 * MIB)]
    upload_untyped(bucket, "mp-crc32", parts, "CRC32")
    head = bucket.client.head_object(Bucket=bucket.name, Key="mp-crc32", ChecksumMode="ENABLED")
    assert "ChecksumType" not in head and "-" not in head["ChecksumCRC32"]
    store = s3_store(bucket, tmp_path)
    check = plan(store, head_info(bucket, "mp-crc32"))
    assert (check.kind, check.parts) == ("crc32-either", (5 * MIB, 5 * MIB, 2 * MIB))
    digest = digest_of(check, b"".join(parts), 1 * MIB)  # both digests, one read
    assert digest.matches()
    assert resolved(check, digest.result()) == Check(
        "crc32-composite", check.value, (5 * MIB, 5 * MIB, 2 * MIB)
    )
    flipped = bytearray(b"".join(parts))
    flipped[6 * MIB] ^= 1
    assert not digest_of(check, bytes(flipped), 1 * MIB).matches()
    # Either way: a full-object checksum in an "-either" check passes as full-object.
    whole = b64int(zlib.crc32(b"".join(parts)), 4)
    either = Check("crc32-either", whole, check.parts)
    full = digest_of(either, b"".join(parts))
    assert full.matches() and resolved(either, full.result()) == Check("crc32-full", whole)


def upload_untyped(bucket: Bucket, key: str, parts: list[bytes], algorithm: str) -> None:
    """A multipart upload with ``algorithm`` and no ChecksumType (S3's default: composite)."""
    client = bucket.client
    made = client.create_multipart_upload(Bucket=bucket.name, Key=key, ChecksumAlgorithm=algorithm)
    done = []
    for number, body in enumerate(parts, start=1):
        sent = client.upload_part(
            Bucket=bucket.name,
            Key=key,
            UploadId=made["UploadId"],
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm=algorithm,
        )
        entry = {"ETag": sent["ETag"], "PartNumber": number}
        entry.update({k: v for k, v in sent.items() if k.startswith("Checksum")})
        done.append(entry)
    client.complete_multipart_upload(
        Bucket=bucket.name, Key=key, UploadId=made["UploadId"], MultipartUpload={"Parts": done}
    )

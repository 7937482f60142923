"""S3Store against the real local S3 server: the lean GET path and the botocore one.

Also what a lying server gets (``tests/faultproxy.py`` between the store and
moto): every GET response is checked before a byte is used, whole single-part
objects are checked against their MD5 ETag, and listings are bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Generator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import cast

import pytest

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import (
    BadResponseError,
    NotFoundError,
    StaleError,
    StoreError,
    TransientError,
)
from s3cachefs.cli.locals3 import LocalS3
from s3cachefs.store import listing as listing_module
from s3cachefs.store import s3 as store_module
from s3cachefs.store.rangeget import proxy_applies
from s3cachefs.store.responses import body_md5, check_get_response, etag_md5
from s3cachefs.store.retry import RetryPolicy
from s3cachefs.store.s3 import S3Store
from tests.conftest import Bucket, make_store
from tests.faultproxy import FaultProxy

MIB = 1024 * 1024


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
def test_ranged_gets_are_exact_conditional_and_translated(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    if not lean:  # what a proxy in the environment selects
        monkeypatch.setattr(store_module, "proxy_applies", lambda url: True)
    data = os.urandom(3_000_000)
    etag = bucket.put("dir/a file+x.bin", data)
    store = make_store(bucket, tmp_path)
    assert (store._getter is not None) == lean
    size = len(data)
    pieces = list(store.iter_range("dir/a file+x.bin", etag, 100, 2_500_000, 1 << 20, size=size))
    assert [len(p) for p in pieces] == [1 << 20, 1 << 20, 2_500_000 - 100 - 2 * (1 << 20)]
    assert b"".join(pieces) == data[100:2_500_000]
    with pytest.raises(StaleError):
        list(store.iter_range("dir/a file+x.bin", '"0123"', 0, 10, 10, size=size))
    with pytest.raises(NotFoundError):
        list(store.iter_range("dir/missing", etag, 0, 10, 10, size=size))
    # An abandoned body gives its connection up instead of leaving it half-read.
    stream = cast(
        Generator[bytes],
        store.iter_range("dir/a file+x.bin", etag, 0, len(data), 1 << 20, size=size),
    )
    next(stream)
    stream.close()
    assert b"".join(store.iter_range("dir/a file+x.bin", etag, 0, 10, 10, size=size)) == data[:10]
    assert store.requests["get"] == 5


def test_a_proxy_in_the_environment_selects_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert not proxy_applies("http://127.0.0.1:9000/bucket/")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert proxy_applies("http://minio.internal:9000/bucket/")
    monkeypatch.setenv("NO_PROXY", "minio.internal")
    assert not proxy_applies("http://minio.internal:9000/bucket/")


# ---- the response checks, as a pure function ----------------------------------------

ETAG = '"' + "ab" * 16 + '"'
WHAT = "s3://b/k"


def headers(**extra: str) -> dict[str, str]:
    """A 206's headers for bytes 10-19 of a 100-byte object (keys as servers spell them)."""
    base = {"ETag": ETAG, "Content-Range": "bytes 10-19/100", "Content-Length": "10"}
    base.update({k.replace("_", "-"): v for k, v in extra.items()})
    return base


def behaviour(status: int, hdrs: dict[str, str], start: int = 10, end: int = 20) -> str:
    with pytest.raises(BadResponseError) as info:
        check_get_response(status, hdrs, start, end, 100, ETAG, what=WHAT)
    assert str(info.value).startswith(f"{WHAT}: S3 server ")
    return info.value.behaviour


def test_a_response_is_what_was_asked_for_or_an_error_naming_the_behaviour() -> None:
    check_get_response(206, headers(), 10, 20, 100, ETAG, what=WHAT)
    lower = {k.lower(): v for k, v in headers(ETag='"' + "ab" * 16 + '"').items()}
    check_get_response(206, lower, 10, 20, 100, ETAG.strip('"'), what=WHAT)  # quoting varies
    whole = {"ETag": ETAG, "Content-Length": "100"}
    check_get_response(200, whole, 0, 100, 100, ETAG, what=WHAT)  # asked for all of it
    assert behaviour(200, whole) == "ignored_range"
    assert behaviour(200, {"ETag": ETAG, "Content-Length": "100"}, 0, 99) == "ignored_range"
    assert behaviour(200, {"ETag": ETAG, "Content-Length": "99"}, 0, 100) == "bad_length"
    assert behaviour(206, headers(Content_Range="bytes 10-14/100", Content_Length="5")) == (
        "short_range"
    )
    assert behaviour(206, headers(Content_Range="bytes 0-9/100")) == "wrong_range"
    assert behaviour(206, headers(Content_Range="bytes 10-29/100")) == "wrong_range"
    assert behaviour(206, headers(Content_Range="bytes 10-19/120")) == "size_mismatch"
    assert behaviour(206, headers(Content_Range="bytes 10-19/*")) == "bad_content_range"
    assert behaviour(206, {"ETag": ETAG, "Content-Length": "10"}) == "bad_content_range"
    assert behaviour(206, headers(Content_Length="11")) == "bad_length"
    assert behaviour(206, {"ETag": ETAG, "Content-Range": "bytes 10-19/100"}) == "bad_length"
    assert behaviour(206, {"Content-Range": "bytes 10-19/100", "Content-Length": "10"}) == (
        "no_etag"
    )
    assert behaviour(304, headers()) == "status"


def test_a_response_of_another_version_is_stale_and_names_its_etag() -> None:
    other = '"' + "cd" * 16 + '"'
    for status, hdrs in ((206, headers(ETag=other)), (200, {"ETag": other})):
        with pytest.raises(StaleError) as info:  # before any range check: it is not ours
            check_get_response(status, hdrs, 10, 20, 100, ETAG, what=WHAT)
        assert info.value.current_etag == other
        assert other in str(info.value)


def test_only_single_part_unencrypted_etags_are_md5s() -> None:
    assert body_md5({}, ETAG) == "ab" * 16
    assert body_md5({}, '"' + "ab" * 16 + '-3"') is None  # multipart
    assert body_md5({"x-amz-server-side-encryption": "AES256"}, ETAG) == "ab" * 16
    assert body_md5({"X-Amz-Server-Side-Encryption": "aws:kms"}, ETAG) is None
    assert body_md5({"x-amz-server-side-encryption-customer-algorithm": "AES256"}, ETAG) is None
    assert etag_md5("W/xyz") is None


# ---- the store behind a lying server: both GET paths ---------------------------------


def test_an_ignored_range_is_retried_never_used_and_warned_about_once(
    bucket: Bucket, proxy: FaultProxy, lying_store: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(3 * MIB)
    etag = bucket.put("k", data)
    proxy.rates["ignore_range"] = 1.0
    with caplog.at_level(logging.DEBUG, logger="s3cachefs.store.s3"):
        for _ in range(2):
            stream = lying_store.iter_range("k", etag, MIB, 2 * MIB, MIB, size=len(data))
            with pytest.raises(BadResponseError, match="ignored Range"):
                next(stream)  # not one byte of the wrong answer
    assert lying_store.requests["get"] == 6  # the attempt budget (3) per read
    assert proxy.faults["ignore_range"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "S3 server ignored Range (answered 200 with the whole object) for "
        f"s3://{bucket.name}/k; retrying"
    ]
    # A GET of the whole object may be answered 200: that is what was asked.
    assert b"".join(lying_store.iter_range("k", etag, 0, len(data), MIB, size=len(data))) == data
    proxy.rates["ignore_range"] = 0.5  # retried within the budget: right bytes or an error
    for _ in range(6):
        try:
            got = b"".join(lying_store.iter_range("k", etag, MIB, 3 * MIB, MIB, size=len(data)))
        except BadResponseError:
            continue
        assert got == data[MIB:]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "botocore"])
def test_one_retry_policy_bounds_every_retry_loop(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    # --s3-max-attempts (4 here, not the default 3) bounds the lean GET's retries and the
    # body loop's and botocore's alike (4 requests in all); the start-up check of the
    # bucket has its own (3 in all).
    if not lean:  # what a proxy in the environment selects
        monkeypatch.setattr(store_module, "proxy_applies", lambda url: True)
    etag = bucket.put("k", b"x" * 100)
    config = MountConfig(
        bucket=bucket.name,
        prefix="",
        mountpoint=tmp_path / "mnt",
        cache_dir=tmp_path / "cache",
        endpoint_url=proxy.endpoint_url,
        s3_max_attempts=4,
    )
    store = S3Store(config)
    store.check_bucket()
    assert (store._getter is not None) == lean
    proxy.rates["internal"] = 1.0  # every request answered 500 InternalError
    with pytest.raises(TransientError):
        store.list_dir("")
    assert proxy.faults["internal"] == 4
    with pytest.raises(TransientError):
        next(store.iter_range("k", etag, 0, 10, 10, size=100))
    # The request's own retries, not the body loop's on top.
    assert proxy.faults["internal"] == 4 + 4
    proxy.faults.clear()
    with pytest.raises(TransientError):
        S3Store(config).check_bucket()
    assert proxy.faults["internal"] == 3
    proxy.rates["internal"] = 0.0
    proxy.rates["ignore_range"] = 1.0  # answered, but not what was asked: the body loop's
    with pytest.raises(BadResponseError):
        next(store.iter_range("k", etag, 0, 10, 10, size=100))
    assert proxy.faults["ignore_range"] == 4


def test_the_backoff_is_full_jitter_doubling_to_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.again(n) for n in (1, 2, 3)] == [True, True, False]
    monkeypatch.setattr(random, "random", lambda: 1.0)  # the top of the jitter
    assert [policy.backoff(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert policy.backoff(30) == 20.0
    monkeypatch.setattr(random, "random", lambda: 0.0)
    assert policy.backoff(30) == 0.0
    assert policy.retryable_status(503) and policy.retryable_status(429)
    assert not policy.retryable_status(404) and not policy.retryable_status(412)


def test_a_short_range_is_retried_from_where_it_stands(
    bucket: Bucket, proxy: FaultProxy, lying_store: S3Store
) -> None:
    data = os.urandom(2 * MIB)
    etag = bucket.put("k", data)
    proxy.rates["short_range"] = 1.0
    with pytest.raises(BadResponseError, match="shorter range than asked"):
        next(lying_store.iter_range("k", etag, 10, 2 * MIB, MIB, size=len(data)))
    assert proxy.faults["short_range"] == 3
    proxy.rates["short_range"] = 0.5
    got = []
    for _ in range(6):
        with contextlib.suppress(BadResponseError):
            got.append(
                b"".join(lying_store.iter_range("k", etag, 10, 2 * MIB, MIB, size=len(data)))
            )
    assert got and all(g == data[10:] for g in got)


def test_a_whole_single_part_object_yields_nothing_before_its_md5_matched(
    bucket: Bucket, proxy: FaultProxy, lying_store: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(300_000)
    etag = bucket.put("small", data)
    proxy.rates["flip_byte"] = 1.0
    with caplog.at_level(logging.WARNING, logger="s3cachefs.store.s3"):
        stream = lying_store.iter_range("small", etag, 0, len(data), 65536, size=len(data))
        with pytest.raises(BadResponseError, match="body does not match its MD5 ETag"):
            next(stream)
    assert proxy.faults["flip_byte"] == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"body does not match its MD5 ETag for s3://{bucket.name}/small; retrying"
    ]
    proxy.rates["flip_byte"] = 0.0
    got = list(lying_store.iter_range("small", etag, 0, len(data), 65536, size=len(data)))
    assert b"".join(got) == data and len(got) == 5  # the same pieces as ever


def test_etags_that_are_not_md5s_fail_saying_so_until_etag_md5_is_off(
    bucket: Bucket,
    proxy: FaultProxy,
    lying_store: S3Store,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = os.urandom(300_000)
    real = bucket.put("k", data)
    proxy.etag_not_md5 = True  # every ETag another 32-hex value, the same every time
    etag = lying_store.head("k").etag
    assert etag != real and etag_md5(etag) is not None
    assert [o.etag for o in lying_store.list_dir("").objects] == [etag]
    what = f"s3://{bucket.name}/k"
    fix = (
        f"S3 server's ETag for {what} is not the MD5 of its bytes (the same bytes twice): "
        "if this server's ETags are not MD5s, mount with --etag-md5 off; until then such "
        "objects fail with EIO"
    )
    with caplog.at_level(logging.WARNING, logger="s3cachefs.store.s3"):
        for _ in range(2):
            stream = lying_store.iter_range("k", etag, 0, len(data), 65536, size=len(data))
            with pytest.raises(StoreError) as info:
                next(stream)  # not one byte
            assert str(info.value) == fix
            assert not isinstance(info.value, TransientError)  # EIO; S3 is not unavailable
    assert lying_store.requests["get"] == 4  # the same digest twice ends the attempts
    assert [r.getMessage() for r in caplog.records] == [
        f"body does not match its MD5 ETag for {what}; retrying",
        fix,
    ]
    part = b"".join(lying_store.iter_range("k", etag, 10, 70_000, 65536, size=len(data)))
    assert part == data[10:70_000]  # a range is checked for what it is, not by the MD5

    off = make_store(bucket, tmp_path, proxy.endpoint_url, etag_md5="off")
    assert (off._getter is None) == (lying_store._getter is None)  # the same GET path
    got = list(off.iter_range("k", etag, 0, len(data), 65536, size=len(data)))
    assert b"".join(got) == data and len(got) == 5
    assert off.requests["get"] == 1
    bucket.put("k", os.urandom(300_000))  # If-Match and the response's ETag still hold
    with pytest.raises(StaleError):
        next(off.iter_range("k", etag, 0, len(data), 65536, size=len(data)))


class RecordingProxy(FaultProxy):
    """The proxy, keeping (method, request headers) of every request."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: list[tuple[str, dict[str, str]]] = []

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        self.seen.append((req.command, {k.lower(): v for k, v in req.headers.items()}))
        super().handle(req)


def test_gets_never_ask_for_checksums_and_checksum_heads_do(
    bucket: Bucket, s3_server: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore asks by default (x-amz-checksum-mode: ENABLED), which Backblaze B2 refuses."""
    monkeypatch.setattr(store_module, "proxy_applies", lambda url: True)  # botocore's GET
    proxy = RecordingProxy(s3_server.endpoint_url)
    proxy.start()
    try:
        data = os.urandom(1000)
        etag = bucket.put("k", data)
        store = make_store(bucket, tmp_path, proxy.endpoint_url)
        assert b"".join(store.iter_range("k", etag, 0, 1000, 1000, size=1000)) == data
        store.head_checksum("k", etag)
    finally:
        proxy.stop()
    modes = [(m, h.get("x-amz-checksum-mode")) for m, h in proxy.seen]
    assert ("GET", None) in modes and ("HEAD", "ENABLED") in modes
    assert all(mode is None for method, mode in modes if method == "GET")


def test_an_ignored_if_match_is_caught_by_the_response_etag(
    bucket: Bucket, proxy: FaultProxy, lying_store: S3Store
) -> None:
    old = bucket.put("k", os.urandom(2 * MIB))
    new_data = os.urandom(2 * MIB)
    new = bucket.put("k", new_data)
    proxy.rates["strip_if_match"] = 1.0
    for start, end in ((0, 2 * MIB), (MIB, 2 * MIB)):
        stream = lying_store.iter_range("k", old, start, end, MIB, size=2 * MIB)
        with pytest.raises(StaleError) as info:
            next(stream)
        assert info.value.current_etag == new
    assert lying_store.requests["get"] == 2  # stale is final: not retried
    proxy.rates["strip_if_match"] = 0.0
    with pytest.raises(StaleError) as info:  # moto's 412 does not say the current ETag
        next(lying_store.iter_range("k", old, 0, MIB, MIB, size=2 * MIB))
    assert info.value.current_etag is None


def test_a_listing_that_never_ends_is_an_error_naming_why(
    bucket: Bucket,
    proxy: FaultProxy,
    lying_store: S3Store,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(3):
        bucket.put(f"p/f{i}", b"x")
    proxy.rates["endless_listing"] = 1.0
    why = f"S3 listing of s3://{bucket.name}/p/ repeated its continuation token"
    with caplog.at_level(logging.ERROR, logger="s3cachefs.store.listing"):
        for _ in range(2):
            with pytest.raises(StoreError, match=why) as info:
                lying_store.list_dir("p/")
            assert not isinstance(info.value, TransientError)  # EIO, never a stale listing
        pages = lying_store.list_tree("p/")
        assert [o.key for o in next(pages)] == ["p/f0", "p/f1", "p/f2"]
        with pytest.raises(StoreError, match=why):
            next(pages)
    assert lying_store.requests["list"] == 6  # two pages each, not 12,000
    assert [r.getMessage() for r in caplog.records] == [f"{why}: the server is misbehaving"]
    monkeypatch.setattr(listing_module, "MAX_LIST_PAGES", 1)  # a listing of too many pages
    pages = lying_store.list_tree("p/")
    assert len(next(pages)) == 3
    with pytest.raises(StoreError, match="went on for more than 1 pages: the server is misb"):
        next(pages)
    lying_store.listing_budget = 0.0  # a listing that outlives --s3-timeout x attempts
    with pytest.raises(TransientError, match="took longer than 0 s"):
        lying_store.list_dir("p/")


def test_listing_etags_differ_from_get_etags_the_same_way_every_time(
    bucket: Bucket, proxy: FaultProxy, lying_store: S3Store
) -> None:
    etag = bucket.put("p/a", b"abc")
    proxy.rates["listing_etag"] = 1.0
    [listed] = lying_store.list_dir("p/").objects
    assert listed.etag != etag and etag_md5(listed.etag) is not None
    assert lying_store.list_dir("p/").objects[0].etag == listed.etag
    assert lying_store.head("p/a").etag == etag
    assert [o.etag for o in next(lying_store.list_tree("p/"))] == [listed.etag]

"""Listings (`store.listing`): the lean ListObjectsV2 path gives what botocore's gives,
and a server that lies about a listing gets a clear error, never a hang.

Real moto behind ``tests/faultproxy.py``; every lie on both paths (lean, and
botocore's, which an HTTP proxy in the environment selects).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import pytest

from s3cachefs.base.errors import BadResponseError, StoreError, TransientError
from s3cachefs.store import s3 as store_module
from s3cachefs.store.listing import parse_page
from s3cachefs.store.s3 import S3Store
from tests.conftest import Bucket, Mounter, make_store, run_cli
from tests.faultproxy import FaultProxy

# URL-encoding matters for every one of these (space, +, %, XML specials, non-ASCII, a tab).
KEYS = ["p/a b+c%41.txt", "p/amp&lt<>.bin", "p/\u00fc/\u00f1.png", "p/tab\there", "p/x/y/z", "p/z"]


def test_the_lean_listing_gives_botocores_keys_and_fields(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i, key in enumerate(KEYS):
        bucket.put(key, b"x" * i)
    lean = make_store(bucket, tmp_path / "lean", proxy.endpoint_url)
    lean_tree = [info for page in lean.list_tree("p/") for info in page]
    lean_dir = lean.list_dir("p/")
    assert lean.requests["list"] == 2
    assert all(a.startswith("python-urllib3/") for a in proxy.listing_agents)  # not botocore
    monkeypatch.setattr(store_module, "proxy_applies", lambda url: True)
    boto = make_store(bucket, tmp_path / "boto", proxy.endpoint_url)
    assert boto._getter is None
    assert lean_tree == [info for page in boto.list_tree("p/") for info in page]
    assert lean_dir == boto.list_dir("p/")
    assert [o.key for o in lean_tree] == sorted(KEYS)  # S3's order: code points (UTF-8 bytes)
    assert [o.size for o in lean_tree] == [KEYS.index(o.key) for o in lean_tree]
    assert lean_dir.prefixes == ["p/x/", "p/\u00fc/"]


def test_the_lean_listing_url_is_the_one_botocore_signs(bucket: Bucket, tmp_path: Path) -> None:
    """The query S3 checks the signature over: encoded exactly as botocore encodes it."""
    store = make_store(bucket, tmp_path)
    prefix, token = "a b+c/\u00fc=&%~", "1/+=x y"
    ours = urllib.parse.urlsplit(
        store._list_url(
            {
                "list-type": "2",
                "prefix": prefix,
                "delimiter": "/",
                "encoding-type": "url",
                "continuation-token": token,
            }
        )
    )
    theirs = urllib.parse.urlsplit(
        store._client.generate_presigned_url(
            "list_objects_v2",
            Params={
                "Bucket": bucket.name,
                "Prefix": prefix,
                "Delimiter": "/",
                "EncodingType": "url",
                "ContinuationToken": token,
            },
        )
    )
    assert (ours.netloc, ours.path) == (theirs.netloc, theirs.path)
    signing = ("X-Amz-", "AWSAccessKeyId=", "Signature=", "Expires=")
    params = sorted(p for p in theirs.query.split("&") if not p.startswith(signing))
    assert sorted(ours.query.split("&")) == params


@pytest.mark.parametrize(
    ("lie", "why"),
    [
        ("truncated_listing", "is truncated with no token"),
        ("unordered_listing", "listed keys out of order"),
        # page 1 again behind fresh tokens: without the order check, 100,000 pages
        ("restarting_listing", "listed keys out of order"),
    ],
)
def test_a_listing_that_lies_ends_with_an_error_naming_the_lie(
    bucket: Bucket,
    proxy: FaultProxy,
    lying_store: S3Store,
    caplog: pytest.LogCaptureFixture,
    lie: str,
    why: str,
) -> None:
    for i in range(3):
        bucket.put(f"p/f{i}", b"x")
    proxy.rates[lie] = 1.0
    message = f"S3 listing of s3://{bucket.name}/p/ {why}"
    pages = 2 if lie == "restarting_listing" else 1  # a restart shows on its second page
    with caplog.at_level(logging.ERROR, logger="s3cachefs.store.listing"):
        for _ in range(2):
            with pytest.raises(StoreError, match=message) as info:
                lying_store.list_dir("p/")
            assert not isinstance(info.value, TransientError)  # EIO, never a stale listing
        tree = lying_store.list_tree("p/")
        if pages == 2:
            assert [o.key for o in next(tree)] == ["p/f0", "p/f1", "p/f2"]
        with pytest.raises(StoreError, match=message):  # before the page is used
            next(tree)
    assert lying_store.requests["list"] == 3 * pages
    assert [r.getMessage() for r in caplog.records] == [f"{message}: the server is misbehaving"]
    proxy.rates[lie] = 0.0  # nothing of it was kept
    assert [o.key for o in lying_store.list_dir("p/").objects] == ["p/f0", "p/f1", "p/f2"]


def test_a_page_that_is_no_listing_is_a_bad_response() -> None:
    ns = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
    for body in (
        b"<html>captive portal</html>",
        b"<ListBucketResult " + ns.encode() + b"><Contents><Key>k</Key>",  # cut short
        b"<ListBucketResult><Contents><Key>k</Key><Size>1</Size></Contents></ListBucketResult>",
    ):
        with pytest.raises(ValueError, match="not a listing"):
            parse_page(body)
    page = parse_page(
        b"<ListBucketResult><IsTruncated>true</IsTruncated><EncodingType>url</EncodingType>"
        b"<NextContinuationToken>t+1</NextContinuationToken><Contents><Key>a+b%2Bc</Key>"
        b"<Size>3</Size><ETag>&quot;e&quot;</ETag><LastModified>2026-01-02T03:04:05.678Z"
        b"</LastModified></Contents><CommonPrefixes><Prefix>d%20e/</Prefix></CommonPrefixes>"
        b"</ListBucketResult>"
    )
    assert (page.truncated, page.token, page.prefixes) == (True, "t+1", ["d e/"])
    [info] = page.objects
    assert (info.key, info.size, info.etag) == ("a b+c", 3, '"e"')
    # as the botocore path computes it (the float rounding included): manifests compare them
    assert info.mtime_ns == int(datetime(2026, 1, 2, 3, 4, 5, 678_000, UTC).timestamp() * 1e9)


def test_a_lean_listing_answered_with_no_listing_fails_as_a_bad_response(
    bucket: Bucket, tmp_path: Path, proxy: FaultProxy
) -> None:
    """A 200 whose body is no listing (a captive portal, a cut-short body): a clear error."""
    bucket.put("p/f", b"x")
    store = make_store(bucket, tmp_path, proxy.endpoint_url)
    store._getter.base_url = store._getter.base_url.replace(  # type: ignore[union-attr]
        f"/{bucket.name}/", "/"
    )  # the service root: a ListBuckets answer, not a listing
    with pytest.raises(BadResponseError, match="not a listing: <ListAllMyBucketsResult>"):
        store.list_dir("p/")


def test_a_prefetch_through_a_listing_that_restarts_fails_promptly_and_pins_nothing(
    bucket: Bucket, mounter: Mounter, proxy: FaultProxy
) -> None:
    """Page 1 again behind fresh tokens, forever: the job ends on page 2 with the reason."""
    files = {f"ds/f{i}.bin": os.urandom(1000 + i) for i in range(4)}
    for key, body in files.items():
        bucket.put(key, body)
    mount = mounter(bucket.name, server=proxy)
    proxy.rates["restarting_listing"] = 1.0
    bucket.server.reset()
    result = run_cli("prefetch", "ds", "--mount", str(mount.path))
    why = f"S3 listing of s3://{bucket.name}/ds/ listed keys out of order"
    assert result.returncode != 0 and why in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert bucket.server.counts()["list"] <= 2 * 6, bucket.server.counts()  # 2 per attempt
    errors = [ln for ln in mount.log_text().splitlines() if ln.startswith("ERROR ")]
    assert [ln.split(": ", 1)[1] for ln in errors] == [f"{why}: the server is misbehaving"]
    proxy.rates["restarting_listing"] = 0.0  # nothing of it was kept: the server behaves again
    assert run_cli("prefetch", "ds", "--mount", str(mount.path)).returncode == 0
    assert (mount.path / "ds" / "f3.bin").read_bytes() == files["ds/f3.bin"]


@pytest.mark.parametrize("fault", ["slowdown", "internal", "reset", "cut"])
def test_a_listing_through_a_flaky_server_is_retried_to_the_right_keys(
    bucket: Bucket, proxy: FaultProxy, lying_store: S3Store, fault: str
) -> None:
    for key in KEYS:
        bucket.put(key, b"x")
    proxy.rates[fault] = 0.5  # seeded: some attempts fail, none for ever
    for _ in range(3):
        assert [o.key for page in lying_store.list_tree("p/") for o in page] == sorted(KEYS)
        assert lying_store.list_dir("p/").prefixes == ["p/x/", "p/\u00fc/"]
    assert proxy.faults[fault] > 0

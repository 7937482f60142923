"""The listing half of `S3Store`: ListObjectsV2 pages, lean where it can, bounded always.

Where the lean GET path is on (`store.rangeget`), a page is one signed GET
parsed here with ElementTree: botocore's parser spends most of a 1,000-key
page on per-key work (a dateutil parse of every LastModified, shape walking)
that a listing does not need (``python -m bench.listcost``). Where it is off
(an HTTP proxy), botocore lists. Both give the same `Page`, the same
`ObjectInfo` fields (key, size, ETag, mtime_ns) and the same errors.

Keys are asked URL-encoded (``encoding-type=url``, as botocore does) and
decoded only when the response says it encoded them: a key may hold
characters XML 1.0 cannot carry.

A server that lies cannot make a listing hang or go on for ever: a truncated
page with no continuation token, a token already seen, keys that do not come in
S3's order (UTF-8 binary order, which each page and each next page must follow;
not asked of S3 Express directory buckets, which list in no order) or more than
`MAX_LIST_PAGES` pages end it with a StoreError (EIO), logged as ERROR once per
behaviour per store; a page is checked before it is used. A mixin: `S3Store`
provides the client, the lean GET path and the request context.
"""

from __future__ import annotations

import itertools
import logging
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import botocore.utils

from s3cachefs.base.errors import BadResponseError, StoreError, TransientError
from s3cachefs.store.rangeget import RangeGetter
from s3cachefs.store.types import Listing, ObjectInfo

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# A listing longer than this is a server that never ends it (100,000 pages of 1,000 keys:
# 100 million objects under one prefix), not a real one: it fails with a StoreError.
MAX_LIST_PAGES = 100_000


@dataclass
class Page:
    """One ListObjectsV2 response, as the listing uses it."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    token: str = ""  # NextContinuationToken


def parse_page(body: bytes) -> Page:
    """A ListObjectsV2 XML body; ValueError if it is not one (cut short, not XML, no keys)."""
    try:
        root = ET.fromstring(body)  # noqa: S314 (expat: no external entities; a bounded body)
    except ET.ParseError as exc:
        raise ValueError(f"not a listing: {exc}") from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != ns + "ListBucketResult":
        raise ValueError(f"not a listing: <{root.tag.removeprefix(ns)}>")
    decode = root.findtext(ns + "EncodingType") == "url"
    page = Page(
        truncated=root.findtext(ns + "IsTruncated") == "true",
        token=root.findtext(ns + "NextContinuationToken") or "",
    )
    key_tag, size_tag, etag_tag, date_tag = (
        ns + t for t in ("Key", "Size", "ETag", "LastModified")
    )
    for entry in root.iterfind(ns + "Contents"):
        key, size, etag, date = (entry.findtext(t) for t in (key_tag, size_tag, etag_tag, date_tag))
        if key is None or size is None or etag is None or date is None:
            raise ValueError("not a listing: an entry without Key, Size, ETag or LastModified")
        page.objects.append(
            ObjectInfo(
                key=urllib.parse.unquote_plus(key) if decode else key,
                size=int(size),
                etag=etag,
                mtime_ns=int(_timestamp(date) * 1e9),
            )
        )
    for entry in root.iterfind(ns + "CommonPrefixes"):
        prefix = entry.findtext(ns + "Prefix") or ""
        page.prefixes.append(urllib.parse.unquote_plus(prefix) if decode else prefix)
    return page


def _timestamp(text: str) -> float:
    """A LastModified as botocore reads it (same instant; naive is local time), but fast."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:  # a form only dateutil reads (nanoseconds, "GMT")
        return float(botocore.utils.parse_timestamp(text).timestamp())


def botocore_page(response: Any) -> Page:
    """A page from botocore's parsed ``list_objects_v2`` response."""
    return Page(
        objects=[
            ObjectInfo(
                key=obj["Key"],
                size=obj["Size"],
                etag=obj["ETag"],
                mtime_ns=int(obj["LastModified"].timestamp() * 1e9),
            )
            for obj in response.get("Contents", [])
        ],
        prefixes=[p["Prefix"] for p in response.get("CommonPrefixes", [])],
        truncated=bool(response.get("IsTruncated")),
        token=response.get("NextContinuationToken", ""),
    )


class _Order:
    """S3's listing order (UTF-8 binary: code point order), page after page."""

    def __init__(self, bucket: str) -> None:
        self.last = ""  # the greatest key or prefix of the pages so far
        # S3 Express directory buckets list in no particular order (AWS documents it).
        self.checked = not bucket.endswith("--x-s3")

    def problem(self, page: Page) -> str | None:
        """Why ``page`` cannot follow the pages before it, if it cannot."""
        keys = [o.key for o in page.objects]
        for names in (keys, page.prefixes):
            if not self.checked or not names:
                continue
            if names[0] <= self.last or any(a >= b for a, b in itertools.pairwise(names)):
                return "listed keys out of order"
        self.last = max([self.last, *keys[-1:], *page.prefixes[-1:]])
        return None


class S3Listings:
    """Listings over `S3Store`'s client or lean GET path (thread-safe, as both are)."""

    # Set up by S3Store.
    _bucket: str
    _client: S3Client
    _getter: RangeGetter | None
    listing_budget: float

    def _request(self, op: str, what: str) -> AbstractContextManager[None]:
        raise NotImplementedError  # S3Store's: count, translate errors, observe

    def _first(self, behaviour: str) -> bool:
        raise NotImplementedError  # S3Store's: whether it is the first time (log loudly)

    def list_dir(self, prefix: str) -> Listing:
        listing = Listing()
        deadline = time.monotonic() + self.listing_budget  # a lookup waits this long at most
        for page in self._pages(prefix, "/", deadline):
            listing.objects.extend(page.objects)
            listing.prefixes.extend(page.prefixes)
        return listing

    def list_tree(self, prefix: str) -> Iterator[list[ObjectInfo]]:
        for page in self._pages(prefix, ""):
            yield page.objects

    def _pages(self, prefix: str, delimiter: str, deadline: float | None = None) -> Iterator[Page]:
        """Every page of one listing, bounded: a server that never ends it is an error."""
        token = ""
        seen: set[str] = set()
        order = _Order(self._bucket)
        what = f"s3://{self._bucket}/{prefix}"
        for pages in itertools.count(1):
            if pages > MAX_LIST_PAGES:
                raise self._listing_error(
                    what, f"went on for more than {MAX_LIST_PAGES:,} pages", "page_limit"
                )
            if deadline is not None and time.monotonic() > deadline:
                message = (
                    f"S3 listing of {what} took longer than {self.listing_budget:g} s "
                    "(--s3-timeout x attempts)"
                )
                log.log(
                    logging.WARNING if self._first("list:deadline") else logging.DEBUG,
                    "%s",
                    message,
                )
                raise TransientError(message)
            with self._request("list", what):
                page = self._page(prefix, delimiter, token, what)
            # Checked before the page is used: a repeated token repeats a page already seen.
            if page.truncated and (not page.token or page.token in seen):
                raise self._listing_error(
                    what,
                    "repeated its continuation token"
                    if page.token
                    else "is truncated with no token",
                    "token",
                )
            if (why := order.problem(page)) is not None:
                raise self._listing_error(what, why, "order")
            yield page
            if not page.truncated:
                return
            token = page.token
            seen.add(token)

    def _page(self, prefix: str, delimiter: str, token: str, what: str) -> Page:
        if self._getter is None:  # botocore's: a proxy applies, or the bucket is not checked
            if token:
                response = self._client.list_objects_v2(
                    Bucket=self._bucket, Prefix=prefix, Delimiter=delimiter, ContinuationToken=token
                )
            else:
                response = self._client.list_objects_v2(
                    Bucket=self._bucket, Prefix=prefix, Delimiter=delimiter
                )
            return botocore_page(response)
        query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        body = self._getter.read(self._list_url(query), what)
        try:
            return parse_page(body)
        except ValueError as exc:
            raise BadResponseError(what, "listing", str(exc)) from None

    def _list_url(self, query: dict[str, str]) -> str:
        """The bucket's URL (path or virtual-host style, as the lean GET path has it)."""
        assert self._getter is not None
        url = urllib.parse.urlsplit(self._getter.base_url)
        path = url.path.rstrip("/") or "/"  # path style: /bucket, not /bucket/
        encoded = urllib.parse.urlencode(sorted(query.items()), quote_via=urllib.parse.quote)
        return url._replace(path=path, query=encoded).geturl()

    def _listing_error(self, what: str, why: str, behaviour: str) -> StoreError:
        """A listing that cannot end: one ERROR line per behaviour per store, and EIO."""
        message = f"S3 listing of {what} {why}: the server is misbehaving"
        log.log(logging.ERROR if self._first(f"list:{behaviour}") else logging.DEBUG, "%s", message)
        return StoreError(message)

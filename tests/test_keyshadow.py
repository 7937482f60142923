"""`datasets.keyshadow`: a key hidden by a directory of its name, across listing pages."""

from __future__ import annotations

from s3cachefs.datasets.keyshadow import Shadowed
from s3cachefs.store.types import ObjectInfo


def infos(*keys: str) -> list[ObjectInfo]:
    return [ObjectInfo(key, 1, "etag", 0) for key in keys]


def test_a_key_that_is_also_a_directory_is_hidden_wherever_the_pages_end() -> None:
    keys = ["a", "a!", "a!/x", "a-x", "a/b", "a/b/c", "ab", "b", "b/c"]
    assert keys == sorted(keys)  # S3's order
    for cut in range(len(keys) + 1):
        shadow = Shadowed()
        files = shadow.feed(infos(*keys[:cut])) + shadow.feed(infos(*keys[cut:]))
        files += shadow.flush()
        assert [i.key for i in files] == ["a!/x", "a-x", "a/b/c", "ab", "b/c"]
        assert sorted(shadow.hidden) == ["a", "a!", "a/b", "b"]

"""Index rows written many at a time (`cache.indexrows`): byte for byte the rows diskcache's
``Cache.set`` writes, so a cache made by an earlier version reads (and is written) the same,
and one made by this version reads in an earlier one."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import diskcache
import pytest

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.disk import Disk
from s3cachefs.cache.index import Index
from s3cachefs.cache.indexrows import RowWriter, pickled_key
from s3cachefs.cache.layout import Layout
from s3cachefs.cache.ledger import Ledger

BS = 1024 * 1024


def open_db(path: Path) -> Any:
    """A diskcache opened as `cache.index` opens it."""
    return diskcache.Cache(
        str(path), eviction_policy="none", size_limit=2**62, cull_limit=0, statistics=False
    )


def table(path: Path) -> list[tuple[Any, ...]]:
    """Every row as stored, but the times (each write's own); and the count and size kept."""
    with sqlite3.connect(path / "cache.db") as db:
        rows = db.execute(
            "SELECT key, raw, expire_time, access_count, tag, size, mode, filename, value"
            " FROM Cache ORDER BY key, raw"
        ).fetchall()
        settings = db.execute(
            "SELECT key, value FROM Settings WHERE key IN ('count', 'size') ORDER BY key"
        ).fetchall()
    return rows + settings


def sample_rows(n: int) -> list[tuple[tuple[Any, ...], Any]]:
    rng = random.Random(n)
    rows: list[tuple[tuple[Any, ...], Any]] = []
    for i in range(n):
        v = ObjectVersion("bucket", f"ds/ü {i}/" + "k" * rng.randrange(900), f'"{i:032x}"', i)
        rows.append((("o", v.oid), (v.bucket, v.key, v.etag, v.size)))
        for idx in (0, rng.randrange(256, 65536), rng.randrange(65536, 2**31)):
            rows.append((("b", v.oid, idx), rng.randrange(2**32)))
    return rows


def write_both(by_set: Any, by_writer: Any, writer: RowWriter, rows: list[Any]) -> None:
    """The same rows, one way through ``Cache.set``, the other through ``writer``."""
    with by_set.transact():
        for key, value in rows:
            by_set.set(key, value)
    with by_writer.transact():
        writer.put(rows)


def test_keys_are_pickled_as_diskcache_pickles_them(tmp_path: Path) -> None:
    disk = open_db(tmp_path / "db")._disk
    rng = random.Random(1)
    oids = [ObjectVersion("b", f"k{i}", "e", 1).oid for i in range(50)] + ["", "x" * 255]
    indices = [0, 1, 127, 128, 255, 256, 257, 65535, 65536, 2**31 - 1]
    indices += [rng.randrange(2**31) for _ in range(200)]
    for oid in oids:
        assert disk.put(("o", oid)) == (sqlite3.Binary(pickled_key(("o", oid))), False)
        for idx in indices:
            key = ("b", oid, idx)
            assert disk.put(key) == (sqlite3.Binary(pickled_key(key)), False), key


def test_rows_are_the_rows_cache_set_writes(tmp_path: Path) -> None:
    rows = sample_rows(40)
    by_set, by_writer = open_db(tmp_path / "set"), open_db(tmp_path / "writer")
    writer = RowWriter(by_writer)
    assert writer.fast
    write_both(by_set, by_writer, writer, rows)
    assert table(tmp_path / "writer") == table(tmp_path / "set")
    # Written again with other values (a block fetched anew): updated in place, as `set` does.
    again = [(key, 7 if key[0] == "b" else value) for key, value in rows[::3]]
    write_both(by_set, by_writer, writer, again)
    assert table(tmp_path / "writer") == table(tmp_path / "set")
    for key, value in again:
        assert by_writer.get(key) == value
    by_set.close()
    by_writer.close()


@pytest.mark.parametrize("first", ["set", "writer"])
def test_an_index_made_one_way_opens_and_changes_the_other(tmp_path: Path, first: str) -> None:
    """A cache made by the previous version (rows by ``Cache.set``) opens in this one, and
    this one's rows open in the previous one; each deletes the other's rows."""
    layout = Layout(tmp_path / "cache")
    layout.claim(BS)
    versions = [ObjectVersion("bucket", f"ds/{i}", f'"e{i}"', 2 * BS + i) for i in range(5)]

    def write(index: Index, how: str, v: ObjectVersion) -> None:
        layout.write_block(v.oid, v.size, 0, b"x")  # its file (else swept at the next open)
        with index.transaction():
            if how == "set":
                index.put_object(v)
                for idx in range(3):
                    index.put_block(v.oid, idx, 100 + idx)
            else:
                index.put_rows([v], [(v.oid, idx, 100 + idx) for idx in range(3)])

    other = "writer" if first == "set" else "set"
    index = Index(layout)
    index.open(Ledger(BS))
    for v in versions[:3]:
        write(index, first, v)
    index.close()
    index = Index(layout)
    books = Ledger(BS)
    index.open(books)
    assert sorted(books.oids()) == sorted(v.oid for v in versions[:3])
    assert all(books.block_crcs(v) == {0: 100, 1: 101, 2: 102} for v in versions[:3])
    for v in versions[3:]:
        write(index, other, v)
    index.delete_block(versions[0].oid, 2)  # a row the other way wrote
    index.delete_block(versions[4].oid, 1)
    index.close()
    index = Index(layout)
    books = Ledger(BS)
    index.open(books)
    assert sorted(books.oids()) == sorted(v.oid for v in versions)
    assert books.block_crcs(versions[0]) == {0: 100, 1: 101}
    assert books.block_crcs(versions[4]) == {0: 100, 2: 102}
    index.close()
    layout.release()


def test_a_kept_run_writes_its_object_row_even_when_the_object_was_known(
    tmp_path: Path,
) -> None:
    """A bulk run's object row is written with every kept run, not only when the ledger had
    no record at accept time: that record's own row may be in a commit that failed (the
    review's finding 1), and block rows without it are dropped at the next start."""
    layout = Layout(tmp_path / "cache")
    layout.claim(BS)
    index = Index(layout)
    index.open(Ledger(BS))
    v = ObjectVersion("bucket", "ds/x", '"e"', 2 * BS)
    layout.write_block(v.oid, v.size, 0, b"x" * BS)
    inode = layout.path(v.oid).stat().st_ino
    disk = Disk(layout, index)
    assert disk.index_written([(v, False, 0, [11, 12], inode)]) == [True]
    index.close()
    index = Index(layout)
    books = Ledger(BS)
    index.open(books)
    assert books.block_crcs(v) == {0: 11, 1: 12}
    index.close()
    layout.release()


def val_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.val"))


def unnamed(path: Path) -> list[tuple[Any, ...]]:
    """`table`, each value file's name (random, each write's own) as whether it has one."""
    return [(*r[:7], r[7] is not None, *r[8:]) if len(r) > 7 else r for r in table(path)]


def test_a_value_kept_in_a_file_is_replaced_as_cache_set_replaces_it(tmp_path: Path) -> None:
    """Review finding 3: a value at or over diskcache's file size (32 KiB) lives in a file;
    written again, the old file goes (as ``Cache.set`` does), none is left behind."""
    by_set, by_writer = open_db(tmp_path / "set"), open_db(tmp_path / "writer")
    writer = RowWriter(by_writer)
    assert writer.fast
    key = ("o", ObjectVersion("bucket", "big", '"e"', 1).oid)
    small = [(("b", key[1], i), i) for i in range(3)]
    for value in ("a" * 40_000, "b" * 50_000):
        write_both(by_set, by_writer, writer, [(key, value), *small])
        assert by_writer.get(key) == value
        assert len(val_files(tmp_path / "writer")) == len(val_files(tmp_path / "set")) == 1
    by_set.close()
    by_writer.close()


def test_rows_go_through_cache_set_when_the_writer_cannot_write_them(tmp_path: Path) -> None:
    """Review findings 3 and 7: a diskcache whose values go to files from under 32 KiB is
    not one `RowWriter` writes; every row then goes through ``Cache.set``: the same rows."""
    rows = sample_rows(20)
    by_set = open_db(tmp_path / "set")
    by_writer = diskcache.Cache(
        str(tmp_path / "writer"), eviction_policy="none", size_limit=2**62, cull_limit=0,
        statistics=False, disk_min_file_size=256,
    )  # fmt: skip
    writer = RowWriter(by_writer)
    assert not writer.fast
    by_set.reset("disk_min_file_size", 256)
    for batch in (rows, [(key, 7 if key[0] == "b" else value) for key, value in rows[::3]]):
        write_both(by_set, by_writer, writer, batch)
        assert unnamed(tmp_path / "writer") == unnamed(tmp_path / "set")
        assert len(val_files(tmp_path / "writer")) == len(val_files(tmp_path / "set")) > 0
    by_set.close()
    by_writer.close()

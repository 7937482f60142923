"""Index rows written many at a time, exactly as diskcache's ``Cache.set`` writes them.

``Cache.set`` costs ~37 us of CPU a row on this project's 2-core machine: a SELECT,
then an INSERT or an UPDATE, and the tuple key pickled and run through
``pickletools.optimize`` (pure Python, ~9 us). A bulk commit writes thousands of
rows (issue 12), so `RowWriter` writes a commit's rows with one ``executemany`` of
an UPSERT into diskcache's own ``Cache`` table, with diskcache's own value encoding
(``Disk.store``) and its key encoding for our two key shapes built directly:
~6 us a row. Nothing changes on disk: the rows are byte for byte those ``set``
writes (the tests compare them), so caches made before read the same and a
downgrade reads these; the UPSERT fires the same triggers (``count``, ``size``).

Checked when the index opens: the key encoding against diskcache's ``Disk.put``,
the table's columns, an UPSERT-capable SQLite. If any differs (another diskcache,
another pickle, values kept in files below diskcache's default 32 KiB), every row goes
through ``Cache.set`` as before; so does any row whose value is kept in a file.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# Key -> value, as the index keeps them: ("o", oid) -> (bucket, key, etag, size) and
# ("b", oid, block index) -> crc32.
Row = tuple[tuple[Any, ...], Any]

_COLUMNS = [
    "rowid",
    "key",
    "raw",
    "store_time",
    "expire_time",
    "access_time",
    "access_count",
    "tag",
    "size",
    "mode",
    "filename",
    "value",
]
# What `Cache.set` writes (no expiry, no tag, access_count 0), an UPDATE of the same
# columns if the key is there (`Cache._row_update`).
_UPSERT = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
    " size, mode, filename, value) VALUES (?, 0, ?, NULL, ?, 0, NULL, ?, ?, ?, ?)"
    " ON CONFLICT(key, raw) DO UPDATE SET store_time = excluded.store_time,"
    " expire_time = NULL, access_time = excluded.access_time, access_count = 0, tag = NULL,"
    " size = excluded.size, mode = excluded.mode, filename = excluded.filename,"
    " value = excluded.value"
)
_MIN_FILE_SIZE = 2**15  # diskcache's default ``disk_min_file_size``
_SAMPLE_OID = "0123456789abcdef0123456789abcdef01234567"
_SAMPLE_INDICES = (0, 1, 127, 128, 255, 256, 65535, 65536, 2**24, 2**31 - 1)


def pickled_key(key: tuple[Any, ...]) -> bytes:
    """``pickletools.optimize(pickle.dumps(key, 5))`` for ("o", oid) and ("b", oid, idx)
    (an oid under 256 ASCII characters, 0 <= idx < 2**31), built without either."""
    oid: bytes = key[1].encode()
    kind: bytes = key[0].encode()
    body = b"\x8c\x01" + kind + b"\x8c" + bytes((len(oid),)) + oid
    if len(key) == 2:
        body += b"\x86."  # TUPLE2 STOP
    else:
        idx = key[2]
        if idx < 256:
            body += b"K" + bytes((idx,))  # BININT1
        elif idx < 65536:
            body += b"M" + idx.to_bytes(2, "little")  # BININT2
        else:
            body += b"J" + idx.to_bytes(4, "little", signed=True)  # BININT
        body += b"\x87."  # TUPLE3 STOP
    return b"\x80\x05\x95" + len(body).to_bytes(8, "little") + body  # PROTO 5, FRAME


class RowWriter:
    """Writes rows of one diskcache ``Cache`` (inside its transaction), or says it cannot."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.fast = self._can(db)

    @staticmethod
    def _can(db: Any) -> bool:
        try:
            disk = db._disk
            keys: list[tuple[Any, ...]] = [("o", _SAMPLE_OID)]
            keys += [("b", _SAMPLE_OID, idx) for idx in _SAMPLE_INDICES]
            same = all(disk.put(k) == (sqlite3.Binary(pickled_key(k)), False) for k in keys)
            columns = [row[1] for row in db._sql("PRAGMA table_info(Cache)").fetchall()]
        except (AttributeError, sqlite3.Error) as exc:
            log.info("cache index rows written one by one (%s)", exc)
            return False
        upsert = sqlite3.sqlite_version_info >= (3, 24, 0)
        # Values kept in files from under diskcache's 32 KiB: not this index's settings.
        inline = getattr(disk, "min_file_size", 0) >= _MIN_FILE_SIZE
        if not (same and columns == _COLUMNS and upsert and inline):
            log.info("cache index rows written one by one (not diskcache's known encoding)")
            return False
        return True

    def put(self, rows: Iterable[Row]) -> None:
        """Set every row; call inside ``db.transact()`` (one commit)."""
        if not self.fast:
            for key, value in rows:
                self._db.set(key, value)
            return
        now = time.time()
        disk = self._db._disk
        params: list[tuple[Any, ...]] = []
        for key, value in rows:
            size, mode, filename, data = disk.store(value, False, key=key)
            if filename is not None:
                # A value kept in a file (32 KiB or more: not one of ours, in practice):
                # `set` writes it, and removes the file of the value it replaces, which
                # the UPSERT would leave behind. The rows before it first, in order.
                disk.remove(filename)
                self._db._con.executemany(_UPSERT, params)
                params = []
                self._db.set(key, value)
                continue
            params.append((sqlite3.Binary(pickled_key(key)), now, now, size, mode, filename, data))
        self._db._con.executemany(_UPSERT, params)

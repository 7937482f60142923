"""The index: the cache's books on disk, loaded whole at start and repaired on the way.

Rows (diskcache over SQLite): per object version ``("o", oid) -> (bucket, key,
etag, size)`` and, per block present, ``("b", oid, idx) -> crc32``. The whole
index is loaded into the ledger at start; reads never touch SQLite.

The load repairs what a crash can leave (`cache.disk` says why each can
happen): a block row whose object row was lost, an object row whose file is
gone (both dropped), a file with no object row (deleted: the stray sweep). A
damaged database (power loss, bad disk) is set aside and the cache starts empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import diskcache

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.indexrows import Row, RowWriter
from s3cachefs.cache.layout import Layout
from s3cachefs.cache.ledger import Ledger

log = logging.getLogger(__name__)


class Index:
    """The rows of one cache dir. Row changes are blocking (worker threads)."""

    # Seconds a writer waits on a locked DB before diskcache.Timeout (a disk error to us).
    LOCK_TIMEOUT = 30.0

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._db: Any = None
        self._rows: RowWriter

    def open(self, ledger: Ledger) -> None:
        """Open the database and load it into ``ledger``, repairing on the way. Blocking."""
        try:
            self._db = self._open_db()
            self._load(ledger)
        except (sqlite3.DatabaseError, pickle.UnpicklingError, EOFError, TypeError) as exc:
            # A damaged index (power loss, bad disk): set it aside and start empty. The
            # data files then have no index row and are swept; prefetch refetches them.
            if self._db is not None:
                self._db.close()
            aside = self.layout.root / f"index.damaged-{int(time.time())}"
            os.replace(self.layout.index_dir, aside)
            log.error(
                "cache index damaged (%s: %s); moved to %s, starting with an empty cache",
                type(exc).__name__,
                exc,
                aside.name,
            )
            ledger.clear()
            self._db = self._open_db()
            self._load(ledger)

    def _open_db(self) -> Any:
        db = diskcache.Cache(
            str(self.layout.index_dir),
            eviction_policy="none",  # we evict; diskcache's LRU would write on every get
            size_limit=2**62,
            cull_limit=0,
            statistics=False,
            timeout=self.LOCK_TIMEOUT,
        )
        self._rows = RowWriter(db)
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ---- rows ------------------------------------------------------------

    def put_object(self, version: ObjectVersion) -> None:
        self._db.set(("o", version.oid), _object_value(version))

    def put_block(self, oid: str, index: int, crc: int) -> None:
        self._db.set(("b", oid, index), crc)

    def put_rows(self, objects: list[ObjectVersion], blocks: list[tuple[str, int, int]]) -> None:
        """Object rows, then block rows (oid, index, crc32), the rows `put_object` and
        `put_block` write, in one statement (`cache.indexrows`); inside a `transaction`."""
        rows: list[Row] = [(("o", v.oid), _object_value(v)) for v in objects]
        rows += [(("b", oid, idx), crc) for oid, idx, crc in blocks]
        self._rows.put(rows)

    def delete_block(self, oid: str, index: int) -> None:
        self._db.delete(("b", oid, index))

    def delete_object(self, oid: str) -> None:
        self._db.delete(("o", oid))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite commit for every row changed inside, not one per row."""
        with self._db.transact():
            yield

    # ---- load and repair ---------------------------------------------------

    def _load(self, ledger: Ledger) -> None:
        db, cache_dir = self._db, self.layout.cache_dir
        blocks: list[tuple[str, int, int]] = []
        for key in db.iterkeys():
            value = db.get(key)
            if key[0] == "o" and value is not None:
                ledger.load_object(key[1], ObjectVersion(*value))
            elif key[0] == "b" and value is not None:
                blocks.append((key[1], key[2], value))
        dropped = 0
        for oid, idx, crc in blocks:
            if not ledger.load_block(oid, idx, crc):
                # a block row whose object row was lost: unusable
                self.delete_block(oid, idx)
                dropped += 1
        for oid in ledger.oids():
            if not self.layout.path(oid).exists():
                dropped += self._forget(ledger, oid)
        if dropped:
            log.warning("cache_dir=%s dropped %d index rows with no data", cache_dir, dropped)
        strays = self.layout.strays(ledger)
        for path in strays:  # data whose index row never landed (crash, racing eviction)
            path.unlink(missing_ok=True)
        if strays:
            log.warning("cache_dir=%s removed %d files with no index row", cache_dir, len(strays))
        log.info(
            "cache_dir=%s objects=%d blocks=%d bytes=%d",
            cache_dir,
            ledger.object_count,
            ledger.evictable_blocks,
            ledger.used,
        )

    def _forget(self, ledger: Ledger, oid: str) -> int:
        """Drop an object whose file is gone, and its rows; returns its block rows."""
        removed = ledger.remove(oid)
        assert removed is not None
        record, _ = removed
        for idx in record.blocks:
            self.delete_block(oid, idx)
        self.delete_object(oid)
        return len(record.blocks)


def _object_value(version: ObjectVersion) -> tuple[str, str, str, int]:
    return version.bucket, version.key, version.etag, version.size

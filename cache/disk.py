"""The blocking disk side: data files and index rows, changed in an order a crash cannot hurt.

Every function here runs in a worker thread under the disk limiter and is
given plain values, never the ledger (which the trio thread alone changes).
Neither data nor rows are fsync'd, so after a power loss a row may point at
zeros or a torn block: every block is checked against its CRC when it is
first read from disk (`cache.integrity`), and a block that fails is a miss.
What the order below guarantees is that nothing is ever *indexed* that was
not written, and nothing is left on disk that the start cannot find:

- a block: the object row (unless one was committed before: `ledger.Record.indexed`),
  its bytes, then its block row. A crash in between leaves bytes that no row points
  at: never served, and a file with no object row is swept at start (`cache.index`).
- eviction: the block row first, then its hole; for an object's last block,
  its object row, then its file.
- a bulk worker's run (`cache.bulk`): its bytes, then (the daemon) its rows in one
  transaction; bytes no row points at are never served.
- adoption (a finished upload): the file moved into place, then every row in
  one transaction; no rows, no file.
- free: the rows, then the file.

Deletes (eviction, free, a failed block's row) run after the ledger let the object
go, so a read may fetch it again meanwhile: its write (rows, bytes, file) waits
until every delete of that object taken before has run (`cache.deleting`).
"""

from __future__ import annotations

import os
from pathlib import Path

from s3cachefs.cache.blocks import ObjectVersion, block_span
from s3cachefs.cache.index import Index
from s3cachefs.cache.layout import Layout
from s3cachefs.cache.ledger import Victim
from s3cachefs.store.checksums import Digest
from s3cachefs.store.crc import crc32


class Disk:
    """What the trio side hands to worker threads: each method is one blocking step."""

    def __init__(self, layout: Layout, index: Index) -> None:
        self.layout = layout
        self.index = index

    def write_block(
        self,
        version: ObjectVersion,
        index: int,
        offset: int,
        data: bytes | None,
        crc: int,
        victims: list[Victim],
        object_row: bool,
    ) -> None:
        """Evict ``victims``, then (unless ``data`` is None: no room) write one block,
        and first its object row if ``object_row``."""
        self.evict(victims)
        if data is None:
            return
        oid = version.oid
        if object_row:
            self.index.put_object(version)
        self.layout.write_block(oid, version.size, offset, data)
        self.index.put_block(oid, index, crc)

    def evict(self, victims: list[Victim]) -> None:
        for oid, idx, start, length in victims:
            self.index.delete_block(oid, idx)
            if length < 0:  # the object's last block: drop the whole file
                self.index.delete_object(oid)
                self.layout.remove(oid)
            else:
                self.layout.punch(oid, start, length)

    def adopt(
        self,
        version: ObjectVersion,
        path: Path,
        crcs: dict[int, int],
        victims: list[Victim],
        fits: bool,
    ) -> None:
        """Evict ``victims``, then make ``path`` the object's file (or delete it: no room)."""
        self.evict(victims)
        if not fits:
            path.unlink(missing_ok=True)
            return
        target = self.layout.place(version.oid, path)
        try:
            with self.index.transaction():  # one SQLite commit, not one per block
                blocks = [(version.oid, idx, crc) for idx, crc in crcs.items()]
                self.index.put_rows([version], blocks)
        except BaseException:
            target.unlink(missing_ok=True)  # no row, no file: S3 has the bytes
            raise

    def index_written(
        self, rows: list[tuple[ObjectVersion, bool, int, list[int], int]]
    ) -> list[bool]:
        """Rows for runs a bulk worker wrote (version, new object, first block, CRCs,
        inode), in one transaction; False for a run whose file is no longer that inode
        (evicted and made anew while it was written): nothing indexed for it.
        A kept run writes its object row even if the object was not new: the row of
        whoever made the record may be in a commit that failed (an UPSERT, once per oid)."""
        kept, blocks = [], []
        objects: dict[str, ObjectVersion] = {}
        with self.index.transaction():
            for version, _new, first, crcs, inode in rows:
                try:
                    same = os.stat(self.layout.path(version.oid)).st_ino == inode
                except FileNotFoundError:
                    same = False
                kept.append(same)
                if same:
                    objects[version.oid] = version
                    blocks += [(version.oid, first + i, crc) for i, crc in enumerate(crcs)]
            self.index.put_rows(list(objects.values()), blocks)  # one statement
        return kept

    def free(self, oid: str, blocks: list[int]) -> None:
        for idx in blocks:
            self.index.delete_block(oid, idx)
        self.index.delete_object(oid)
        self.layout.remove(oid)

    def read(self, oid: str, offset: int, length: int) -> bytes:
        return self.layout.read(oid, offset, length)

    def forget_block(self, oid: str, index: int) -> None:
        """A block that failed its check: its row goes (its bytes are overwritten later)."""
        self.index.delete_block(oid, index)

    def forget_blocks(self, oid: str, blocks: list[int]) -> None:
        """Rows a write made for a record deleted whole meanwhile (its bytes went with it)."""
        for idx in blocks:
            self.index.delete_block(oid, idx)

    def verify(
        self, version: ObjectVersion, block_size: int, crcs: dict[int, int], digest: Digest
    ) -> list[int]:
        """Read every block in ``crcs`` in order into ``digest``; the ones failing their CRC."""
        bad = []
        try:
            fd = os.open(self.layout.path(version.oid), os.O_RDONLY)
        except FileNotFoundError:
            return sorted(crcs)
        try:
            for idx in sorted(crcs):
                start, end = block_span(idx, block_size, version.size)
                data = os.pread(fd, end - start, start)
                if len(data) != end - start or crc32(data) != crcs[idx]:
                    bad.append(idx)
                digest.update(data)
        finally:
            os.close(fd)
        return bad

"""The bulk path's daemon side: prefetch runs fetched by worker processes, indexed here.

`BulkEngine.fetch` hands one run of missing blocks of one object version to a
worker process (`cache.bulkworker`), which GETs it, ``pwrite``s it into the
object's cache file and computes each block's CRC32 (and, for a whole object,
the digest its check asks for) from the bytes written. The daemon stays the one
owner of the index, the ledger and the pins:

- before a job goes out its bytes are reserved (evicting what must go) and a
  flight is registered for each of its blocks, so a foreground read of one of
  them waits for the job instead of a second GET (single flight);
- results come back in batches over a socket the trio thread waits on (no
  thread hand-off per block); a batch's rows are written in one index
  transaction (batches that arrive while one is written go together in the
  next, with the work riding on commits: one thread call), and only if the
  file the worker wrote is still the object's
  (its inode): bytes no row points at are never served, and a file no object
  row points at is swept at start, so a ``kill -9`` at any point loses only
  unindexed bytes;
- a job that fails gives its reservation back and its flights up (a waiting
  reader starts its own GET); a worker that dies loses its jobs, which the
  caller runs on the in-daemon path (`fetch` returns None), as it does for
  every job while the workers cannot start or the store has no lean GET path.

The processes themselves (spawned when the cache starts, fed in batches, replaced,
stopped with the cache's nursery) are `cache.bulkpool`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from s3cachefs.base.errors import CredentialsError
from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.bulkpool import JobKey, WorkerPool
from s3cachefs.cache.bulkriders import Ride, Rider, index_then, wants
from s3cachefs.cache.bulkworker import EXPIRED, Done, Job, error_of
from s3cachefs.cache.deleting import Write, drop_written
from s3cachefs.cache.fetcher import Fetcher
from s3cachefs.cache.flights import Flight
from s3cachefs.cache.ledger import Record, Victim
from s3cachefs.store.checksums import Check
from s3cachefs.store.rangeget import RangeGetter

log = logging.getLogger(__name__)

# Jobs out at most while a read waits on S3. One, not one per worker: p50 first byte
# during a prefetch 1.17x, 1.17x, 2.67x idle against 2.03x, 1.85x, 1.76x with two
# (`python -m bench --small --profile local --only readsfirst`, 2 cores, load 3-5).
READS_FIRST_JOBS = 1
_Queued = tuple["_Waiting", Done, bool]  # accepted, not yet indexed: (waiting, done, new)


@dataclass
class _Waiting:
    job: Job
    version: ObjectVersion
    run: range
    flights: list[Flight]
    event: trio.Event = field(default_factory=trio.Event)
    done: Done | None = None
    record: Record | None = None  # the one its rows are for (`_accept`)


def _write(queued: _Queued) -> Write:
    return queued[0].version.oid, queued[0].run


class BulkEngine:
    """Worker processes for prefetch runs; the rows, reservations and flights stay here."""

    def __init__(self, fetcher: Fetcher, *, workers: int, threads: int) -> None:
        self.store: Any = fetcher.store
        self.ledger = fetcher.ledger
        self.flights = fetcher.flights
        self.disk = fetcher.disk
        self.bounds = fetcher.bounds
        self.stats = fetcher.stats
        self.disk_limiter = fetcher.disk_limiter
        self.missing_runs = fetcher.missing_runs
        self.reads_waiting = fetcher.reads_waiting
        self._waiting: dict[JobKey, _Waiting] = {}
        self._queued: list[_Queued] = []
        self._wanted = trio.Event()  # something is queued
        self._committing = False  # while `_committer` runs
        # Blocking work that rides on the next commit's thread call (`Rider`).
        self.riders: list[Rider] = []
        self.pool = WorkerPool(
            size=workers,
            threads=threads,
            getter=self._getter,
            on_batch=self._commit,
            on_lost=self._lost,
            on_unsent=self._unsent,
        )

    @property
    def pids(self) -> list[int]:
        return self.pool.pids

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the workers (stopped on the way out) and the commits of their results."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer)
            await nursery.start(self.pool.run)
            task_status.started()

    def start_workers(self) -> None:
        """Start `bulkpool.BOOT_WORKERS` with the daemon, not on a prefetch's first job
        (which would wait for them after its listing); the rest start on that job.
        Cheap since they import no botocore (the daemon sends them frozen credentials):
        spawn to ready 0.08-0.14 s, 0.08-0.10 CPU-s and 14 MiB unique RSS each, was
        0.24-0.29 s, 0.22 CPU-s and 27 MiB (2 cores, load 2.8); started on the prefetch
        request instead, before its listing, they could still delay a loopback
        prefetch's first GET by ~0.1 s. Idle, they wait on their socket."""
        self.pool.ready(self.ledger.block_size, boot=True)

    def _getter(self) -> RangeGetter | None:
        getter = getattr(self.store, "range_getter", None)
        return getter if isinstance(getter, RangeGetter) else None

    def _lost(self, keys: list[JobKey]) -> None:
        """A worker died with these jobs: the callers run them in the daemon."""
        for key in keys:
            waiting = self._waiting.get(key)
            if waiting is not None:
                job = waiting.job
                done = Done(job.oid, job.start, job.end, error="bulk worker died", lost=True)
                self._release(waiting, done)

    def _unsent(self, job: Job, error: str) -> None:
        """A job that never went out: its caller gets a CredentialsError."""
        waiting = self._waiting.get((job.oid, job.start))
        if waiting is not None:
            done = Done(job.oid, job.start, job.end, error=error, error_kind="CredentialsError")
            self._release(waiting, done)

    # ---- one run -----------------------------------------------------------

    async def fetch(self, version: ObjectVersion, run: range, check: Check | None) -> Done | None:
        """Fetch ``run`` (missing blocks) of ``version`` onto disk in a worker, indexed.

        ``check``: the digest to compute if the run is the whole object. None: not
        done here (workers off or lost, blocks cached or in flight meanwhile, no room):
        the caller uses the in-daemon path. Raises StoreError if S3 refused the run.
        """
        # Reads go first: while one waits on S3 (or did a moment ago), the jobs out
        # drain down to one before another goes: the link, the server and the cores
        # are the reads'; that one job keeps the prefetch going under any stream of reads.
        # A pending delete of the run is waited for first: woken by a job's end, this
        # task would otherwise sit in it with the free slot, and nobody else woken.
        await self.ledger.deleting.settled([(version.oid, run)])
        await self.reads_waiting.give_way(lambda: self.pool.held >= READS_FIRST_JOBS)
        try:
            waiting = await self._dispatch(version, run, check)
        except BaseException:
            self.reads_waiting.nudge()  # not sent: the slot it was woken for is another's
            raise
        if waiting is None:
            self.reads_waiting.nudge()
            return None
        # Cancelled here, the job still ends (answered, or its worker dies): settled then.
        await waiting.event.wait()
        done = waiting.done
        assert done is not None
        if done.lost:
            return None
        if done.error_kind == "CredentialsError":
            raise CredentialsError(done.error)
        if done.error:
            raise error_of(done)
        return done

    async def _dispatch(
        self, version: ObjectVersion, run: range, check: Check | None
    ) -> _Waiting | None:
        """Register and send the job of ``run``; None if it is not for a worker."""
        # Again (none began meanwhile, as a rule: no checkpoint): its worker writes its file.
        await self.ledger.deleting.settled([(version.oid, run)])
        if not self.pool.ready(self.ledger.block_size) or self.missing_runs(version, run) != [run]:
            return None
        block_size = self.ledger.block_size
        start, end = run.start * block_size, min(run.stop * block_size, version.size)
        victims, fits = self.ledger.reserve(end - start, self.bounds)
        if not fits:
            if victims:
                await self._evict(victims)
            return None
        # Evict before anything is registered: this await may be cancelled or fail.
        if victims:
            try:
                await self._evict(victims)
            except Exception as exc:  # noqa: BLE001  a full or locked index: the daemon's path
                self.ledger.unreserve(end - start)
                log.warning("cache could not evict for a bulk job: %s", exc)
                return None
            except BaseException:
                self.ledger.unreserve(end - start)
                raise
        worker = self.pool.least_busy()
        if worker is None or self.missing_runs(version, run) != [run]:  # changed meanwhile
            self.ledger.unreserve(end - start)
            return None
        # From here to `pool.send` nothing awaits: the job is registered and sent, or neither.
        oid = version.oid
        flights = [self.flights.start((oid, idx), Flight(remember=False)) for idx in run]
        whole = start == 0 and end == version.size
        job = Job(oid, version.key, version.etag, version.size, start, end,
                  str(self.disk.layout.path(oid)), check if whole else None)  # fmt: skip
        waiting = _Waiting(job, version, run, flights)
        self._waiting[(oid, start)] = waiting
        self.pool.send(worker, job)
        return waiting

    async def _evict(self, victims: list[Victim]) -> None:
        try:
            await trio.to_thread.run_sync(self.disk.evict, victims, limiter=self.disk_limiter)
        except BaseException:  # their bytes, counted as freed, may still be on the disk
            self.ledger.recount_free()
            raise
        finally:
            self.ledger.evicted(victims)

    def _commit(self, batch: list[Done]) -> None:
        """A batch of finished jobs to index (by `_committer`); those that failed released."""
        self._queued += [g for done in batch if (g := self._accept(done)) is not None]
        if not self._committing:  # stopped (or not started): nothing will index them
            good, self._queued = self._queued, []
            self._settle(good, [False] * len(good))
        elif self._queued:
            self._wanted.set()

    async def _committer(self) -> None:
        """Index what the workers finished, one commit at a time: what comes in while one
        is in its thread (from any worker: their readers never wait on it) goes together
        in the next, in one transaction, with the work riding on commits (`riders`): one
        trio<->thread hop where there were two or three (and one back into trio between
        the rows and the work, when a rider wants to ride: `_index_then`)."""
        self._committing = True
        try:
            while True:
                await self._wanted.wait()
                self._wanted = trio.Event()
                while self._queued:
                    # A run whose delete is pending waits for a later commit, and not in
                    # one (that commit would wait for it, and every run behind it).
                    good, self._queued = self.ledger.deleting.hold_back(self._queued, _write)
                    if good:
                        await self._commit_now(good)
                    else:  # every run waits: until a delete ends or new runs come
                        await self.ledger.deleting.one_ends_or(self._wanted)
                        self._wanted = trio.Event()
        finally:  # the engine stops: what was not indexed is given back
            self._committing = False
            good, self._queued = self._queued, []
            self._settle(good, [False] * len(good))

    async def _commit_now(self, good: list[tuple[_Waiting, Done, bool]]) -> None:
        rows = [(w.version, new, w.run.start, d.crcs, d.inode) for w, d, new in good]
        asking = [rider for rider in self.riders if wants(rider)]
        rides: list[Ride] = []
        orphans: list[tuple[str, list[int]]] | None = None  # once settled

        def indexed(kept: list[bool]) -> list[Ride]:
            # From the thread, once the rows are committed and before the rides' work (a
            # first prefetch's links: 1.1 s for 4,000 under a journal stall): the readers
            # and fetches waiting on these rows go now; then the riders are asked.
            nonlocal orphans
            orphans = []
            orphans += self._settle(good, kept)
            for rider in asking:
                if rider not in self.riders:  # left meanwhile (its task was cancelled)
                    continue
                try:
                    if (ride := rider.ride()) is not None:
                        rides.append(ride)
                except Exception:  # a rider's bug: its own loss, not the rows'
                    log.exception("a rider of a bulk commit failed")
            return rides

        try:
            # Deletes of these objects taken off the books before go first (`cache.deleting`):
            # landing after the rows, they would take them (and the file) from the books'
            # blocks. After them the inode check sees a file they removed.
            await self.ledger.deleting.settled((w.version.oid, w.run) for w, _, _ in good)
            kept = await trio.to_thread.run_sync(
                index_then, self.disk.index_written, rows, indexed if asking else None,
                limiter=self.disk_limiter,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001  a full index DB, a sqlite timeout: none indexed
            self.stats.counts["disk_errors"] += 1
            log.warning("cache could not index %d fetched runs: %s", len(rows), exc)
            kept = [False] * len(rows)
        except BaseException:  # cancelled before the thread ran: nothing indexed
            if orphans is None:
                self._settle(good, [False] * len(rows))
            raise
        finally:
            for _, then in rides:
                try:  # each runs (for `PreStages`, its lock's release), whatever one raises
                    then()
                except Exception:
                    log.exception("a rider of a bulk commit failed after its ride")
        limiter = self.disk_limiter
        for oid, blocks in self._settle(good, kept) if orphans is None else orphans:
            record = self.ledger.record(oid)
            # Made anew meanwhile (another fetch): its object row and file are its own, and
            # only the run's block rows it does not hold go; else the object's rows and file.
            held = None if record is None else record.blocks
            try:
                await drop_written(
                    self.ledger.deleting, self.disk, oid, held, blocks, limiter=limiter
                )
            except Exception as exc:  # noqa: BLE001  the rows stay, unserved: no ledger record
                log.warning("cache could not drop the rows of %s: %s", oid, exc)

    def _accept(self, done: Done) -> tuple[_Waiting, Done, bool] | None:
        """A finished job to index (its waiting, done, new object), or None: released."""
        key = (done.oid, done.start)
        self.stats.counts["bulk_gets"] += done.attempts  # the workers' S3 requests
        waiting = self._waiting.get(key)
        if waiting is None:
            return None
        if done.error:
            # The cache's disk failed it, or the credentials it was signed with expired
            # meanwhile: the in-daemon path tries (its credential chain refreshes).
            done.lost = done.error_kind in ("DiskError", EXPIRED)
            self._release(waiting, done)
            return None
        check = waiting.job.check
        if check is not None and not done.matches:
            # Maybe wrong bytes (CRCs of them), maybe a check that does not apply (SSE-KMS,
            # guessed parts): never indexed; the in-daemon path fetches it, checked its way.
            log.warning("bulk job of %s: not %s; fetched again", done.oid, check.describe())
            done.error, done.lost = "the digest does not match", True
            self._release(waiting, done)
            return None
        if len(done.crcs) != len(waiting.run):  # a worker's bug: rows for blocks it did not own
            log.warning("bulk job of %s: %d CRCs for %d blocks", done.oid, len(done.crcs),
                        len(waiting.run))  # fmt: skip
            done.error, done.lost = "the worker's CRCs do not match its run", True
            self._release(waiting, done)
            return None
        record = self.ledger.record(done.oid)
        new = record is None
        waiting.record = self.ledger.new_record(waiting.version) if new else record
        return waiting, done, new

    def _settle(
        self, good: list[tuple[_Waiting, Done, bool]], kept: list[bool]
    ) -> list[tuple[str, list[int]]]:
        """Index in the ledger what the disk kept, release the rest; the rows to drop."""
        orphans: list[tuple[str, list[int]]] = []
        for (waiting, done, new), ok in zip(good, kept, strict=True):
            # Only into the record it was accepted for: one made anew after a whole delete
            # (during the commit's thread) has a file without these bytes.
            record = self.ledger.record(done.oid)
            if ok and record is not None and record is waiting.record:
                record.indexed = True  # a kept run's object row is in its commit
                self.ledger.add_blocks(record, dict(zip(waiting.run, done.crcs, strict=True)))
                self.stats.counts["blocks_from_s3"] += len(done.crcs)
                self.stats.counts["bytes_from_s3"] += done.end - done.start
                self._finish(waiting, done)
                continue
            if ok:  # indexed, but the object left the cache meanwhile: its rows go too
                orphans.append((done.oid, list(waiting.run)))
                done.error = "the object left the cache while it was written"
            else:
                done.error = "the cache file changed while it was written, or was not indexed"
                if new and record is not None and record is waiting.record and not record.blocks:
                    self.ledger.discard(done.oid)
            done.lost = True
            self._release(waiting, done)
        return orphans

    def _release(self, waiting: _Waiting, done: Done) -> None:
        """A job that indexed nothing: its bytes back, its flights given up."""
        self.ledger.unreserve(done.end - done.start)
        self._finish(waiting, done)

    def _finish(self, waiting: _Waiting, done: Done) -> None:
        # No data and no error: a reader waiting on one of these blocks looks again
        # (on disk now, or missing: its own GET).
        self._waiting.pop((done.oid, done.start), None)
        for idx, flight in zip(waiting.run, waiting.flights, strict=True):
            flight.finish(None)
            self.flights.end((done.oid, idx))
        waiting.done = done
        waiting.event.set()
        self.reads_waiting.nudge()  # one job fewer out: one held back may go

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
  transaction, and only if the file the worker wrote is still the object's
  (its inode): bytes no row points at are never served, and a file no object
  row points at is swept at start, so a ``kill -9`` at any point loses only
  unindexed bytes;
- a job that fails gives its reservation back and its flights up (a waiting
  reader starts its own GET); a worker that dies loses its jobs, which the
  caller runs on the in-daemon path (`fetch` returns None), as it does for
  every job while the workers cannot start or the store has no lean GET path.

Workers start on the first job and stop with the cache's nursery (they also
die with the daemon: ``PR_SET_PDEATHSIG``, and the socket's EOF).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import trio

from s3cachefs.cache.blocks import ObjectVersion
from s3cachefs.cache.bulkworker import Done, Endpoint, Job, Secrets, error_of
from s3cachefs.cache.fetcher import Fetcher
from s3cachefs.cache.flights import Flight
from s3cachefs.store.checksums import Check
from s3cachefs.store.rangeget import RangeGetter

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    job: Job
    version: ObjectVersion
    run: range
    flights: list[Flight]
    event: trio.Event = field(default_factory=trio.Event)
    done: Done | None = None


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    jobs: set[tuple[str, int]] = field(default_factory=set)  # (oid, start) outstanding
    alive: bool = True


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
        self.workers = workers  # 0: off (the in-daemon path)
        self.threads = max(1, threads)  # GETs at once in each worker
        self._pool: list[_Worker] = []
        self._waiting: dict[tuple[str, int], _Waiting] = {}
        self._outbox: list[tuple[_Worker, Job]] = []  # sent once the trio tick ends
        self._flush_pending = False
        self._nursery: trio.Nursery | None = None
        self._cannot_start = False  # logged once; the in-daemon path serves
        self._deaths = 0  # workers replaced at most `workers` times: then the daemon's path

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool if w.alive]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks reading the workers' results; stop the workers on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.stop()

    def stop(self) -> None:
        for worker in self._pool:
            worker.conn.close()  # EOF: the worker exits
            if worker.proc.poll() is None:
                worker.proc.kill()  # nothing of it is indexed: its bytes are lost, not wrong
            worker.proc.wait()
        self._pool.clear()

    # ---- workers -------------------------------------------------------------

    def _getter(self) -> RangeGetter | None:
        getter = getattr(self.store, "range_getter", None)
        return getter if isinstance(getter, RangeGetter) else None

    def _ready(self) -> bool:
        """Whether jobs can go to workers now (starting them, or new ones for dead ones)."""
        getter = self._getter()
        if self.workers < 1 or self._cannot_start or self._nursery is None or getter is None:
            return False
        alive = sum(w.alive for w in self._pool)
        if alive == self.workers or (alive and self._deaths > self.workers):
            return True
        if self._deaths > self.workers:
            return False
        endpoint = Endpoint(
            getter.base_url,
            getter.region,
            timeout=getter.read_timeout,
            attempts=getter.attempts,
            ca_bundle=getter.ca_bundle,
        )
        self._pool = [w for w in self._pool if w.alive or w.jobs]
        try:
            while sum(w.alive for w in self._pool) < self.workers:
                self._pool.append(self._spawn(endpoint))
        except OSError as exc:
            self._cannot_start = True
            log.warning("bulk workers cannot start (%s); prefetch runs in the daemon", exc)
            self.stop()
            return False
        return True

    def _spawn(self, endpoint: Endpoint) -> _Worker:
        ours, theirs = socket.socketpair()
        with theirs:
            proc = subprocess.Popen(  # on the trio thread: PR_SET_PDEATHSIG follows this thread
                [sys.executable, "-m", "s3cachefs.cache.bulkworker", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        conn = Connection(ours.detach())
        conn.send((endpoint, self.ledger.block_size, self.threads))
        worker = _Worker(proc, conn)
        assert self._nursery is not None
        self._nursery.start_soon(self._read, worker)
        log.info("bulk worker pid=%d started", proc.pid)
        return worker

    async def _read(self, worker: _Worker) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(worker.conn.fileno())
                batch: list[Done] = worker.conn.recv()
            except (EOFError, OSError):
                self._died(worker)
                return
            except Exception:  # a message that does not unpickle: the worker is broken
                log.exception("bulk worker pid=%d sent a bad message", worker.proc.pid)
                self._died(worker)
                return
            await self._commit(batch, worker)

    def _died(self, worker: _Worker) -> None:
        worker.alive = False
        self._deaths += 1
        if worker.proc.poll() is None:
            worker.proc.kill()
        code = worker.proc.wait()
        lost = [self._waiting[k] for k in worker.jobs if k in self._waiting]
        log.warning(
            "bulk worker pid=%d ended (status %d) with %d jobs; they run in the daemon",
            worker.proc.pid,
            code,
            len(lost),
        )
        worker.jobs.clear()
        for waiting in lost:
            job = waiting.job
            done = Done(job.oid, job.start, job.end, error="bulk worker died", lost=True)
            self._release(waiting, done)

    def _send(self, worker: _Worker, job: Job) -> None:
        """Queue a job for a worker; everything queued in this trio tick goes in one message."""
        self._outbox.append((worker, job))
        if not self._flush_pending:
            self._flush_pending = True
            assert self._nursery is not None
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        self._flush_pending = False
        getter = self._getter()
        secrets: Secrets | None = None if getter is None else getter.secrets()
        by_worker: dict[int, tuple[_Worker, list[Job]]] = {}
        for worker, job in self._outbox:
            by_worker.setdefault(id(worker), (worker, []))[1].append(job)
        self._outbox.clear()
        for worker, jobs in by_worker.values():
            if worker.alive:
                with contextlib.suppress(OSError):  # its reader sees the EOF, gives them back
                    worker.conn.send((secrets, jobs))

    # ---- one run -----------------------------------------------------------

    async def fetch(self, version: ObjectVersion, run: range, check: Check | None) -> Done | None:
        """Fetch ``run`` (missing blocks) of ``version`` onto disk in a worker, indexed.

        ``check``: the digest to compute if the run is the whole object. None: not
        done here (workers off or lost, blocks cached or in flight meanwhile, no room):
        the caller uses the in-daemon path. Raises StoreError if S3 refused the run.
        """
        if not self._ready() or self.missing_runs(version, run) != [run]:
            return None
        block_size = self.ledger.block_size
        start, end = run.start * block_size, min(run.stop * block_size, version.size)
        victims, fits = self.ledger.reserve(end - start, self.bounds)
        if not fits:
            if victims:
                await trio.to_thread.run_sync(self.disk.evict, victims, limiter=self.disk_limiter)
            return None
        oid = version.oid
        flights = [self.flights.start((oid, idx), Flight(remember=False)) for idx in run]
        worker = min((w for w in self._pool if w.alive), key=lambda w: len(w.jobs))
        whole = start == 0 and end == version.size
        job = Job(oid, version.key, version.etag, version.size, start, end,
                  str(self.disk.layout.path(oid)), check if whole else None)  # fmt: skip
        waiting = _Waiting(job, version, run, flights)
        self._waiting[(oid, start)] = waiting
        worker.jobs.add((oid, start))
        if victims:
            await trio.to_thread.run_sync(self.disk.evict, victims, limiter=self.disk_limiter)
        self._send(worker, job)
        await waiting.event.wait()
        done = waiting.done
        assert done is not None
        if done.lost:
            return None
        if done.error:
            raise error_of(done)
        return done

    async def _commit(self, batch: list[Done], worker: _Worker) -> None:
        """Index a batch of finished jobs in one transaction; wake their callers."""
        good: list[tuple[_Waiting, Done, bool]] = []
        for done in batch:
            key = (done.oid, done.start)
            worker.jobs.discard(key)
            self.stats.counts["bulk_gets"] += done.attempts  # the workers' S3 requests
            waiting = self._waiting.get(key)
            if waiting is None:
                continue
            if done.error:
                # The cache's disk failed it: the in-daemon path tries, and says so.
                done.lost = done.error_kind == "DiskError"
                self._release(waiting, done)
                continue
            new = done.oid not in self.ledger
            if new:
                self.ledger.new_record(waiting.version)
            good.append((waiting, done, new))
        if not good:
            return
        rows = [(w.version, new, w.run.start, d.crcs, d.inode) for w, d, new in good]
        try:
            kept = await trio.to_thread.run_sync(
                self.disk.index_written, rows, limiter=self.disk_limiter
            )
        except (OSError, sqlite3.Error) as exc:  # a full index DB: nothing of it is indexed
            log.warning("cache could not index %d fetched runs: %s", len(rows), exc)
            kept = [False] * len(rows)
        for (waiting, done, new), ok in zip(good, kept, strict=True):
            record = self.ledger.record(done.oid)
            if ok and record is not None:
                self.ledger.add_blocks(record, dict(zip(waiting.run, done.crcs, strict=True)))
                self.stats.counts["blocks_from_s3"] += len(done.crcs)
                self.stats.counts["bytes_from_s3"] += done.end - done.start
                self._finish(waiting, done)
                continue
            if new and record is not None and not record.blocks:
                self.ledger.discard(done.oid)
            done.error, done.lost = "the cache file changed while it was written", True
            self._release(waiting, done)

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

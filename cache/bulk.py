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
import subprocess
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import trio

from s3cachefs.base.errors import CredentialsError
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
        """Stop every worker; their outstanding jobs are given back (no reader waits on them)."""
        for worker in self._pool:
            if not worker.conn.closed:
                # Its reader task may be parked on the fd: wake it before the fd goes.
                trio.lowlevel.notify_closing(worker.conn.fileno())
                worker.conn.close()  # EOF: the worker exits
            self._died(worker)  # nothing of it is indexed: its bytes are lost, not wrong
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
        try:
            with theirs:
                # -P: the daemon's cwd is not on the worker's sys.path (it gets the secrets).
                proc = subprocess.Popen(  # on the trio thread: PR_SET_PDEATHSIG follows it
                    [sys.executable, "-P", "-m", "s3cachefs.cache.bulkworker",
                     str(theirs.fileno()), str(os.getpid())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        conn = Connection(ours.detach())
        try:
            conn.send((endpoint, self.ledger.block_size, self.threads))
        except BaseException:
            conn.close()
            proc.kill()
            proc.wait()
            raise
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
            except trio.ClosedResourceError:  # `stop` closed it and gave its jobs back
                return
            except (EOFError, OSError):
                self._died(worker)
                return
            except Exception:  # a message that does not unpickle: the worker is broken
                log.exception("bulk worker pid=%d sent a bad message", worker.proc.pid)
                self._died(worker)
                return
            await self._commit(batch, worker)

    def _died(self, worker: _Worker) -> None:
        if not worker.alive:
            return
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
        outbox, self._outbox = self._outbox, []  # jobs queued while we wait: the next flush
        getter = self._getter()
        try:
            # A refresh may be an STS/IMDS round trip: not on the trio thread.
            secrets: Secrets | None = (
                None if getter is None else await trio.to_thread.run_sync(getter.secrets)
            )
        except Exception as exc:  # noqa: BLE001  no credentials: these jobs fail, not the daemon
            log.warning("bulk jobs not sent: no credentials (%s)", exc)
            for worker, job in outbox:
                self._fail(worker, job, f"no credentials for the bulk workers: {exc}")
            return
        by_worker: dict[int, tuple[_Worker, list[Job]]] = {}
        for worker, job in outbox:
            by_worker.setdefault(id(worker), (worker, []))[1].append(job)
        for worker, jobs in by_worker.values():
            if worker.alive:
                with contextlib.suppress(OSError):  # its reader sees the EOF, gives them back
                    worker.conn.send((secrets, jobs))

    def _fail(self, worker: _Worker, job: Job, error: str) -> None:
        """A job that never went out: its caller gets a CredentialsError."""
        key = (job.oid, job.start)
        worker.jobs.discard(key)
        waiting = self._waiting.get(key)
        if waiting is not None:
            self._release(waiting, Done(*key, job.end, error=error, error_kind="CredentialsError"))

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
        # Evict before anything is registered: this await may be cancelled or fail.
        if victims:
            try:
                await trio.to_thread.run_sync(self.disk.evict, victims, limiter=self.disk_limiter)
            except Exception as exc:  # noqa: BLE001  a full or locked index: the daemon's path
                self.ledger.unreserve(end - start)
                log.warning("cache could not evict for a bulk job: %s", exc)
                return None
            except BaseException:
                self.ledger.unreserve(end - start)
                raise
        pool = [w for w in self._pool if w.alive]
        if not pool or self.missing_runs(version, run) != [run]:  # changed while we evicted
            self.ledger.unreserve(end - start)
            return None
        # From here to `_send` nothing awaits: the job is registered and sent, or neither.
        oid = version.oid
        flights = [self.flights.start((oid, idx), Flight(remember=False)) for idx in run]
        worker = min(pool, key=lambda w: len(w.jobs))
        whole = start == 0 and end == version.size
        job = Job(oid, version.key, version.etag, version.size, start, end,
                  str(self.disk.layout.path(oid)), check if whole else None)  # fmt: skip
        waiting = _Waiting(job, version, run, flights)
        self._waiting[(oid, start)] = waiting
        worker.jobs.add((oid, start))
        self._send(worker, job)
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

    async def _commit(self, batch: list[Done], worker: _Worker) -> None:
        """Index a batch of finished jobs in one transaction; wake their callers."""
        good = [g for done in batch if (g := self._accept(done, worker)) is not None]
        if not good:
            return
        rows = [(w.version, new, w.run.start, d.crcs, d.inode) for w, d, new in good]
        try:
            kept = await trio.to_thread.run_sync(
                self.disk.index_written, rows, limiter=self.disk_limiter
            )
        except Exception as exc:  # noqa: BLE001  a full index DB, a sqlite timeout: none indexed
            self.stats.counts["disk_errors"] += 1
            log.warning("cache could not index %d fetched runs: %s", len(rows), exc)
            kept = [False] * len(rows)
        except BaseException:  # cancelled before the thread ran: nothing indexed
            self._settle(good, [False] * len(rows))
            raise
        limiter = self.disk_limiter
        for oid, blocks in self._settle(good, kept):
            if oid in self.ledger:  # back meanwhile (another fetch): the rows are its own now
                continue
            try:
                await trio.to_thread.run_sync(self.disk.free, oid, blocks, limiter=limiter)
            except Exception as exc:  # noqa: BLE001  the rows stay, unserved: no ledger record
                log.warning("cache could not drop the rows of %s: %s", oid, exc)

    def _accept(self, done: Done, worker: _Worker) -> tuple[_Waiting, Done, bool] | None:
        """A finished job to index (its waiting, done, new object), or None: released."""
        key = (done.oid, done.start)
        worker.jobs.discard(key)
        self.stats.counts["bulk_gets"] += done.attempts  # the workers' S3 requests
        waiting = self._waiting.get(key)
        if waiting is None:
            return None
        if done.error:
            # The cache's disk failed it: the in-daemon path tries, and says so.
            done.lost = done.error_kind == "DiskError"
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
        new = done.oid not in self.ledger
        if new:
            self.ledger.new_record(waiting.version)
        return waiting, done, new

    def _settle(
        self, good: list[tuple[_Waiting, Done, bool]], kept: list[bool]
    ) -> list[tuple[str, list[int]]]:
        """Index in the ledger what the disk kept, release the rest; the rows to drop."""
        orphans: list[tuple[str, list[int]]] = []
        for (waiting, done, new), ok in zip(good, kept, strict=True):
            record = self.ledger.record(done.oid)
            if ok and record is not None:
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
                if new and record is not None and not record.blocks:
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

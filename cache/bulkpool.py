"""The bulk workers' processes: spawned, fed jobs in batches, read, replaced, stopped.

`WorkerPool` owns the worker processes (`cache.bulkworker`) and their sockets,
and knows which jobs each one holds; what a job means (its reservation, its
flights, its rows) is the engine's (`cache.bulk`), told through three callbacks:
a batch of results came in, a worker died with these jobs, a job could not be sent.

- Up to `BOOT_WORKERS` start with the daemon (`ready(boot=True)`, once the cache's
  block size is known), the rest on the first job (``auto`` is one per usable CPU:
  a mount that never prefetches keeps two); they are replaced when they die, at
  most ``size`` times; after that, or when one cannot start on a job, the pool says
  it is not ready and the caller uses the in-daemon path (a failure at boot is
  tried again on the first job; one while growing past live workers, none dead
  yet, shrinks ``size`` to them instead).
- A worker gets a minimal environment (`worker_env`): not the daemon's secrets.
- Jobs queued in one trio tick go to a worker in one message, with the
  credentials frozen in a thread (a refresh may be an STS/IMDS round trip) when
  they may have changed since (`RangeGetter.known_secrets`), else as last frozen.
- Results are read on the trio thread (no thread hand-off per block).
- They stop with the engine's nursery; they also die with the daemon
  (``PR_SET_PDEATHSIG``, and the socket's EOF).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import trio

from s3cachefs.cache.bulkworker import NICE, Done, Endpoint, Job, WireSecrets
from s3cachefs.store.rangeget import RangeGetter

log = logging.getLogger(__name__)

BOOT_WORKERS = 2  # started with the daemon; the rest on the first job
# A worker is niced before its imports (most of its start's CPU), and imports its module
# by that name, so that the Done it sends unpickles as the daemon's.
LAUNCH = (
    f"import os; os.nice({NICE}); import sys, s3cachefs.cache.bulkworker as w; "
    "sys.exit(w.main(sys.argv))"
)
STOP_SECONDS = 0.5  # a worker's own exit on its socket's EOF, before a SIGKILL
# What a worker may see of the daemon's environment: how to run Python, find its user
# site and CAs; not AWS_SECRET_ACCESS_KEY and the like (credentials come over its socket).
WORKER_ENV = (
    "PATH",
    "LD_LIBRARY_PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "HOME",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONNOUSERSITE",
    "PYTHONWARNINGS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "TMPDIR",
)


def worker_env(environ: Mapping[str, str], path: Sequence[str]) -> dict[str, str]:
    """A worker's environment: `WORKER_ENV`, and the daemon's ``sys.path`` as its
    PYTHONPATH, so it imports what the daemon imported (a ``pip --user`` or PYTHONPATH
    install, which ``-P -c`` alone does not find). Absolute entries only: an empty or
    relative one is the worker's cwd, which ``-P`` keeps off its path."""
    env = {k: v for k in WORKER_ENV if (v := environ.get(k)) is not None}
    dirs = [p for p in path if os.path.isabs(p) and os.pathsep not in p]
    if dirs:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(dirs))
    return env


JobKey = tuple[str, int]  # (oid, start): one job of one object version


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    jobs: set[JobKey] = field(default_factory=set)  # outstanding
    alive: bool = True


class WorkerPool:
    """Worker processes and the jobs each one holds; the jobs' meaning is the engine's."""

    def __init__(
        self,
        *,
        size: int,
        threads: int,
        getter: Callable[[], RangeGetter | None],
        on_batch: Callable[[list[Done]], None],
        on_lost: Callable[[list[JobKey]], None],
        on_unsent: Callable[[Job, str], None],
    ) -> None:
        self.size = size  # 0: off (the in-daemon path)
        self.threads = max(1, threads)  # GETs at once in each worker
        self._getter = getter
        self._on_batch = on_batch  # results of jobs the pool no longer counts as held
        self._on_lost = on_lost  # jobs of a worker that died: never answered
        self._on_unsent = on_unsent  # a job that never went out (no credentials)
        self.workers: list[Worker] = []
        self._outbox: list[tuple[Worker, Job]] = []  # sent once the trio tick ends
        self._flush_pending = False
        self._nursery: trio.Nursery | None = None
        self._cannot_start = False  # logged once; the in-daemon path serves
        self._deaths = 0  # workers replaced at most `size` times: then the daemon's path

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.alive]

    @property
    def held(self) -> int:
        """Jobs sent (or queued) and not yet answered, over every worker."""
        return sum(len(w.jobs) for w in self.workers)

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

    def stop(self, grace: float = STOP_SECONDS) -> None:
        """Stop every worker; their outstanding jobs are given back (no reader waits on them).

        ``grace``: how long they may take to exit on their own (blocks the trio thread)."""
        for worker in self.workers:
            if not worker.conn.closed:
                # Its reader task may be parked on the fd: wake it before the fd goes.
                trio.lowlevel.notify_closing(worker.conn.fileno())
                worker.conn.close()  # EOF: the worker exits
        deadline = time.monotonic() + grace
        for worker in self.workers:
            if worker.alive:  # its own exit, not a SIGKILL, for a clean stop
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(max(0.0, deadline - time.monotonic()))
            self._died(worker, stopping=True)  # nothing of it is indexed: lost, not wrong
        self.workers.clear()

    def ready(self, block_size: int, *, boot: bool = False) -> bool:
        """Whether jobs can go to workers now (starting them, or new ones for dead ones).

        ``boot``: at the daemon's start, `BOOT_WORKERS` at most, and a failure to
        start one is not final (tried again on the first job)."""
        getter = self._getter()
        if self.size < 1 or self._cannot_start or self._nursery is None or getter is None:
            return False
        want = min(self.size, BOOT_WORKERS) if boot else self.size
        alive = sum(w.alive for w in self.workers)
        if alive >= want or (alive and self._deaths > self.size):
            return True
        if self._deaths > self.size:
            return False
        endpoint = Endpoint(
            getter.base_url,
            getter.region,
            timeout=getter.read_timeout,
            attempts=getter.attempts,
            ca_bundle=getter.ca_bundle,
        )
        self.workers = [w for w in self.workers if w.alive or w.jobs]
        try:
            while sum(w.alive for w in self.workers) < want:
                self.workers.append(self._spawn(endpoint, block_size))
        except OSError as exc:
            return self._cannot_spawn(exc, boot=boot)
        return True

    def _cannot_spawn(self, exc: OSError, *, boot: bool) -> bool:
        """Whether jobs can go to workers after one failed to start."""
        if boot:  # maybe transient (EAGAIN, ENOMEM): the first job tries again
            log.warning("bulk workers cannot start yet (%s); tried again on a prefetch", exc)
            return False
        alive = sum(w.alive for w in self.workers)
        # Growing past healthy ones (a pids or memory limit): fewer workers, not none, nor
        # a retry per job. A replacement that cannot start: workers fail, the daemon serves.
        if alive and not self._deaths:
            log.warning("bulk workers: %d of %d started (%s)", alive, self.size, exc)
            self.size = alive
            return True
        self._cannot_start = True
        log.warning("bulk workers cannot start (%s); prefetch runs in the daemon", exc)
        self.stop(grace=0)  # mid-job: reads wait on this thread, so no clean-exit wait
        return False

    def least_busy(self) -> Worker | None:
        pool = [w for w in self.workers if w.alive]
        return min(pool, key=lambda w: len(w.jobs)) if pool else None

    def _spawn(self, endpoint: Endpoint, block_size: int) -> Worker:
        ours, theirs = socket.socketpair()
        try:
            with theirs:
                # -P: the daemon's cwd is not on the worker's sys.path (it gets the secrets).
                proc = subprocess.Popen(  # on the trio thread: PR_SET_PDEATHSIG follows it
                    [sys.executable, "-P", "-c", LAUNCH, str(theirs.fileno()), str(os.getpid())],
                    pass_fds=(theirs.fileno(),),
                    env=worker_env(os.environ, sys.path),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        conn = Connection(ours.detach())
        try:
            conn.send((endpoint, block_size, self.threads))
        except BaseException:
            conn.close()
            proc.kill()
            proc.wait()
            raise
        worker = Worker(proc, conn)
        assert self._nursery is not None
        self._nursery.start_soon(self._read, worker)
        log.info("bulk worker pid=%d started", proc.pid)
        return worker

    async def _read(self, worker: Worker) -> None:
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
            for done in batch:
                worker.jobs.discard((done.oid, done.start))
            self._on_batch(batch)

    def _died(self, worker: Worker, *, stopping: bool = False) -> None:
        if not worker.alive:
            return
        worker.alive = False
        self._deaths += 1
        if worker.proc.poll() is None:
            worker.proc.kill()
        code = worker.proc.wait()
        lost = list(worker.jobs)
        if stopping:  # the daemon stops it: not news
            log.info("bulk worker pid=%d stopped (status %d)", worker.proc.pid, code)
        else:
            log.warning(
                "bulk worker pid=%d ended (status %d) with %d jobs; they run in the daemon",
                worker.proc.pid,
                code,
                len(lost),
            )
        worker.jobs.clear()
        self._on_lost(lost)

    def send(self, worker: Worker, job: Job) -> None:
        """Queue a job for a worker; everything queued in this trio tick goes in one message."""
        worker.jobs.add((job.oid, job.start))
        self._outbox.append((worker, job))
        if not self._flush_pending:
            self._flush_pending = True
            assert self._nursery is not None
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        self._flush_pending = False
        outbox, self._outbox = self._outbox, []  # jobs queued while we wait: the next flush
        getter = self._getter()
        secrets: WireSecrets = None
        try:
            if getter is not None:
                known = getter.known_secrets()
                # Not known: a refresh may be an STS/IMDS round trip, not on the trio thread.
                secrets = await trio.to_thread.run_sync(getter.secrets) if known is False else known
        except Exception as exc:  # noqa: BLE001  no credentials: these jobs fail, not the daemon
            log.warning("bulk jobs not sent: no credentials (%s)", exc)
            for worker, job in outbox:
                worker.jobs.discard((job.oid, job.start))
                self._on_unsent(job, f"no credentials for the bulk workers: {exc}")
            return
        by_worker: dict[int, tuple[Worker, list[Job]]] = {}
        for worker, job in outbox:
            by_worker.setdefault(id(worker), (worker, []))[1].append(job)
        for worker, jobs in by_worker.values():
            if worker.alive:
                with contextlib.suppress(OSError):  # its reader sees the EOF, gives them back
                    worker.conn.send((secrets, jobs))

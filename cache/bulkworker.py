"""The bulk path's worker side: jobs (`cache.bulkjob`) run off the daemon's interpreter.

A prefetch moves thousands of objects; done block by block inside the daemon
(one thread hand-off per GET, one per block write, one per block back to trio,
a re-read to verify) it saturates one core. Here threads run `cache.bulkjob.fetch`
(a checked ranged GET ``pwrite``n into the cache file, block CRC32s and the
object's digest from the bytes written); the daemon (`cache.bulk`) decides,
indexes and pins: this module touches no index and no pin, and imports no trio.

Engines, same jobs, same results: `fetch_jobs` in the calling process (bench,
the reference), and `main`: a worker process (`cache.bulkpool.LAUNCH`) with
``threads`` GETs at once, jobs in and results out in batches over a socket. It
exits when the socket closes or its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from s3cachefs.base.errors import CredentialsError
from s3cachefs.cache.bulkconn import NO_CREDENTIALS, Endpoint, GetConnection
from s3cachefs.cache.bulkjob import EXPIRED, Done, Job, error_of, fetch
from s3cachefs.cache.bulksign import Secrets
from s3cachefs.cache.bulkwire import Channel

# Re-exported: the daemon side and the bench name them here.
__all__ = [
    "EXPIRED",
    "Done",
    "Endpoint",
    "Job",
    "Secrets",
    "WireSecrets",
    "error_of",
    "fetch_jobs",
]

BATCH_SECONDS = 0.005  # results wait this long at most to share a message
_PR_SET_PDEATHSIG = 1
# Bulk work yields the CPU to the daemon (reads go first) where the cores are contended.
NICE = 5

# Frozen credentials as sent to a worker: (access key, secret key, token); None: the
# daemon has none (`store.rangeget.RangeGetter.secrets`).
WireSecrets = tuple[str, str, str | None] | None


def fetch_jobs(
    endpoint: Endpoint, jobs: Iterable[Job], *, secrets: Secrets, block_size: int, threads: int
) -> Iterator[Done]:
    """Run ``jobs`` in this process, ``threads`` at once, signed with ``secrets``;
    results as they finish."""
    todo: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    out: queue.SimpleQueue[Done | None] = queue.SimpleQueue()
    credentials = [secrets]
    count = 0
    for job in jobs:
        todo.put(job)
        count += 1
    workers = [
        threading.Thread(target=_serve, args=(endpoint, credentials, block_size, todo, out))
        for _ in range(max(1, min(threads, count)))
    ]
    for worker in workers:
        todo.put(None)
        worker.start()
    for _ in range(count):
        done = out.get()
        assert done is not None
        yield done
    for worker in workers:
        worker.join()


def _serve(
    endpoint: Endpoint,
    credentials: list[Secrets],
    block_size: int,
    todo: queue.SimpleQueue[Job | None],
    out: queue.SimpleQueue[Done | None],
) -> None:
    conn = GetConnection(endpoint, credentials)
    buf = memoryview(bytearray(block_size))
    try:
        while (job := todo.get()) is not None:
            out.put(fetch(conn, job, block_size, buf))
    finally:
        conn.close()


# ---- the worker process -------------------------------------------------------


def _die_with_parent() -> None:
    """SIGKILL when the daemon dies (even by kill -9); the socket's EOF is the other way."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _send_results(conn: Channel, out: queue.SimpleQueue[Done | None]) -> None:
    try:
        while (first := out.get()) is not None:
            batch = [first]
            deadline = time.monotonic() + BATCH_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = out.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    conn.send(batch)
                    return
                batch.append(item)
            conn.send(batch)
    except OSError:
        os._exit(0)  # the daemon went away: nothing to answer to


def serve(conn: Channel) -> None:
    """A worker's life: (endpoint, block size, threads) first, then (secrets, jobs)
    messages; results go back in batches. EOF or None stops it.

    The daemon owns the credential chain (refreshes included): each message carries
    its frozen credentials, and every GET from then on is signed with them.
    """
    endpoint, block_size, threads = conn.recv()
    todo: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    out: queue.SimpleQueue[Done | None] = queue.SimpleQueue()
    credentials: list[Secrets] = []  # [the latest], read by every thread
    pool = [
        threading.Thread(
            target=_serve, args=(endpoint, credentials, block_size, todo, out), daemon=True
        )
        for _ in range(threads)
    ]
    sender = threading.Thread(target=_send_results, args=(conn, out), daemon=True)
    sender.start()
    started = False
    try:
        while (message := conn.recv()) is not None:
            secrets: WireSecrets
            secrets, jobs = message
            if secrets is None:  # the daemon has no credentials: these jobs fail, saying why
                kind = CredentialsError.__name__
                for job in jobs:
                    error = Done(job.oid, job.start, job.end, error=NO_CREDENTIALS)
                    error.error_kind = kind
                    out.put(error)
                continue
            credentials[:] = [Secrets(*secrets)]
            if not started:
                for thread in pool:
                    thread.start()
                started = True
            for job in jobs:
                todo.put(job)
    except (EOFError, OSError):
        os._exit(0)  # the daemon went away: nothing to answer to
    for _ in pool:
        todo.put(None)
    for thread in pool if started else []:
        thread.join()
    out.put(None)
    sender.join()


def main(argv: list[str]) -> int:
    # The daemon stops its workers: a terminal's Ctrl-C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _die_with_parent()  # niced already (`cache.bulkpool.LAUNCH`; ``-m``: below)
        conn = Channel(int(argv[1]))
        if os.getppid() != int(argv[2]):  # the daemon died before the prctl
            return 0
        serve(conn)
    except Exception as exc:  # noqa: BLE001  # one line for the daemon's log, not a traceback
        print(f"s3cachefs bulk worker pid={os.getpid()}: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.nice(NICE)  # ``python -m`` (the bench; `cache.bulkpool` runs `main` by ``-c``)
    sys.exit(main(sys.argv))

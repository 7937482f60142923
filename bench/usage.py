"""CPU seconds and peak RSS of a system under test: a process and all its descendants.

A bulk copy may be one process (s5cmd, rclone), a client plus a daemon
(``s3cachefs prefetch`` asks the mount's daemon), or a daemon plus worker
processes it starts. `Usage` polls the RSS of every process of the given
trees every 50 ms and keeps the peak of their sum ("peak RSS of all of them
together"). CPU is exact, not sampled: each process's user+system time plus
that of the children it reaped (``psutil``'s ``children_*``), so a helper
that exited counts through its parent; a root this process starts and reaps
itself (`popen`, `wait`) counts by the rusage ``wait4`` returns.

    usage = Usage([daemon_pid])
    proc = usage.popen([...])        # a helper process to count too
    usage.wait(proc)
    cpu, peak = usage.stop()
"""

from __future__ import annotations

import os
import subprocess
import threading
from typing import Any

import psutil

INTERVAL = 0.05


def _cpu(times: Any) -> float:
    """Own CPU plus that of the children it reaped."""
    return float(times.user + times.system + times.children_user + times.children_system)


def _sys(times: Any) -> float:
    """The kernel's part of `_cpu`."""
    return float(times.system + times.children_system)


class Usage:
    """CPU seconds and peak summed RSS of process trees, from now until ``stop``."""

    def __init__(self, pids: list[int] | None = None) -> None:
        self._lock = threading.Lock()
        self._roots: dict[int, psutil.Process] = {}
        self._start_cpu: dict[int, float] = {}
        self._start_sys: dict[int, float] = {}
        self.system = 0.0  # of the CPU seconds `stop` returns, those in the kernel
        self._waited: dict[int, float] = {}  # roots reaped by `wait`: their rusage
        self.peak_rss = 0
        for pid in pids or []:
            self.add(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        """Count this process (and whatever it starts) from now on."""
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            children = proc.children(recursive=True)
        except psutil.Error:
            return
        with self._lock:
            self._roots[pid] = proc
            self._start_cpu[pid], self._start_sys[pid] = _cpu(times), _sys(times)
            for child in children:  # already running: only their CPU from now on counts
                try:
                    times = child.cpu_times()
                except psutil.Error:
                    continue
                self._start_cpu[child.pid], self._start_sys[child.pid] = _cpu(times), _sys(times)

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(cmd, **kwargs)
        self.add(proc.pid)
        return proc

    def wait(self, proc: subprocess.Popen[Any]) -> int:
        """Reap a process started by `popen`, with its exact rusage; returns its exit code."""
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        with self._lock:
            self._waited[proc.pid] = rusage.ru_utime + rusage.ru_stime
            self.system += rusage.ru_stime
            self.peak_rss = max(self.peak_rss, rusage.ru_maxrss * 1024)  # alone, at least
        return proc.returncode

    def _tree(self) -> list[tuple[psutil.Process, bool]]:
        """(process, is a root) of every tree still running."""
        procs: list[tuple[psutil.Process, bool]] = []
        for pid, root in self._roots.items():
            if pid in self._waited:
                continue
            try:
                procs += [(root, True)] + [(c, False) for c in root.children(recursive=True)]
            except psutil.Error:
                continue
        return procs

    def _sample(self) -> None:
        with self._lock:
            total = 0
            for proc, _ in self._tree():
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, total)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self._sample()

    def stop(self) -> tuple[float, int]:
        """(CPU seconds, peak RSS bytes) of every tree since it was added.

        A descendant that exited was reaped by its parent: its CPU is in the
        parent's ``children_*`` (counted with the parent); one still running
        counts its own.
        """
        self._sample()
        self._stop.set()
        self._thread.join()
        cpu = sum(self._waited.values())
        with self._lock:
            for proc, _ in self._tree():
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                cpu += _cpu(times) - self._start_cpu.get(proc.pid, 0.0)
                self.system += _sys(times) - self._start_sys.get(proc.pid, 0.0)
        return cpu, self.peak_rss

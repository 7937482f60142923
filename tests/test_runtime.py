"""Runtime records across PID namespaces (containers): a pid is only meaningful in its own.

In a container the daemon is often PID 1, which exists in every container, so a
prefetch container (or a new daemon after a kill -9) must not judge a record of
another PID namespace by its pid: it asks the record's control socket instead.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from s3cachefs.daemon import runtime
from s3cachefs.daemon.runtime import MountRecord, all_records, pid_namespace, sweep_dead_records


@pytest.fixture
def rundir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(runtime, "runtime_dir", lambda: tmp_path)
    return tmp_path


@pytest.fixture
def listening(rundir: Path) -> Iterator[Path]:
    path = rundir / "mount-bbbbbbbbbbbbbbbb-1.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        yield path


def _record(rundir: Path, name: str, *, pid: int, pid_ns: int, sock: Path) -> Path:
    record = MountRecord(pid, f"/mnt/{name}", "bucket", "/cache", str(sock), pid_ns=pid_ns)
    path = rundir / f"mount-{name}.json"
    path.write_text(json.dumps(asdict(record)))
    return path


def _unused_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_record_of_another_pid_namespace_is_dead_when_its_socket_refuses(rundir: Path) -> None:
    other_ns = pid_namespace() + 1
    dead_sock = rundir / "mount-aaaaaaaaaaaaaaaa-1.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as closed:
        closed.bind(str(dead_sock))  # bound, never listening: what a killed daemon leaves
    # PID 1 exists here too: judged by pid, this dead daemon would look alive.
    path = _record(rundir, "aaaaaaaaaaaaaaaa", pid=1, pid_ns=other_ns, sock=dead_sock)
    assert all_records() == []
    assert sweep_dead_records() == 1
    assert not path.exists()
    assert not dead_sock.exists()


def test_a_record_of_another_pid_namespace_lives_while_its_socket_answers(
    rundir: Path, listening: Path
) -> None:
    other_ns = pid_namespace() + 1
    pid = _unused_pid()  # no such process here: judged by pid, it would be swept
    path = _record(rundir, "bbbbbbbbbbbbbbbb", pid=pid, pid_ns=other_ns, sock=listening)
    assert [r.pid for r in all_records()] == [pid]
    assert sweep_dead_records() == 0
    assert path.exists()
    assert listening.exists()


def test_records_of_this_namespace_and_earlier_releases_go_by_pid(rundir: Path) -> None:
    gone = rundir / "mount-cccccccccccccccc-1.sock"
    _record(rundir, "cccccccccccccccc", pid=os.getpid(), pid_ns=pid_namespace(), sock=gone)
    _record(rundir, "dddddddddddddddd", pid=_unused_pid(), pid_ns=0, sock=gone)
    assert [r.pid for r in all_records()] == [os.getpid()]
    assert sweep_dead_records() == 1
    assert sorted(p.name for p in rundir.iterdir()) == ["mount-cccccccccccccccc.json"]

"""Talking to a running daemon over its control socket (blocking: the CLI and the Python
API call it from plain threads, never from the daemon's trio loop)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from s3cachefs.base.errors import (
    ConfigError,
    IncompleteError,
    NotEnoughSpaceError,
    StoreError,
)
from s3cachefs.daemon.runtime import MountRecord, all_records, read_record


def find_daemon(mount: Path | None, dataset: str | None = None) -> MountRecord:
    """The daemon serving ``mount``, or the one whose mount holds ``dataset``, or the only one."""
    if mount is not None:
        record = read_record(mount.absolute())
        if record is None:
            raise ConfigError(f"no s3cachefs daemon serves {mount}")
        return record
    records = all_records()
    if dataset is not None:
        path = os.path.abspath(dataset)
        for record in records:
            if path == record.mountpoint or path.startswith(record.mountpoint + "/"):
                return record
    if not records:
        raise ConfigError("no s3cachefs daemon is running (s3cachefs mount first)")
    if len(records) > 1:
        mounts = ", ".join(r.mountpoint for r in records)
        raise ConfigError(f"several mounts ({mounts}): choose one with --mount")
    return records[0]


def dataset_in(record: MountRecord, dataset: str) -> str:
    """A path inside the mount becomes the dataset prefix relative to the mount's root."""
    path = os.path.abspath(dataset)
    if path == record.mountpoint or path.startswith(record.mountpoint + "/"):
        return os.path.relpath(path, record.mountpoint)
    return dataset


def request(
    record: MountRecord, message: dict[str, Any], *, timeout: float | None = None
) -> Iterator[dict[str, Any]]:
    """Send one request; yield every event the daemon sends back, the last one included.

    ``timeout``: seconds for the whole answer; past it, IncompleteError, and the
    connection closes, which cancels the request in the daemon (`daemon.control`).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(record.socket)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot reach the daemon of {record.mountpoint} ({exc.strerror}); is it running?"
        ) from None
    with sock, sock.makefile("rb") as lines:
        sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            if deadline is not None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                line = lines.readline()
            except TimeoutError:
                raise IncompleteError(
                    f"{message.get('op')} {message.get('dataset', '')}: not done within "
                    f"{timeout:g}s; cancelled"
                ) from None
            if not line:
                break
            event = json.loads(line)
            yield event
            if event.get("event") in ("done", "error"):
                return
    raise ConfigError(f"the daemon of {record.mountpoint} closed the connection")


def final_event(
    events: Iterable[dict[str, Any]],
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The ``done`` event of a request, progress events passed to ``on_progress`` on
    the way; an ``error`` event becomes StoreError (``kind: s3``) or ConfigError."""
    for event in events:
        if event.get("event") == "error":
            if on_end:
                on_end()
            if event.get("kind") == "s3":
                raise StoreError(event["message"])
            if event.get("kind") == "space":
                needed, available = int(event["needed"]), int(event["available"])
                raise NotEnoughSpaceError(event["message"], needed=needed, available=available)
            raise ConfigError(event["message"])
        if event.get("event") == "done":
            if on_end:
                on_end()
            return dict(event)
        if on_progress and "bytes_total" in event:
            on_progress(event)
    raise ConfigError("the daemon sent no answer")

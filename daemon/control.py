"""The control socket: newline-delimited JSON over a Unix socket in the runtime dir.

A request is one JSON object with an ``op``; the answer is one or more JSON
lines, the last one with ``"event": "done"`` or ``"event": "error"``. Long
operations (prefetch, verify) stream ``progress`` lines and are cancelled when
the client goes away (Ctrl-C keeps what was verified). The socket is 0600 in
a 0700 directory: only the daemon's user can talk to it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from s3cachefs.base.errors import NotEnoughSpaceError, S3CacheFSError, StoreError

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Send], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024


async def serve(
    path: Path, handlers: dict[str, Handler], *, task_status: trio.TaskStatus[None]
) -> None:
    _clear(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)  # the 0700 directory already keeps others out; belt and braces
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(functools.partial(_connection, handlers=handlers), [listener])
    finally:
        _clear(path)


def _clear(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


async def _connection(stream: trio.SocketStream, *, handlers: dict[str, Handler]) -> None:
    """One request: a bug or a client going away ends this connection, never the daemon."""
    try:
        async with stream:
            await _answer(stream, handlers)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:
        log.exception("control connection failed")


async def _answer(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    buffer = b""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk or len(buffer) > MAX_REQUEST:
            return
        buffer += chunk
    try:
        request = json.loads(buffer.split(b"\n", 1)[0])
        handler = handlers[request["op"]]
    except (ValueError, KeyError, TypeError):
        await _send(stream, {"event": "error", "message": "bad request"})
        return

    async def send(event: dict[str, Any]) -> None:
        await _send(stream, event)

    final: dict[str, Any] | None = None
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_hangup, stream, scope)
            try:
                final = await handler(request, send)
            except S3CacheFSError as exc:
                kind = "s3" if isinstance(exc, StoreError) else "usage"
                final = {"event": "error", "message": str(exc), "kind": kind}
                if isinstance(exc, NotEnoughSpaceError):  # the numbers, for the Python API
                    final.update(kind="space", needed=exc.needed, available=exc.available)
            except Exception as exc:
                log.exception("control op=%s failed", request.get("op"))
                final = {"event": "error", "message": f"internal error: {exc}"}
            nursery.cancel_scope.cancel()
    if final is None or scope.cancelled_caught:
        return  # the client hung up: nobody to answer
    with trio.move_on_after(5):
        await send(final)


async def _cancel_on_hangup(stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
    """The client closing its end (Ctrl-C, killed) cancels what it asked for."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _send(stream: trio.abc.Stream, event: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(event).encode() + b"\n")

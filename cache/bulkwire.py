"""The worker's end of its socket to the daemon: pickled messages, framed as
`multiprocessing.connection.Connection` frames them, so the daemon (`cache.bulkpool`)
keeps a plain ``Connection`` at its end.

Not ``Connection`` itself here: importing ``multiprocessing.connection`` pulls
``tempfile``, ``shutil``, ``subprocess`` and ``multiprocessing``'s context, about a
fifth of a bulk worker's start (`python -X importtime -m s3cachefs.cache.bulkworker`).
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

_LONG = 0x7FFFFFFF  # past this, "!i" -1 then the size as "!Q" (as Connection does)
_COPY_MAX = 16 * 1024  # as Connection: above this the header goes in its own sendall


class Channel:
    """Messages over a connected stream socket; one thread sends, one receives."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj)
        size = len(data)
        header = struct.pack("!i", size) if size <= _LONG else struct.pack("!iQ", -1, size)
        if size <= _COPY_MAX:  # one syscall; the copy is cheap
            self._sock.sendall(header + data)
        else:  # a big batch: two syscalls rather than a copy of it
            self._sock.sendall(header)
            self._sock.sendall(data)

    def recv(self) -> Any:
        """The next message; EOFError once the daemon closed its end."""
        (size,) = struct.unpack("!i", self._read(4))
        if size == -1:
            (size,) = struct.unpack("!Q", self._read(8))
        return pickle.loads(self._read(size))  # noqa: S301  # the daemon, our parent

    def _read(self, size: int) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self._sock.recv_into(view[got:])
            if not n:
                raise EOFError
            got += n
        return buf

    def close(self) -> None:
        self._sock.close()

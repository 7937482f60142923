"""The bulk worker's GET over plain HTTP/1.1 on its own socket, without http.client.

http.client parses every response's headers through the ``email`` package and
reads the body through a buffered file: ~0.13 ms of a worker's CPU per GET of a
300 KB page beyond the bytes themselves, as much as the page's CRC-32 and a
third of its MD5 (`bench/README.md`, issue 12 session 5). Here one ``sendall``
per request, the status line and headers split by hand, and the body
``recv_into`` the caller's buffer. Only what `cache.bulkjob` needs of
``http.client.HTTPResponse``: ``status``, ``getheaders()``, ``readinto()``,
``read()``; checking what the headers say is `store.responses`' job, as on every
GET path.

The body's length is its ``Content-Length``; a ``chunked`` body is decoded by
``read()`` only (S3 sends error bodies that way), while ``readinto()`` refuses
one: a GET answered chunked has no length to check and never reaches it. A body
with neither is read to the connection's end. HTTPS stays on http.client
(`cache.bulkconn`). Errors are http.client's (``RemoteDisconnected`` for a
kept-alive socket the server closed, ``HTTPException`` for a malformed answer)
or ``OSError``.
"""

from __future__ import annotations

import http.client
import socket

_MAX_HEAD = 64 * 1024  # status line and headers; S3's are ~1 KB
_MAX_ERROR_BODY = 1 << 20  # what ``read()`` takes of an error body
_CHUNK_LINE = 1024


class RawResponse:
    """One response: its head parsed, its body read from the connection's socket."""

    def __init__(self, conn: RawConnection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.will_close = False
        self.chunked = False
        self.length: int | None = None  # body bytes still to come (None: unknown)

    def getheaders(self) -> list[tuple[str, str]]:
        return self.headers

    def readinto(self, view: memoryview) -> int:
        """Body bytes into ``view`` (at most its length and what is left); 0 at its end."""
        if self.chunked:
            raise http.client.HTTPException("a chunked body has no length to check")
        want = len(view) if self.length is None else min(len(view), self.length)
        if want == 0:
            self._finished()
            return 0
        n = self._conn.recv_into(view[:want])
        if self.length is not None:
            if n == 0:
                raise http.client.IncompleteRead(b"", self.length)
            self.length -= n
            if self.length == 0:
                self._finished()
        elif n == 0:
            self._finished()
        return n

    def read(self, amt: int | None = None) -> bytes:
        """``amt`` bytes of the body (fewer at its end), else the rest (an error's: bounded;
        chunked or not)."""
        if self.chunked:
            return self._read_chunked()
        limit = _MAX_ERROR_BODY if amt is None else amt
        out = bytearray()
        view = memoryview(bytearray(min(limit, 64 * 1024)))
        while len(out) < limit and (n := self.readinto(view[: limit - len(out)])):
            out += view[:n]
        return bytes(out)

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while len(out) < _MAX_ERROR_BODY:
            line = self._conn.read_line(_CHUNK_LINE)
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise http.client.HTTPException(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                while self._conn.read_line(_MAX_HEAD) not in (b"", b"\r\n", b"\n"):
                    pass  # trailers
                self.chunked = False
                self._finished()
                return bytes(out)
            out += self._conn.read_exactly(size)
            self._conn.read_line(_CHUNK_LINE)  # the CRLF after the chunk
        self.will_close = True  # an error body past the bound: the rest is not read
        self._finished()
        return bytes(out)

    def _finished(self) -> None:
        self._conn.response_done(self)


class RawConnection:
    """One keep-alive HTTP/1.1 connection to ``host:port``; ``sock`` is None until the
    first request and after `close` (as http.client's, which `cache.bulkconn` checks)."""

    def __init__(self, host: str, port: int, header_host: str, timeout: float) -> None:
        self.address = (host, port)
        self.header_host = header_host  # the Host as signed
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = bytearray(_MAX_HEAD)
        self._pending = memoryview(self._buf)[:0]  # received, not yet consumed
        self._open: RawResponse | None = None  # the response whose body is unread

    def request(self, path: str, headers: dict[str, str]) -> None:
        if self._open is not None:  # the last body was not read to its end: not reusable
            self.close()
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self._pending = memoryview(self._buf)[:0]
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.header_host}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def getresponse(self) -> RawResponse:
        response = RawResponse(self)
        while True:  # interim 1xx answers come first
            head = self._read_head()
            lines = head.decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/") or not code.isdigit():
                raise http.client.BadStatusLine(lines[0])
            if not 100 <= int(code) < 200:
                break
        response.status = int(code)
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise http.client.HTTPException(f"bad header line {line[:40]!r}")
            response.headers.append((name.strip(), value.strip()))
            fields[name.strip().lower()] = value.strip()
        connection = fields.get("connection", "").lower()
        response.will_close = connection == "close" or (
            version == "HTTP/1.0" and connection != "keep-alive"
        )
        response.chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        length = fields.get("content-length")
        if response.chunked:
            response.length = None
        elif length is not None:
            if not length.isdigit():
                raise http.client.HTTPException(f"bad Content-Length {length[:40]!r}")
            response.length = int(length)
        elif response.status in (204, 304):
            response.length = 0
        else:  # to the connection's end
            response.will_close = True
        self._open = response
        if response.length == 0:
            self.response_done(response)
        return response

    def response_done(self, response: RawResponse) -> None:
        if self._open is response:
            self._open = None
            if response.will_close:
                self.close()

    def _read_head(self) -> bytes:
        """Up to the blank line; what came after it stays pending (the body's start)."""
        got = len(self._pending)
        if got:  # what is pending to the front (a copy: the view is of the same buffer)
            self._buf[:got] = bytes(self._pending)
        view = memoryview(self._buf)
        searched = 0
        while (end := self._buf.find(b"\r\n\r\n", max(0, searched - 3), got)) < 0:
            if got == len(self._buf):
                raise http.client.HTTPException("response head too long")
            searched = got
            n = self._sock().recv_into(view[got:])
            if n == 0:
                if got == 0:  # a kept-alive socket the server closed
                    raise http.client.RemoteDisconnected("closed without a response")
                raise http.client.IncompleteRead(bytes(view[:got]))
            got += n
        head = bytes(view[:end])
        self._pending = view[end + 4 : got]
        return head

    def recv_into(self, view: memoryview) -> int:
        """Body bytes: those already received first, then straight from the socket."""
        if len(self._pending):
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        return self._sock().recv_into(view)

    def read_exactly(self, size: int) -> bytes:
        out = bytearray(size)
        view = memoryview(out)
        got = 0
        while got < size:
            n = self.recv_into(view[got:])
            if n == 0:
                raise http.client.IncompleteRead(bytes(out[:got]), size - got)
            got += n
        return bytes(out)

    def read_line(self, limit: int) -> bytes:
        """One line with its end (b"" at the connection's end), at most ``limit`` bytes."""
        line = bytearray()
        one = memoryview(bytearray(1))
        while not line.endswith(b"\n"):
            if len(line) >= limit:
                raise http.client.LineTooLong("chunk line")
            if len(self._pending):
                cut = bytes(self._pending).find(b"\n")
                take = len(self._pending) if cut < 0 else cut + 1
                take = min(take, limit - len(line))
                line += self._pending[:take]
                self._pending = self._pending[take:]
                continue
            if self._sock().recv_into(one) == 0:
                break
            line += one
        return bytes(line)

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise http.client.NotConnected("the connection was closed")
        return self.sock

    def close(self) -> None:
        self._open = None
        self._pending = memoryview(self._buf)[:0]
        if self.sock is not None:
            self.sock.close()
            self.sock = None

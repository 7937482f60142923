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
or ``OSError``; ``ValueError`` for a header that would split the request (as
http.client's).

Framing is refused where readings could differ: a framing header twice, a 2xx
with any ``Transfer-Encoding``, digits that are not ASCII, a chunk size that is
not 1-8 hex digits. Bytes left after a body are no answer to the next request:
it goes on a new connection (so does one on a socket the server closed or wrote
to while idle). The head (interim 1xx answers included, at most 8) has one
deadline, the socket timeout.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import time

_MAX_HEAD = 64 * 1024  # status line and headers; S3's are ~1 KB
_MAX_ERROR_BODY = 1 << 20  # what ``read()`` takes of an error body
_CHUNK_LINE = 1024
_MAX_INTERIM = 8  # 1xx answers before the response
_STATUS = re.compile(r"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: |$)")  # ASCII digits: not isdigit()
_LENGTH = re.compile(r"[0-9]{1,19}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
_SPLITS = re.compile(r"[\r\n\0]")  # in a header: a second request, or a cut one
# One value each, or the checks and the framing could read different ones.
SINGLE_HEADERS = frozenset({"content-length", "transfer-encoding", "content-range", "etag"})


class RawResponse:
    """One response: its head parsed, its body read from the connection's socket."""

    def __init__(self, conn: RawConnection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.will_close = False
        self.chunked = False
        self.transfer_encoding = ""
        self.length: int | None = None  # body bytes still to come (None: unknown)

    def getheaders(self) -> list[tuple[str, str]]:
        return self.headers

    def readinto(self, view: memoryview) -> int:
        """Body bytes into ``view`` (at most its length and what is left); 0 at its end."""
        if self.chunked or (self.transfer_encoding and 200 <= self.status < 300):
            raise http.client.HTTPException(
                f"a body sent with Transfer-Encoding {self.transfer_encoding!r} has no "
                "length to check"
            )
        if self.length == 0:
            self._finished()
            return 0
        self._check_current()
        want = len(view) if self.length is None else min(len(view), self.length)
        if want == 0:
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
            self._check_current()
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
            digits = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(digits):  # not int(): "-5", "0x5", 40 digits
                raise http.client.HTTPException(f"bad chunk size line {line[:40]!r}")
            size = int(digits, 16)
            if size == 0:
                while self._conn.read_line(_MAX_HEAD) not in (b"", b"\r\n", b"\n"):
                    pass  # trailers
                self.chunked = False
                self._finished()
                return bytes(out)
            take = min(size, _MAX_ERROR_BODY - len(out))  # never allocate what was only said
            out += self._conn.read_exactly(take)
            if take < size:
                break
            self._conn.read_line(_CHUNK_LINE)  # the CRLF after the chunk
        self.will_close = True  # an error body past the bound: the rest is not read
        self._finished()
        return bytes(out)

    def _check_current(self) -> None:
        if not self._conn.is_current(self):  # its socket was closed or is another request's
            raise http.client.HTTPException("the connection has moved past this response")

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
        for name, value in headers.items():
            if _SPLITS.search(name) or _SPLITS.search(value):
                raise ValueError(f"header {name!r}: CR, LF or NUL in {value[:60]!r}")
        if self._open is not None or len(self._pending) or self._readable():
            # The last body not read to its end, bytes past it, or the server wrote (an
            # unsolicited answer, its end) while idle: what comes next is not ours.
            self.close()
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self._pending = memoryview(self._buf)[:0]
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.header_host}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _readable(self) -> bool:
        if self.sock is None:
            return False
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return bool(poll.poll(0))

    def is_current(self, response: RawResponse) -> bool:
        return self._open is response

    def getresponse(self) -> RawResponse:
        response = RawResponse(self)
        deadline = time.monotonic() + self.timeout
        for _ in range(_MAX_INTERIM + 1):  # interim 1xx answers come first
            lines = self._read_head(deadline).decode("latin-1").split("\r\n")
            status = _STATUS.match(lines[0])
            if status is None:
                raise http.client.BadStatusLine(lines[0])
            version, code = status.group(1), int(status.group(2))
            if not 100 <= code < 200:
                break
        else:
            raise http.client.HTTPException(f"more than {_MAX_INTERIM} interim answers")
        response.status = code
        _frame(response, lines[1:], version)
        self._open = response
        if response.length == 0:
            self.response_done(response)
        return response

    def response_done(self, response: RawResponse) -> None:
        if self._open is response:
            self._open = None
            if response.will_close:
                self.close()

    def _read_head(self, deadline: float) -> bytes:
        """Up to the blank line, by ``deadline``; what came after it stays pending (the
        body's start)."""
        got = len(self._pending)
        if got:  # what is pending to the front (a copy: the view is of the same buffer)
            self._buf[:got] = bytes(self._pending)
        view = memoryview(self._buf)
        searched = 0
        while (end := self._buf.find(b"\r\n\r\n", max(0, searched - 3), got)) < 0:
            if got == len(self._buf):
                raise http.client.HTTPException("response head too long")
            searched = got
            sock = self._sock()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole response head within the timeout")
            sock.settimeout(left)
            try:
                n = sock.recv_into(view[got:])
            finally:
                sock.settimeout(self.timeout)
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


def _frame(response: RawResponse, lines: list[str], version: str) -> None:
    """The headers of ``response`` from its head's ``lines``, and where its body ends."""
    fields: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise http.client.HTTPException(f"bad header line {line[:40]!r}")
        key = name.strip().lower()
        if key in fields and key in SINGLE_HEADERS:
            raise http.client.HTTPException(f"header {name.strip()!r} twice")
        response.headers.append((name.strip(), value.strip()))
        fields[key] = value.strip()
    connection = fields.get("connection", "").lower()
    response.will_close = connection == "close" or (
        version == "HTTP/1.0" and connection != "keep-alive"
    )
    response.transfer_encoding = fields.get("transfer-encoding", "")
    response.chunked = "chunked" in response.transfer_encoding.lower()
    length = fields.get("content-length")
    if length is not None and not _LENGTH.fullmatch(length):
        raise http.client.HTTPException(f"bad Content-Length {length[:40]!r}")
    if response.status in (204, 304):  # no body, whatever a Content-Length says
        response.length = 0
    elif response.transfer_encoding:  # chunked, or else to the connection's end
        response.length = None
        response.will_close = response.will_close or not response.chunked
    elif length is not None:
        response.length = int(length)
    else:  # to the connection's end
        response.will_close = True

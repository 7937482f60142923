"""The bulk worker's own HTTP/1.1 (`cache.bulkhttp`) against a server that says exactly
what each test scripts, byte for byte, on a real socket.

What S3 and the proxies in front of it send that the fault proxy never does:
chunked bodies (S3's error answers), ``Connection: close``, interim 100
answers, heads and bodies cut anywhere across ``recv`` calls. The lies of the
fault proxy (wrong status, short or ignored ranges, cut bodies, flipped bytes,
other versions) run through this path in tests/test_bulk.py and
tests/test_wire_lies.py.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3cachefs.cache.bulkhttp import RawConnection
from s3cachefs.cache.bulkworker import Endpoint, Job, Secrets, fetch_jobs
from s3cachefs.store.checksums import Check


class Scripted:
    """Accepts connections on loopback; answers the n-th request with ``answers[n]``
    (bytes, sent in pieces of ``piece`` bytes; then the socket is closed if ``close``)."""

    def __init__(
        self,
        answers: list[bytes],
        *,
        piece: int = 0,
        close: bool = False,
        tls: ssl.SSLContext | None = None,
        pause: float = 0.001,
    ) -> None:
        self.answers = answers
        self.pause = pause
        self.tls = tls
        self.piece = piece
        self.close = close
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except OSError:
                    conn.close()
                    continue
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        head = b""
        while self.answers:
            while b"\r\n\r\n" not in head:
                try:
                    more = conn.recv(65536)
                except OSError:  # reset: closed with our bytes unread
                    more = b""
                if not more:
                    return
                head += more
            request, _, head = head.partition(b"\r\n\r\n")
            self.requests.append(request)
            answer = self.answers.pop(0)
            step = self.piece or len(answer) or 1
            try:
                for i in range(0, len(answer), step):
                    conn.sendall(answer[i : i + step])
                    if self.piece:
                        time.sleep(self.pause)
            except OSError:  # the client hung up mid-answer (a timeout, a bound)
                return
            if self.close:
                return

    def connection(self, timeout: float = 10.0) -> RawConnection:
        return RawConnection("127.0.0.1", self.port, f"127.0.0.1:{self.port}", timeout)

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[list[Scripted]]:
    made: list[Scripted] = []
    yield made
    for server in made:
        server.stop()


def serve(made: list[Scripted], answers: list[bytes], **kw: Any) -> Scripted:
    server = Scripted(answers, **kw)
    made.append(server)
    return server


def ok(body: bytes, *extra: str, status: str = "206 Partial Content") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", 'ETag: "e"', *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def body_of(conn: RawConnection, size: int) -> bytes:
    response = conn.getresponse()
    buf = memoryview(bytearray(size + 10))
    got = 0
    while n := response.readinto(buf[got:]):
        got += n
    return bytes(buf[:got])


@pytest.mark.parametrize("piece", [0, 1, 7])
def test_bodies_on_one_kept_alive_connection_whatever_the_pieces(
    scripted: list[Scripted], piece: int
) -> None:
    """Heads and bodies split anywhere across recv calls (even byte by byte), the body's
    start arriving with the head: each body exact, one connection for both."""
    bodies = [os.urandom(3000), os.urandom(10)]
    server = serve(scripted, [ok(b) for b in bodies], piece=piece)
    conn = server.connection()
    for body in bodies:
        conn.request("/b/k", {"Range": "bytes=0-9"})
        assert body_of(conn, len(body)) == body
    conn.close()
    assert server.connections == 1
    first = server.requests[0].decode().split("\r\n")
    assert first[0] == "GET /b/k HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in first
    assert "Range: bytes=0-9" in first
    assert "Accept-Encoding: identity" in first


def test_headers_as_sent_and_the_status(scripted: list[Scripted]) -> None:
    server = serve(scripted, [ok(b"xy", "Content-Range: bytes 0-1/9", status="206 Partial")])
    conn = server.connection()
    conn.request("/b/k", {})
    response = conn.getresponse()
    assert response.status == 206
    assert dict(response.getheaders()) == {
        "Content-Length": "2",
        "ETag": '"e"',
        "Content-Range": "bytes 0-1/9",
    }
    assert response.read() == b"xy"
    conn.close()


def test_a_chunked_error_body_is_read_whole(scripted: list[Scripted]) -> None:
    """S3 sends its error answers chunked: the <Code> must reach the error table."""
    xml = b"<Error><Code>ExpiredToken</Code><Message>x</Message></Error>"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (xml[:20], xml[20:])) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    server = serve(scripted, [answer, ok(b"after")], piece=5)
    conn = server.connection()
    conn.request("/b/k", {})
    response = conn.getresponse()
    assert (response.status, response.read()) == (400, xml)
    conn.request("/b/k", {})  # read to its end: the connection is reused
    assert body_of(conn, 5) == b"after"
    assert server.connections == 1
    conn.close()


def test_a_chunked_body_is_never_read_into_a_block(scripted: list[Scripted]) -> None:
    answer = (
        b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    server = serve(scripted, [answer])
    conn = server.connection()
    conn.request("/b/k", {})
    with pytest.raises(http.client.HTTPException, match="chunked"):
        conn.getresponse().readinto(memoryview(bytearray(10)))
    conn.close()


def test_connection_close_and_a_body_to_the_end(scripted: list[Scripted]) -> None:
    """``Connection: close``, and a body with no length (read to the connection's end):
    the socket is not used again."""
    server = serve(scripted, [ok(b"abc", "Connection: close")], close=True)
    conn = server.connection()
    conn.request("/b/k", {})
    assert body_of(conn, 3) == b"abc"
    assert conn.sock is None
    server = serve(scripted, [b"HTTP/1.1 500 Internal\r\n\r\n<Error/>"], close=True)
    conn = server.connection()
    conn.request("/b/k", {})
    response = conn.getresponse()
    assert (response.status, response.read()) == (500, b"<Error/>")
    assert conn.sock is None


def test_an_interim_100_is_skipped(scripted: list[Scripted]) -> None:
    server = serve(scripted, [b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"body")])
    conn = server.connection()
    conn.request("/b/k", {})
    assert body_of(conn, 4) == b"body"
    conn.close()


def test_a_cut_body_and_a_closed_kept_alive_socket(scripted: list[Scripted]) -> None:
    """A body shorter than its Content-Length is an error (never a short block); a
    request on a socket the server closed says so as http.client does."""
    server = serve(scripted, [ok(b"abcdef")[:-3]], close=True)
    conn = server.connection()
    conn.request("/b/k", {})
    response = conn.getresponse()
    buf = memoryview(bytearray(10))
    assert response.readinto(buf) == 3
    with pytest.raises(http.client.IncompleteRead):
        response.readinto(buf[3:])
    conn.close()
    server = serve(scripted, [ok(b"one")], close=True)
    conn = server.connection()
    conn.request("/b/k", {})
    assert body_of(conn, 3) == b"one"
    time.sleep(0.1)  # the server has closed its end
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        conn.request("/b/k", {})
        conn.getresponse()
    conn.close()


def assert_head_refused(scripted: list[Scripted], head: bytes) -> None:
    server = serve(scripted, [head])
    conn = server.connection()
    conn.request("/b/k", {})
    with pytest.raises(http.client.HTTPException):
        conn.getresponse()
    conn.close()


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 2xx Odd\r\n\r\n", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"],
)
def test_a_malformed_head_is_an_error(scripted: list[Scripted], head: bytes) -> None:
    assert_head_refused(scripted, head)


def job_against(server: Scripted, tmp_path: Path, body: bytes) -> Job:
    md5 = hashlib.md5(body).hexdigest()
    return Job("k", "k", f'"{md5}"', len(body), 0, len(body), str(tmp_path / "k"),
               Check("md5", md5))  # fmt: skip


def run_one(server: Scripted, job: Job) -> tuple[str, str, list[int]]:
    endpoint = Endpoint(f"http://127.0.0.1:{server.port}/b/", "us-east-1", attempts=1)
    (done,) = fetch_jobs(endpoint, [job], secrets=Secrets("a", "b"), block_size=4096, threads=1)
    return done.error_kind, done.error, done.crcs


def test_jobs_over_chunked_answers(scripted: list[Scripted], tmp_path: Path) -> None:
    """Through a worker's job: a chunked 206 has no length to check (failed, no CRCs); a
    chunked ExpiredToken is the daemon's to run; the truth is fetched and checked."""
    body = os.urandom(10_000)
    md5 = hashlib.md5(body).hexdigest()
    head = f'HTTP/1.1 200 OK\r\nETag: "{md5}"\r\nTransfer-Encoding: chunked\r\n\r\n'
    chunked = head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    xml = b"<Error><Code>ExpiredToken</Code></Error>"
    expired = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(xml),
        xml,
    )
    truth = f'HTTP/1.1 200 OK\r\nETag: "{md5}"\r\nContent-Length: {len(body)}\r\n\r\n'
    server = serve(scripted, [chunked, expired, truth.encode() + body])
    job = job_against(server, tmp_path, body)
    kind, error, crcs = run_one(server, job)
    assert (kind, crcs) == ("BadResponseError", []), error
    assert "Content-Length" in error
    kind, error, crcs = run_one(server, job)
    assert (kind, crcs) == ("ExpiredCredentials", []), error
    kind, error, crcs = run_one(server, job)
    assert (kind, error, len(crcs)) == ("", "", 3)
    assert (tmp_path / "k").read_bytes() == body


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (cryptography: moto's own dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_https_jobs_go_over_tls(scripted: list[Scripted], tmp_path: Path) -> None:
    """https endpoints keep http.client over TLS (the CA bundle honoured): the job is
    fetched and checked; the same job against an untrusted certificate fails."""
    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    body = os.urandom(20_000)
    md5 = hashlib.md5(body).hexdigest()
    truth = f'HTTP/1.1 200 OK\r\nETag: "{md5}"\r\nContent-Length: {len(body)}\r\n\r\n'
    server = serve(scripted, [truth.encode() + body], tls=tls)
    job = job_against(server, tmp_path, body)
    base = f"https://127.0.0.1:{server.port}/b/"
    secrets = Secrets("a", "b")
    endpoint = Endpoint(base, "us-east-1", attempts=1, ca_bundle=str(cert))
    (done,) = fetch_jobs(endpoint, [job], secrets=secrets, block_size=4096, threads=1)
    assert (done.error, len(done.crcs), done.matches) == ("", 5, True)
    assert (tmp_path / "k").read_bytes() == body
    assert server.requests[0].startswith(b"GET /b/k HTTP/1.1")
    untrusted = Endpoint(base, "us-east-1", attempts=1, ca_bundle=None)
    (done,) = fetch_jobs(untrusted, [job], secrets=secrets, block_size=4096, threads=1)
    assert done.error_kind == "TransientError" and "CERTIFICATE_VERIFY_FAILED" in done.error


# What a malformed or lying upstream can send, byte for byte (review of issue 12's lean HTTP).

MULTIPART = '"0123456789abcdef0123456789abcdef-2"'  # no MD5 to check: only the framing decides


def part(first: int, last: int, body: bytes, *extra: str) -> bytes:
    """A 206 for bytes ``first-last`` of a 16-byte object, its body as given."""
    head = ["HTTP/1.1 206 Partial Content", f"ETag: {MULTIPART}", f"Content-Length: {len(body)}"]
    head += [f"Content-Range: bytes {first}-{last}/16", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def jobs_at(
    server: Scripted, jobs: list[Job], attempts: int = 1, timeout: float = 10.0
) -> list[Any]:
    base = f"http://127.0.0.1:{server.port}/b/"
    endpoint = Endpoint(base, "us-east-1", timeout=timeout, attempts=attempts)
    return list(fetch_jobs(endpoint, jobs, secrets=Secrets("a", "b"), block_size=4, threads=1))


def halves(tmp_path: Path) -> list[Job]:
    path = str(tmp_path / "o")
    return [Job("o", "k", MULTIPART, 16, 0, 8, path), Job("o", "k", MULTIPART, 16, 8, 16, path)]


def test_bytes_past_a_body_are_never_the_next_answer(
    scripted: list[Scripted], tmp_path: Path
) -> None:
    """Bytes after a complete body (here a whole forged answer to the next job) are not an
    answer to a request not yet sent: the next GET goes on a new connection."""
    forged = part(8, 15, b"FAKEFAKE")
    server = serve(scripted, [part(0, 7, b"realreal") + forged, part(8, 15, b"REALREAL")])
    done = jobs_at(server, halves(tmp_path))
    assert [d.error for d in done] == ["", ""]
    assert (tmp_path / "o").read_bytes() == b"realrealREALREAL"
    assert (len(server.requests), server.connections) == (2, 2)


@pytest.mark.parametrize(
    "extra",
    [
        ["Transfer-Encoding: chunked", "transfer-encoding: identity"],
        ["content-length: 8"],
        ["Content-Range: bytes 0-7/16"],
        [f"etag: {MULTIPART}"],
        ["Transfer-Encoding: identity"],
    ],
)
def test_framing_headers_twice_or_a_transfer_encoding_on_a_2xx_are_refused(
    scripted: list[Scripted], tmp_path: Path, extra: list[str]
) -> None:
    """Content-Length, Transfer-Encoding, Content-Range, ETag: once each (whatever their
    case), and a 2xx's length is its Content-Length alone: else nothing is stored."""
    body = b"4\r\nreal\r\n4\r\nreal\r\n0\r\n\r\n"[:8]  # what a chunked reading would store
    server = serve(scripted, [part(0, 7, body, *extra)])
    (done,) = jobs_at(server, halves(tmp_path)[:1])
    assert (done.error_kind, done.crcs) == ("TransientError", []), done.error


def test_a_2xx_chunked_with_a_length_fails_the_job(
    scripted: list[Scripted], tmp_path: Path
) -> None:
    """Past the checks (its Content-Length is right), a chunked 206 is still not read."""
    chunked = b"8\r\nrealreal\r\n0\r\n\r\n"
    answer = part(0, 7, chunked, "Transfer-Encoding: chunked")
    answer = answer.replace(b"Content-Length: %d" % len(chunked), b"Content-Length: 8")
    server = serve(scripted, [answer])
    (done,) = jobs_at(server, halves(tmp_path)[:1])
    assert (done.error_kind, done.crcs) == ("TransientError", []), done.error
    assert "Transfer-Encoding" in done.error


@pytest.mark.parametrize("size", [b"-5", b"+5", b"0x5", b"1" + b"0" * 40, b"100000000"])
def test_a_chunk_size_is_hex_digits_only(scripted: list[Scripted], size: bytes) -> None:
    head = b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n"
    if size == b"100000000":  # 4 GiB: must be refused before anything is allocated
        server = serve(scripted, [head + size + b"\r\nab"])
    else:
        server = serve(scripted, [head + size + b"\r\nabcde\r\n0\r\n\r\n"])
    conn = server.connection(timeout=2.0)
    conn.request("/b/k", {})
    response = conn.getresponse()
    with pytest.raises(http.client.HTTPException, match="chunk size"):
        response.read()
    conn.close()


def test_a_huge_chunk_is_read_to_the_bound_only(scripted: list[Scripted]) -> None:
    """An error body's chunk of 128 MiB: 1 MiB is read (what the <Code> needs), the
    connection is not used again."""
    head = b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n8000000\r\n"
    server = serve(scripted, [head + b"x" * ((1 << 20) + 10)], close=True)
    conn = server.connection(timeout=5.0)
    conn.request("/b/k", {})
    assert conn.getresponse().read() == b"x" * (1 << 20)
    assert conn.sock is None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 2\xb206 X\r\nContent-Length: 0\r\n\r\n",  # a superscript 2: str.isdigit()
        b"HTTP/1.1 206 X\r\nContent-Length: \xb9\r\n\r\n",
        b"HTTP/1.1 2065 X\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 206X\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_only_ascii_digits_make_a_status_or_a_length(scripted: list[Scripted], head: bytes) -> None:
    assert_head_refused(scripted, head)


def test_a_status_line_without_a_reason(scripted: list[Scripted]) -> None:
    server = serve(scripted, [b"HTTP/1.1 206\r\nContent-Length: 2\r\n\r\nab"])
    conn = server.connection()
    conn.request("/b/k", {})
    assert conn.getresponse().status == 206
    conn.close()


def test_a_non_ascii_status_is_a_failed_attempt(scripted: list[Scripted], tmp_path: Path) -> None:
    """Retried as any malformed answer (not a worker error that ends the job)."""
    server = serve(scripted, [b"HTTP/1.1 2\xb206 X\r\n\r\n", part(0, 7, b"realreal")])
    (done,) = jobs_at(server, halves(tmp_path)[:1], attempts=2)
    assert (done.error, done.attempts, len(done.crcs)) == ("", 2, 2)


def test_a_non_ascii_length_over_https_is_a_bad_response(
    scripted: list[Scripted], tmp_path: Path
) -> None:
    """http.client gives up on the length; the checks (`store.responses`) refuse it."""
    cert, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    answer = part(0, 7, b"realreal").replace(b"Content-Length: 8", b"Content-Length: \xb9")
    server = serve(scripted, [answer], tls=tls, close=True)
    base = f"https://127.0.0.1:{server.port}/b/"
    endpoint = Endpoint(base, "us-east-1", attempts=1, ca_bundle=str(cert))
    job = halves(tmp_path)[0]
    (done,) = fetch_jobs(endpoint, [job], secrets=Secrets("a", "b"), block_size=4, threads=1)
    assert (done.error_kind, done.crcs) == ("BadResponseError", []), done.error


@pytest.mark.parametrize(
    "headers",
    [{"If-Match": '"e"\r\n\r\nGET /b/other HTTP/1.1\r\nX: y'}, {"X": "a\nb"}, {"X": "a\0b"},
     {"X\r\nY": "a"}],
)  # fmt: skip
def test_cr_lf_or_nul_in_a_header_is_never_sent(
    scripted: list[Scripted], headers: dict[str, str]
) -> None:
    server = serve(scripted, [b"HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n"] * 2)
    conn = server.connection()
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        conn.request("/b/k", headers)
    conn.close()
    assert server.requests == []


def test_an_etag_with_a_request_in_it_fails_the_job_once(
    scripted: list[Scripted], tmp_path: Path
) -> None:
    """An ETag from a LIST (XML entities decoded) can hold CR LF: the job fails, not
    retried (the same ETag again is the same), and nothing is sent."""
    etag = '"e"\r\n\r\nGET /b/other HTTP/1.1\r\nX: y'
    server = serve(scripted, [b"HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n"] * 4)
    job = Job("o", "k", etag, 16, 0, 8, str(tmp_path / "o"))
    (done,) = jobs_at(server, [job], attempts=3)
    assert (done.error_kind, done.attempts, done.crcs) == ("StoreError", 1, []), done.error
    assert server.requests == []


def test_interim_answers_are_bounded(scripted: list[Scripted]) -> None:
    interim = b"HTTP/1.1 102 Processing\r\n\r\n"
    server = serve(scripted, [interim * 8 + ok(b"ab"), interim * 9 + ok(b"ab")])
    conn = server.connection()
    conn.request("/b/k", {})
    assert body_of(conn, 2) == b"ab"  # 8: accepted
    conn.request("/b/k", {})
    with pytest.raises(http.client.HTTPException, match="interim"):
        conn.getresponse()
    conn.close()


def test_a_head_has_one_deadline_however_it_trickles(scripted: list[Scripted]) -> None:
    """Each byte of the head well within the socket timeout, the whole head not: a
    timeout (the head is bounded in time as in size)."""
    server = serve(scripted, [ok(b"ab")], piece=1, pause=0.05)  # ~2.5 s for the head
    conn = server.connection(timeout=0.5)
    conn.request("/b/k", {})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()


def test_a_superseded_response_reads_nothing(scripted: list[Scripted]) -> None:
    """A response whose connection moved on (a new request) never reads the new socket."""
    server = serve(scripted, [ok(b"AAAAAAAAAA")[:-5], ok(b"BBB")])
    conn = server.connection()
    conn.request("/b/k", {})
    old = conn.getresponse()
    assert old.readinto(memoryview(bytearray(5))) == 5
    conn.request("/b/k", {})
    time.sleep(0.1)  # the new answer is there to be (wrongly) read
    with pytest.raises(http.client.HTTPException):
        old.readinto(memoryview(bytearray(100)))
    assert body_of(conn, 3) == b"BBB"
    conn.close()


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_204_and_304_have_no_body_whatever_their_length(
    scripted: list[Scripted], status: bytes
) -> None:
    server = serve(scripted, [b"HTTP/1.1 %s\r\nContent-Length: 5\r\n\r\n" % status, ok(b"next")])
    conn = server.connection()
    conn.request("/b/k", {})
    response = conn.getresponse()
    assert response.read() == b""
    conn.request("/b/k", {})
    assert body_of(conn, 4) == b"next"
    assert server.connections == 1
    conn.close()


def test_a_timeout_mid_body_retries_on_a_new_connection(
    scripted: list[Scripted], tmp_path: Path
) -> None:
    """A body that stops part-way (the socket kept open): the attempt times out, the
    connection is dropped, the job is fetched whole again on a new one."""
    server = serve(scripted, [part(0, 7, b"realreal")[:-3], part(0, 7, b"realreal")])
    (done,) = jobs_at(server, halves(tmp_path)[:1], attempts=2, timeout=0.5)
    assert (done.error, done.attempts, len(done.crcs)) == ("", 2, 2)
    assert server.connections == 2
    assert (tmp_path / "o").read_bytes()[:8] == b"realreal"


def test_an_answer_sent_while_idle_is_nobodys(scripted: list[Scripted]) -> None:
    """A proxy's unsolicited 408 on an idle kept-alive socket (after the last body was
    read whole): the next request goes on a new connection, its answer is its own."""
    first = ok(b"one")
    late = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    server = serve(scripted, [first + late, ok(b"two")], piece=len(first), pause=0.05)
    conn = server.connection()
    conn.request("/b/k", {})
    assert body_of(conn, 3) == b"one"
    time.sleep(0.3)  # the 408 has come
    conn.request("/b/k", {})
    assert body_of(conn, 3) == b"two"
    assert server.connections == 2
    conn.close()

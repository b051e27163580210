"""The local API's own HTTP/1.1 framing (agent.api.http1): the header reader, the request
line, keep-alive, Expect: 100-continue, and the errors, over real sockets; and the guard
that keeps http.server / http.client / ssl / email / zipfile out of the agent."""

from __future__ import annotations

import email.utils
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.api.connections import ConnectionLimits
from agent.api.http1 import (
    MAX_HEADER_LINE,
    MAX_HEADERS,
    BadHeader,
    Headers,
    HeadersTooLarge,
    format_http_date,
    http_date,
    read_headers,
)
from agent.api.server import ApiServer
from agent.runtime.host import ModelHost
from agent.update.locks import LockTable

from .conftest import Bundles, Rig

ROOT = Path(__file__).resolve().parents[2]

# -- read_headers ----------------------------------------------------------------------------


def test_plain_headers() -> None:
    h = read_headers(io.BytesIO(b"Host: x\r\nContent-Length: 12\r\nX-Tab:\tv \t\r\nX-Empty:\r\n\r\nBODY"))
    assert h.items() == [("Host", "x"), ("Content-Length", "12"), ("X-Tab", "v"), ("X-Empty", "")]
    assert h["content-length"] == "12" and h.get("CONTENT-LENGTH") == "12"
    assert "host" in h and "Accept" not in h and 3 not in h
    assert h.get("Accept") is None and h.get("Accept", "") == ""
    with pytest.raises(KeyError):
        h["Accept"]
    assert list(h) == ["Host", "Content-Length", "X-Tab", "X-Empty"] and len(h) == 4


def test_bare_lf_eof_and_empty_block() -> None:
    h = read_headers(io.BytesIO(b"Host: x\nContent-Type: application/x-npy\n\n"))
    assert h.items() == [("Host", "x"), ("Content-Type", "application/x-npy")]
    assert read_headers(io.BytesIO(b"Host: x\r\nX-Cut: y")).items() == [("Host", "x"), ("X-Cut", "y")]
    assert read_headers(io.BytesIO(b"\r\n")).items() == []
    assert read_headers(io.BytesIO(b"")).items() == []


def test_repeated_header_values_are_joined() -> None:
    h = read_headers(io.BytesIO(b"X-A:  spaced  \r\nx-a: twice\r\nAccept: a/b\r\nACCEPT: c/d\r\n\r\n"))
    assert h.items() == [("X-A", "spaced, twice"), ("Accept", "a/b, c/d")]
    assert Headers([("A", "1"), ("a", "2")])["A"] == "1, 2"


def test_the_block_is_read_up_to_its_blank_line_only() -> None:
    f = io.BytesIO(b"Host: x\r\n\r\nNot: a header\r\n")
    read_headers(f)
    assert f.read() == b"Not: a header\r\n"


@pytest.mark.parametrize(
    ("block", "why"),
    [
        (b"Host: x\r\nX-Folded: one\r\n two\r\n\r\n", "folding"),
        (b"Host: x\r\nX-Folded: one\r\n\ttwo\r\n\r\n", "folding"),
        (b"Host: x\r\nX-Space : v\r\n\r\n", "whitespace before its colon"),
        (b"Host: x\r\nX-Tab\t: v\r\n\r\n", "whitespace before its colon"),
        (b"Host: x\r\nno colon here\r\n\r\n", "no colon"),
        (b"Host: x\r\nweird name: v\r\n\r\n", "not a token"),
        (b"Host: x\r\n: v\r\n\r\n", "not a token"),
        (b"Host: x\r\nX-Nul: a\x00b\r\n\r\n", "control characters"),
        (b"Host: x\r\nX-Cr: a\rb\r\n\r\n", "control characters"),
    ],
)
def test_malformed_header_lines_are_refused(block: bytes, why: str) -> None:
    with pytest.raises(BadHeader, match=why) as info:
        read_headers(io.BytesIO(block))
    assert info.value.status == 400 and info.value.code == "bad_header"


def test_limits() -> None:
    with pytest.raises(HeadersTooLarge) as info:
        read_headers(io.BytesIO(b"X: " + b"a" * MAX_HEADER_LINE + b"\r\n\r\n"))
    assert info.value.status == 431
    # http.client's limit: fewer than MAX_HEADERS lines, the blank one included
    many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS - 1)) + b"\r\n"
    assert len(read_headers(io.BytesIO(many))) == MAX_HEADERS - 1
    too_many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n"
    with pytest.raises(HeadersTooLarge):
        read_headers(io.BytesIO(too_many))


@pytest.mark.parametrize("ts", [0, 784111777, 951782400, 1700000000, 1764748800, 4102444799])
def test_http_date_is_imf_fixdate(ts: int) -> None:
    assert format_http_date(ts) == email.utils.formatdate(ts, usegmt=True)


def test_http_date_is_now() -> None:
    parsed = email.utils.parsedate_to_datetime(http_date())
    assert abs(parsed.timestamp() - __import__("time").time()) < 2


# -- over a socket ---------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ApiServer]:
    host = ModelHost()
    s = ApiServer(host, listen=("127.0.0.1", 0), unix_socket=str(tmp_path / "api.sock"),
                  max_body_bytes=4096, locks=LockTable(tmp_path / "locks"))
    s.start()
    yield s
    s.stop()
    host.close()


class Conn:
    """A raw HTTP connection that reads replies one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        self.sock = sock
        self.f = sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.f.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        body = self.f.read(int(headers.get("content-length", "0")))
        return status, headers, body

    def closed(self) -> bool:
        """The server closed the connection (EOF, nothing more sent). A reset counts: a server
        closing with request bytes unread (a 414's long line) makes the kernel send one."""
        try:
            return self.f.read() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.fixture
def conn(server: ApiServer) -> Iterator[Conn]:
    c = Conn(socket.create_connection(server.tcp_address, timeout=10))  # type: ignore[arg-type]
    yield c
    c.close()


def error_of(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error", "detail"} and doc["detail"], doc
    return str(doc["error"])


def test_keep_alive_and_pipelining(conn: Conn) -> None:
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = conn.reply()
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert headers["content-type"] == "application/json" and "connection" not in headers
    assert headers["server"].startswith("edgefleet-agent ") and headers["date"].endswith(" GMT")
    conn.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.reply()[0] == 503
    status, _, body = conn.reply()
    assert status == 404 and error_of(body) == "not_found"
    conn.send(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    status, headers, _ = conn.reply()
    assert status == 200 and headers["connection"] == "close" and conn.closed()


def test_blank_lines_before_a_request_are_skipped(conn: Conn) -> None:
    conn.send(b"\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
    assert conn.reply()[0] == 200


def test_head_has_no_body(conn: Conn) -> None:
    conn.send(b"HEAD /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
    assert conn.f.readline() == b"HTTP/1.1 200 OK\r\n"
    head = b""
    while (line := conn.f.readline()) != b"\r\n":
        head += line
    assert b"Content-Length: 15\r\n" in head
    assert conn.reply()[0] == 200  # the next reply follows the head directly


def test_http10_closes_unless_keep_alive(server: ApiServer) -> None:
    with socket.create_connection(server.tcp_address, timeout=10) as s:  # type: ignore[arg-type]
        c = Conn(s)
        c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        status, headers, _ = c.reply()
        assert status == 200 and headers["connection"] == "close" and c.closed()
        c.f.close()
    with socket.create_connection(server.tcp_address, timeout=10) as s:  # type: ignore[arg-type]
        c = Conn(s)
        for _ in range(2):
            c.send(b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            status, headers, _ = c.reply()
            assert status == 200 and headers["connection"] == "keep-alive"
        c.f.close()


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        (b"GET /healthz HTTP/1.1\r\nX-Folded: one\r\n two\r\n\r\n", 400, "bad_header"),
        (b"GET /healthz HTTP/1.1\r\nX-Space : v\r\n\r\n", 400, "bad_header"),
        (b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n", 400, "bad_header"),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * MAX_HEADER_LINE + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: v\r\n" * MAX_HEADERS + b"\r\n", 431, "headers_too_large"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"hello there\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz\r\n\r\n", 400, "bad_request"),  # HTTP/0.9
        (b"GET  /healthz HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1 x\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz FTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET /a\x01b HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"G@T /healthz HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /healthz HTTP/1.2\r\n\r\n", 505, "http_version_not_supported"),
        (b"BREW /healthz HTTP/1.1\r\n\r\n", 501, "not_implemented"),
        (b"get /healthz HTTP/1.1\r\n\r\n", 501, "not_implemented"),
    ],
)
def test_framing_errors_answer_json_and_close(conn: Conn, request_head: bytes, status: int,
                                              code: str) -> None:
    conn.send(request_head)
    got, headers, body = conn.reply()
    assert got == status, body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert error_of(body) == code
    assert conn.closed()


def test_the_server_survives_framing_errors(server: ApiServer) -> None:
    for bad in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
        with socket.create_connection(server.tcp_address, timeout=10) as s:  # type: ignore[arg-type]
            s.sendall(bad)
            assert s.recv(4096).startswith(b"HTTP/1.1 ")
    with socket.create_connection(server.tcp_address, timeout=10) as s:  # type: ignore[arg-type]
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        s.shutdown(socket.SHUT_WR)  # the head ends at EOF: still answered
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(server.tcp_address, timeout=10) as s:  # type: ignore[arg-type]
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_an_idle_connection_ends_quietly_and_a_stalled_head_gets_408(tmp_path: Path) -> None:
    host = ModelHost()
    s = ApiServer(host, listen=("127.0.0.1", 0),
                  limits=ConnectionLimits(idle_timeout_s=0.3, head_timeout_s=0.3))
    s.start()
    try:
        with socket.create_connection(s.tcp_address, timeout=10) as sock:  # type: ignore[arg-type]
            c = Conn(sock)
            c.send(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert c.reply()[0] == 200
            assert c.closed()  # idle after its reply: closed by the server, without a reply
            c.f.close()
        with socket.create_connection(s.tcp_address, timeout=10) as sock:  # type: ignore[arg-type]
            c = Conn(sock)
            c.send(b"GET /healthz HTTP/1.1\r\n")  # and nothing more
            status, headers, body = c.reply()
            assert status == 408 and error_of(body) == "head_timeout" and headers["connection"] == "close"
            assert c.closed()
            c.f.close()
    finally:
        s.stop()
        host.close()


def test_a_repeated_content_length_is_refused(conn: Conn) -> None:
    conn.send(b"POST /v1/locks/app HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}")
    status, headers, body = conn.reply()
    assert status == 400 and error_of(body) == "bad_request" and "'2, 40'" in json.loads(body)["detail"]
    assert headers["connection"] == "close" and conn.closed()


def test_expect_100_continue(conn: Conn) -> None:
    body = b'{"lease_s": 60, "reason": "test"}'
    conn.send(b"POST /v1/locks/app HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
    assert conn.f.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert conn.f.readline() == b"\r\n"
    conn.send(body)
    status, _, reply = conn.reply()
    assert status == 200 and json.loads(reply)["holder"] == "app"
    # A body the server refuses before reading it: the final answer, no 100.
    conn.send(b"POST /v1/locks/app HTTP/1.1\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    status, headers, reply = conn.reply()
    assert status == 413 and error_of(reply) == "too_large" and headers["connection"] == "close"
    assert conn.closed()


def test_expect_100_continue_predict_over_unix_socket(rig: Rig, bundles: Bundles, tmp_path: Path) -> None:
    server2 = ApiServer(rig.host, listen=None, unix_socket=str(tmp_path / "p.sock"))
    server2.start()
    try:
        rig.installer.install_file(bundles.build(1))
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 4), dtype=np.float32))
        body = buf.getvalue()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(server2.unix_path))
            c = Conn(s)
            c.send(b"POST /v1/models/clf/predict HTTP/1.1\r\nContent-Type: application/x-npy\r\n"
                   b"Accept: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                   % len(body))
            assert c.f.readline() == b"HTTP/1.1 100 Continue\r\n" and c.f.readline() == b"\r\n"
            c.send(body)
            status, headers, reply = c.reply()
            assert status == 200, reply
            assert headers["x-edgefleet-release"] == "1" and len(json.loads(reply)["outputs"]["probs"]) == 2
            c.f.close()
    finally:
        server2.stop()


def test_importing_the_agent_loads_no_http_stack() -> None:
    code = ("import agent.main, sys; print(sorted(m for m in ('ssl', 'http.client', 'http.server', "
            "'email.parser', 'zipfile') if m in sys.modules))")
    # ``-c`` puts the working directory first on sys.path: this checkout's agent
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

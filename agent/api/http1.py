"""HTTP/1.1 framing for the agent's local API (connections: agent.api.connections).

The stdlib's http.server imports http.client, which imports ``ssl`` (~4.5 MB RSS) and
``email.*`` (~3 MB more with http.*) into every agent, TLS or not. The API needs far less:
this module reads the request line and the header block, keeps connections alive, answers
``Expect: 100-continue``, frames replies, and answers framing errors. Routes are the
subclass's ``do_<METHOD>`` methods (agent.api.server).

What a request may be (RFC 9112; stricter than http.server, which fell back to email.parser):

- request line ``METHOD SP target SP HTTP/1.1`` (or ``HTTP/1.0``), blank lines before it
  skipped: longer than 64 KiB → 414; ``HTTP/2.0`` or another version → 505; anything else
  (HTTP/0.9, extra spaces, control characters) → 400; no ``do_<METHOD>`` → 501;
- header lines ``name: value``, the name a token: a line without a colon, with whitespace
  before the colon or a name that is no token, an obsolete folded line (starting with a
  space or tab) or control characters in the value → 400; a line longer than 64 KiB or 100
  lines or more → 431. A repeated header's values are joined with ", " (RFC 9110 5.3), so
  ``Content-Length: 5`` sent twice reads "5, 5", which the API refuses as not a number;
- ``Connection: close`` closes after the reply, ``keep-alive`` keeps an HTTP/1.0 connection
  (HTTP/1.0 closes otherwise, HTTP/1.1 stays open);
- ``Expect: 100-continue`` (HTTP/1.1): ``send_continue()`` writes the interim 100 when the
  handler is about to read the body, so a request refused before that (413, 404, ...) gets
  its final answer without the client sending the body.

- the body (``check_body_framing``): only ``Content-Length`` framing; ``chunked`` → 411,
  other transfer codings → 400, a body on GET/HEAD/DELETE → 400, a ``Content-Encoding``
  → 415. A body is never read before it is judged, and a request refused before its body
  was read closes the connection, so no byte of a body is ever parsed as a request.

Framing errors answer JSON ``{"error": "<code>", "detail": "..."}`` like the API, with
``Connection: close``. A client that stalls mid-request gets 408; one that drops the
connection ends it quietly.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, overload

import msgspec

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 65536
MAX_HEADER_LINE = 65536
MAX_HEADERS = 100  # header lines, the blank line that ends them included (as http.client counts)
MAX_BLANK_LINES = 8  # empty lines skipped before a request line (RFC 9112 2.2)
SMALL_REPLY = 1 << 16  # replies up to this size go out in one write with their headers

REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# name, colon, value: any byte but control characters (tab allowed); spaces around the value
# are stripped below. A last line cut by EOF may lack its line end.
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)\r?\n?")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^\x00-\x20\x7f]+) (HTTP/[^\x00-\x20\x7f]*)\r?\n?")
_VERSION = re.compile(rb"HTTP/[0-9]+(?:\.[0-9]+)?")


class FramingError(Exception):
    """A request the framing refuses: answered ``status`` with ``code``/``detail``, then closed."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BadHeader(FramingError):
    """A malformed header line (400)."""

    code = "bad_header"


class HeadersTooLarge(FramingError):
    """A header line over MAX_HEADER_LINE, or MAX_HEADERS lines or more (431)."""

    status = 431
    code = "headers_too_large"


class Headers:
    """A request's header fields: case-insensitive look-up, the names as the client spelled
    them (the first spelling of a repeated one), a repeated field's values joined with ", "."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]] | None = None) -> None:
        self._fields: dict[str, tuple[str, str]] = {}
        for name, value in fields or ():
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        old = self._fields.get(key)
        self._fields[key] = (name, value) if old is None else (old[0], f"{old[1]}, {value}")

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        field = self._fields.get(name.lower())
        return default if field is None else field[1]

    def __getitem__(self, name: str) -> str:
        field = self._fields.get(name.lower())
        if field is None:
            raise KeyError(name)
        return field[1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields.values())

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._fields.values())

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"


def _bad_field(line: bytes) -> BadHeader:
    """Why a header line does not parse, for the 400's detail."""
    shown = repr(line.rstrip(b"\r\n")[:80].decode("latin-1"))
    if line[:1] in (b" ", b"\t"):
        return BadHeader(f"header line {shown} starts with whitespace: obsolete line folding is not "
                         "accepted, send each header on one line")
    name, colon, _ = line.partition(b":")
    if not colon:
        return BadHeader(f"header line {shown} has no colon; send 'Name: value'")
    if name[-1:] in (b" ", b"\t"):
        return BadHeader(f"header line {shown} has whitespace before its colon")
    if not re.fullmatch(_TOKEN, name):
        return BadHeader(f"header name {name[:80].decode('latin-1')!r} is not a token "
                         "(letters, digits and !#$%&'*+-.^_`|~)")
    return BadHeader(f"header {name[:80].decode('latin-1')} has control characters in its value")


def read_headers(rfile: Any) -> Headers:
    """The header block up to its blank line (or EOF); BadHeader / HeadersTooLarge on abuse."""
    headers = Headers()
    add = headers.add
    n = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HeadersTooLarge(f"a header line is longer than {MAX_HEADER_LINE} bytes")
        if line in (b"\r\n", b"\n", b""):
            return headers
        n += 1
        if n >= MAX_HEADERS:
            raise HeadersTooLarge(f"got more than {MAX_HEADERS} headers")
        m = _FIELD.fullmatch(line)
        if m is None:
            raise _bad_field(line)
        add(m[1].decode("ascii"), m[2].rstrip(b" \t").decode("latin-1"))


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_http_date(timestamp: float) -> str:
    """``timestamp`` as an IMF-fixdate (RFC 9110 5.6.7): ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    t = time.gmtime(timestamp)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, format_http_date(now))
    return _date[1]


class RequestHandler:
    """One connection's requests, one ``handle_one_request`` call each (agent.api.connections
    calls it while the connection stays open), dispatched to ``do_<METHOD>``.

    For the methods: ``command``, ``path`` (the request target), ``request_version``,
    ``headers``, ``body_length`` (the declared Content-Length, None without one), ``rfile``
    (positioned at the body), ``wfile``, ``close_connection``, ``client_address``;
    ``send_continue()`` before reading a body, ``send_reply()`` to answer.
    """

    server_version = "edgefleet"
    sys_version = "Python/" + sys.version.split()[0]
    protocol_version = "HTTP/1.1"
    logger = log
    # Methods whose requests carry no body: a declared one is refused (400) rather than left
    # unread, where it would be parsed as the next request on the connection.
    BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})

    command = ""
    path = ""
    request_version = ""
    requestline = ""
    close_connection = True
    body_length: int | None = None
    replied = False
    headers: Headers
    _continue = False

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.rfile = connection
        self.wfile = connection
        self.client_address = connection.address

    # -- the connection ---------------------------------------------------------------------

    def serve(self) -> bool:
        """One request; True when the connection stays open for the next one. A client that
        stalls mid-request gets 408 (when nothing was answered yet), one that drops the
        connection ends it quietly."""
        try:
            self.handle_one_request()
        except TimeoutError:
            self.log_error("request timed out")
            if not self.replied:
                with contextlib.suppress(OSError):
                    self.send_error(408, "request_timeout", "the client stopped sending mid-request")
            return False
        except (ConnectionError, OSError):  # BrokenPipe, ConnectionReset, ConnectionAborted
            return False
        return not self.close_connection

    def handle_one_request(self) -> None:
        self.close_connection = True
        self.command = self.request_version = self.requestline = ""
        self.body_length = None
        self.replied = False
        self._continue = False
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        for _ in range(MAX_BLANK_LINES):
            if line not in (b"\r\n", b"\n"):
                break
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:  # the client closed the connection
            return
        if len(line) > MAX_REQUEST_LINE:
            self.send_error(414, "uri_too_long", f"the request line is longer than {MAX_REQUEST_LINE} bytes")
            return
        try:
            self.parse_request(line)
        except FramingError as exc:
            self.send_error(exc.status, exc.code, exc.detail)
            return
        self.connection.head_read()
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            self.send_error(501, "not_implemented", f"method {self.command} is not supported")
            return
        try:
            self.check_body_framing()
        except FramingError as exc:
            self.send_error(exc.status, exc.code, exc.detail)
            return
        method()
        self.wfile.flush()

    def parse_request(self, line: bytes) -> None:
        """Request line and headers into the attributes; FramingError when malformed."""
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            shown = line.rstrip(b"\r\n")[:80].decode("latin-1")
            raise FramingError(f"the request line {shown!r} is not 'METHOD target HTTP/1.1'")
        version = m[3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if _VERSION.fullmatch(version):
                raise FramingError(f"{version.decode('latin-1')} is not supported; send HTTP/1.1",
                                   505, "http_version_not_supported")
            raise FramingError(f"{version[:20].decode('latin-1')!r} is not an HTTP version")
        self.requestline = line.rstrip(b"\r\n").decode("latin-1")
        self.command = m[1].decode("ascii")
        path = m[2].decode("latin-1")
        if path.startswith("//"):  # as http.server: never a scheme-relative URL
            path = "/" + path.lstrip("/")
        self.path = path
        self.request_version = version.decode("ascii")
        self.headers = read_headers(self.rfile)
        http11 = version == b"HTTP/1.1"
        close = not http11
        conn = self.headers.get("Connection")
        if conn is not None:
            options = [opt.strip() for opt in conn.lower().split(",")]
            if "close" in options:
                close = True
            elif "keep-alive" in options:
                close = False
        self.close_connection = close
        if http11:
            expect = self.headers.get("Expect")
            self._continue = expect is not None and expect.lower() == "100-continue"

    def check_body_framing(self) -> None:
        """The body's framing, judged before any byte of it is read (RFC 9112 6; stricter):

        - ``Transfer-Encoding``: none is decoded here; ``chunked`` → 411 (send a
          Content-Length), any other coding (``gzip``, ``gzip, chunked``, ...) → 400;
        - ``Content-Length``: 1 to 18 digits, else 400 (a repeated header reads "5, 5");
        - a declared body on a method that takes none (``BODYLESS``) → 400;
        - ``Content-Encoding`` other than ``identity`` → 415 (bodies are never decompressed).

        Each refusal closes the connection: the unread body is never parsed as a request.
        Sets ``body_length`` (None: no Content-Length).
        """
        te = self.headers.get("Transfer-Encoding")
        if te is not None:
            if te.strip().lower() == "chunked":
                raise FramingError("send the body with a Content-Length, not chunked", 411, "length_required")
            raise FramingError(f"Transfer-Encoding {te[:80]!r} is not supported; send the body as is "
                               "with a Content-Length", 400, "bad_transfer_encoding")
        length = self.headers.get("Content-Length")
        if length is not None:
            if not (length.isdigit() and length.isascii() and len(length) <= 18):
                raise FramingError(f"Content-Length {length[:80]!r} is not a number")
            self.body_length = int(length)
        if self.command in self.BODYLESS and self.body_length:
            raise FramingError(f"{self.command} takes no body, and this one declares {self.body_length} "
                               "bytes", 400, "body_not_allowed")
        coding = self.headers.get("Content-Encoding")
        if coding is not None and coding.strip().lower() not in ("", "identity"):
            raise FramingError(f"Content-Encoding {coding[:80]!r} is not supported; send the body "
                               "uncompressed", 415, "unsupported_content_encoding")

    def send_continue(self) -> None:
        """The interim ``100 Continue`` a client sending ``Expect: 100-continue`` waits for; once."""
        if self._continue:
            self._continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- replies ----------------------------------------------------------------------------

    def send_reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
                   close: bool = False) -> None:
        """Status line, headers and (up to SMALL_REPLY) the body in one write; no body for HEAD.
        ``close`` (or a connection closing anyway) sends ``Connection: close``."""
        self.log_request(status)
        self.replied = True
        head = (f"{self.protocol_version} {status} {REASONS.get(status, '')}\r\n"
                f"Server: {self.server_version} {self.sys_version}\r\nDate: {http_date()}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n")
        if headers:
            for k, v in headers.items():
                head += f"{k}: {v}\r\n"
        if close:
            self.close_connection = True
        if self.close_connection:
            head += "Connection: close\r\n"
        elif self.request_version == "HTTP/1.0":
            head += "Connection: keep-alive\r\n"
        data = (head + "\r\n").encode("latin-1")
        if self.command == "HEAD":
            self.wfile.write(data)
        elif len(body) <= SMALL_REPLY:
            self.wfile.write(data + body)
        else:  # no copy of a large body: two writes
            self.wfile.write(data)
            self.wfile.write(body)

    def send_error(self, status: int, code: str, detail: str) -> None:
        """A framing error's JSON answer; the connection closes after it."""
        self.log_error("%s %s: %s", status, code, detail)
        self.send_reply(status, msgspec.json.encode({"error": code, "detail": detail}),
                        "application/json", close=True)

    # -- logs (debug only: called for every request) ---------------------------------------

    def address_string(self) -> str:
        addr = self.client_address
        return str(addr[0]) if isinstance(addr, tuple) and addr else "unix"

    def log_request(self, code: int | str = "-") -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.log_message('"%s" %s', self.requestline, code)

    def log_error(self, format: str, *args: Any) -> None:
        self.log_message(format, *args)

    def log_message(self, format: str, *args: Any) -> None:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("%s %s", self.address_string(), format % args)

"""Connections of the local API: accepted, parked while idle, served by a bounded pool.

    listener ─accept─▶ parked (one selector thread) ─head complete─▶ queue ─▶ worker ─┐
        │ open ≥ max_connections: 503            │ queue full: 503                     │
        │                                        │ idle too long: closed               │
        │                                        │ head begun, not ended in time: 408  │
        └────────────────────────────────────────┴──◀── keep-alive: parked again ◀─────┘

Rules (the figures are ``ConnectionLimits``):

- at most ``max_connections`` connections are open; one more is answered 503 and closed;
- a parked connection costs a socket and its buffered bytes, no thread: the selector thread
  reads what arrives (non-blocking) until the request head is complete (its blank line), the
  client closes, or ``HEAD_DISPATCH`` bytes are buffered; then the connection is queued;
- nothing buffered for ``idle_timeout_s``: closed quietly; a head begun but not complete
  after ``head_timeout_s`` (slowloris): answered 408 and closed;
- at most ``workers`` requests are served at once and ``max_queued`` complete heads wait for
  a worker; one more is answered 503 and closed;
- a worker serves one request (reads during it wait ``io_timeout_s`` at most), then parks the
  connection again, or serves the next request at once when its head is already buffered
  (pipelining).

The request itself (framing, routes) is the ``serve`` callable's (agent.api.http1); this
module only moves bytes and connections.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable

import msgspec

log = logging.getLogger(__name__)

HEAD_DISPATCH = 1 << 16  # buffered head bytes after which a worker reads the rest (and judges it)
MIN_BODY_RATE = 64 * 1024  # bytes per second a body must average, beyond io_timeout_s
_READ_SIZE = 1 << 16
_LEADING_BLANKS = re.compile(rb"[\r\n]*")
_HEAD_END = re.compile(rb"\n\r?\n")
# What a request line looks like at all; a first line that does not (a TLS hello, HTTP/0.9)
# goes to a worker at once to be refused, instead of waiting for a blank line never sent.
# (compiled when a head arrives in pieces, not with the agent)
@functools.cache
def _request_line_shape() -> re.Pattern[bytes]:
    return re.compile(rb"[^ \r\n]+ [^ \r\n]+ HTTP/[0-9.]+\r?\n")


class ConnectionLimits(msgspec.Struct, frozen=True):
    max_connections: int = 1024
    workers: int = 16
    max_queued: int = 256
    backlog: int = 128
    idle_timeout_s: float = 30.0
    head_timeout_s: float = 10.0
    io_timeout_s: float = 30.0
    # After a reply, a worker with nothing queued waits this long for the connection's next
    # request before parking it: a client calling back to back skips the selector thread's
    # hand-off (two thread wake-ups). Never while requests wait for a worker.
    linger_s: float = 0.002


def head_complete(buf: bytes | bytearray) -> bool:
    """Whether ``buf`` holds a whole request head (blank lines before it skipped), or a first
    line that is no request line (answered at once)."""
    m = _LEADING_BLANKS.match(buf)
    start = m.end() if m else 0
    if _HEAD_END.search(buf, start) is not None:
        return True
    eol = buf.find(b"\n", start)
    return eol >= 0 and _request_line_shape().match(buf, start, eol + 1) is None


def canned_reply(status: int, reason: str, code: str, detail: str) -> bytes:
    """A whole reply for refusals made without a request handler (over limits, slowloris)."""
    body = msgspec.json.encode({"error": code, "detail": detail})
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    if status == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


class Connection:
    """One client connection: its socket and the bytes read ahead of the request handler.

    ``readline``/``read``/``write``/``flush`` make it the handler's rfile and wfile; they block
    (the socket's timeout) and raise TimeoutError when the client stalls.
    """

    __slots__ = ("address", "buf", "deadline", "eof", "head_since", "io_timeout", "since", "sock", "state")

    def __init__(self, sock: socket.socket, address: tuple[str, int], io_timeout: float = 30.0) -> None:
        self.sock = sock
        self.address = address
        self.buf = bytearray()
        self.eof = False
        self.since = time.monotonic()  # parked at
        self.head_since = 0.0  # first byte of a head not yet complete
        self.io_timeout = io_timeout  # one read or write waits at most this
        self.deadline = 0.0  # monotonic time the head being read must be complete by (0: none)
        self.state: object = None  # the request handler of this connection, made by the server

    def _wait(self, deadline: float) -> None:
        """The socket's timeout for the next read: io_timeout, or less before ``deadline``."""
        if deadline:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client did not send the request in time")
            self.sock.settimeout(min(self.io_timeout, left))

    def head_read(self) -> None:
        """The head is read: its deadline no longer applies (the body has its own)."""
        self.deadline = 0.0
        self.sock.settimeout(self.io_timeout)

    # -- reading (workers) ----------------------------------------------------------------

    def _fill(self) -> bool:
        if self.eof:
            return False
        self._wait(self.deadline)
        data = self.sock.recv(_READ_SIZE)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def readline(self, limit: int = -1) -> bytes:
        """A line with its end, at most ``limit`` bytes; what is left at EOF."""
        start = 0
        while True:
            end = len(self.buf) if limit < 0 else min(len(self.buf), limit)
            i = self.buf.find(b"\n", start, end)
            if i >= 0:
                return self._take(i + 1)
            if limit >= 0 and len(self.buf) >= limit:
                return self._take(limit)
            start = len(self.buf)
            if not self._fill():
                return self._take(len(self.buf))

    def read(self, n: int) -> bytearray:
        """``n`` bytes (fewer at EOF), received straight into one buffer: no copy of a body.
        They must come within io_timeout plus one second per MIN_BODY_RATE bytes (a trickle
        cannot hold a worker for long), else TimeoutError."""
        deadline = time.monotonic() + self.io_timeout + n / MIN_BODY_RATE
        have = min(n, len(self.buf))
        out = bytearray(n)
        out[:have] = self.buf[:have]
        del self.buf[:have]
        view = memoryview(out)
        got = have
        while got < n and not self.eof:
            self._wait(deadline)
            k = self.sock.recv_into(view[got:])
            if k == 0:
                self.eof = True
            got += k
        view.release()
        self.sock.settimeout(self.io_timeout)
        if got < n:
            del out[got:]
        return out

    # -- writing --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


Serve = Callable[[Connection], bool]  # serves one request; True: keep the connection open


class ConnectionServer:
    """Listening sockets, the selector thread that parks connections, the worker pool."""

    def __init__(self, listeners: list[socket.socket], serve: Serve, limits: ConnectionLimits) -> None:
        self.listeners = listeners
        self.serve = serve
        self.limits = limits
        self._queue: queue.Queue[Connection | None] = queue.Queue(maxsize=limits.max_queued)
        self._returned: collections.deque[Connection] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._open = 0
        self._open_lock = threading.Lock()
        self._stopping = False
        self._acceptor: threading.Thread | None = None
        # the worker pool grows on demand up to limits.workers (see _dispatch); under _pool_lock:
        self._pool_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a connection none is queued for
        self._unmatched = 0  # queued connections no idle or new worker was counted for
        self.refused = collections.Counter[str]()  # reason -> count, for tests and logs

    @property
    def open_connections(self) -> int:
        return self._open

    def start(self) -> None:
        for listener in self.listeners:
            listener.setblocking(False)
        # One worker now, the others when requests need them (_dispatch): starting all of
        # limits.workers (16) before the API answers took ~2-30 ms of a cold start, each
        # start waiting for its thread to be scheduled (docs/performance.md, agent cold start).
        # It is idle before the first connection can be accepted.
        with self._pool_lock:
            self._idle = 1
            self._start_worker()
        self._acceptor = threading.Thread(target=self._select_loop, name="api-accept", daemon=True)
        self._acceptor.start()

    def _start_worker(self) -> None:
        """One more worker (_pool_lock held). Listed only once started, so that ``stop`` joins
        no thread that never ran; a failed start (RuntimeError: the device's thread or memory
        limit) raises to the caller."""
        w = threading.Thread(target=self._work, name=f"api-{len(self._workers)}", daemon=True)
        w.start()
        self._workers.append(w)

    def stop(self) -> None:
        with self._pool_lock:
            self._stopping = True  # no worker starts after this
            workers = list(self._workers)
        self._wake()
        for _ in workers:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                break
        for t in [self._acceptor, *workers]:
            if t is not None:
                t.join(timeout=5)
        for listener in self.listeners:
            listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- bookkeeping ----------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"x")

    def _closed(self, conn: Connection) -> None:
        conn.close()
        with self._open_lock:
            self._open -= 1

    def _refuse(self, conn: Connection, status: int, reason: str, code: str, detail: str) -> None:
        """Answer without a handler (best effort: never blocks the selector thread) and close."""
        self.refused[code] += 1
        log.debug("api %s %s: %s", status, code, detail)
        try:
            conn.sock.setblocking(False)
            conn.sock.send(canned_reply(status, reason, code, detail))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._closed(conn)

    # -- the selector thread --------------------------------------------------------------

    def _select_loop(self) -> None:
        sel = selectors.DefaultSelector()
        for listener in self.listeners:
            sel.register(listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        parked: dict[Connection, None] = {}
        next_sweep = time.monotonic()
        try:
            while not self._stopping:
                for key, _ in sel.select(timeout=0.25):
                    if key.data is None:
                        # registered with data None: a listening socket (the selector types it a file-like)
                        self._accept(key.fileobj, sel, parked)  # type: ignore[arg-type]
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._read(key.data, sel, parked)
                while self._returned:
                    conn = self._returned.popleft()
                    conn.since = time.monotonic()
                    conn.head_since = conn.since if conn.buf else 0.0
                    self._park(conn, sel, parked)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now, sel, parked)
                    next_sweep = now + 0.1
        finally:
            for conn in list(parked):
                self._closed(conn)
            sel.close()

    def _park(self, conn: Connection, sel: selectors.BaseSelector, parked: dict[Connection, None]) -> None:
        try:
            sel.register(conn.sock, selectors.EVENT_READ, conn)
        except (ValueError, OSError):  # closed meanwhile
            self._closed(conn)
            return
        parked[conn] = None

    def _unpark(self, conn: Connection, sel: selectors.BaseSelector, parked: dict[Connection, None]) -> None:
        parked.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            sel.unregister(conn.sock)

    def _accept(self, listener: socket.socket, sel: selectors.BaseSelector,
                parked: dict[Connection, None]) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the next select tries again
                log.warning("api: accept failed: %s", exc)
                return
            if not isinstance(address, tuple):
                address = ("unix", 0)
            conn = Connection(sock, address, self.limits.io_timeout_s)
            with self._open_lock:
                self._open += 1
            if self._open > self.limits.max_connections:
                self._refuse(conn, 503, "Service Unavailable", "busy",
                             f"{self.limits.max_connections} connections are open (api.max_connections); "
                             "retry later")
                continue
            sock.setblocking(False)
            self._park(conn, sel, parked)

    def _read(self, conn: Connection, sel: selectors.BaseSelector, parked: dict[Connection, None]) -> None:
        try:
            data = conn.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._unpark(conn, sel, parked)
            self._closed(conn)
            return
        if not data:
            conn.eof = True
            if not conn.buf.strip():
                self._unpark(conn, sel, parked)
                self._closed(conn)
                return
        else:
            if not conn.buf:
                conn.head_since = time.monotonic()
            conn.buf += data
            if not (len(conn.buf) >= HEAD_DISPATCH or head_complete(conn.buf)):
                return
        self._unpark(conn, sel, parked)
        self._dispatch(conn)

    def _dispatch(self, conn: Connection) -> None:
        """Queue a connection for a worker: an idle one, else a new one while fewer than
        ``limits.workers`` run, else the first to finish (the queue holds ``max_queued``)."""
        try:
            self._queue.put_nowait(conn)
        except queue.Full:
            self._refuse(conn, 503, "Service Unavailable", "busy",
                         f"{self.limits.workers} requests are running and {self.limits.max_queued} waiting "
                         "(api.workers, api.max_queued); retry later")
            return
        with self._pool_lock:
            if self._idle:
                self._idle -= 1
                return
            if len(self._workers) < self.limits.workers and not self._stopping:
                try:
                    self._start_worker()
                    return
                except RuntimeError as exc:  # the acceptor must live on: the running workers serve it
                    log.warning("local API: could not start worker %d of %d (%s); the request waits "
                                "for a running one", len(self._workers) + 1, self.limits.workers, exc)
            self._unmatched += 1

    def _sweep(self, now: float, sel: selectors.BaseSelector, parked: dict[Connection, None]) -> None:
        limits = self.limits
        for conn in list(parked):
            if conn.buf and conn.buf.strip():
                if now - conn.head_since > limits.head_timeout_s:
                    self._unpark(conn, sel, parked)
                    self._refuse(conn, 408, "Request Timeout", "head_timeout",
                                 f"the request head did not end within {limits.head_timeout_s:g} s "
                                 "(api.head_timeout_s)")
            elif now - conn.since > limits.idle_timeout_s:
                self._unpark(conn, sel, parked)
                self._closed(conn)

    # -- workers --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            try:
                self._serve_connection(conn)
            except Exception:  # never lose a worker
                log.exception("api: connection failed")
                self._closed(conn)
            with self._pool_lock:  # free again: for a connection queued meanwhile, or idle
                if self._unmatched:
                    self._unmatched -= 1
                else:
                    self._idle += 1

    def _linger(self, conn: Connection) -> bool:
        """Wait up to ``linger_s`` for the next request head on ``conn`` when no other
        request waits for a worker; True when a complete head arrived."""
        if self.limits.linger_s <= 0 or not self._queue.empty() or conn.eof:
            return False
        deadline = time.monotonic() + self.limits.linger_s
        try:
            while not head_complete(conn.buf):
                left = deadline - time.monotonic()
                if left <= 0 or len(conn.buf) >= HEAD_DISPATCH or not self._queue.empty():
                    return False
                conn.sock.settimeout(left)
                data = conn.sock.recv(_READ_SIZE)
                if not data:
                    conn.eof = True
                    return bool(conn.buf.strip())  # the worker answers what is left, then closes
                if not conn.buf:
                    conn.head_since = time.monotonic()
                conn.buf += data
        except TimeoutError:
            return False
        except OSError:
            conn.eof = True
            return False
        finally:
            conn.sock.settimeout(self.limits.io_timeout_s)
        return True

    def _serve_connection(self, conn: Connection) -> None:
        conn.sock.settimeout(self.limits.io_timeout_s)
        # the rest of a head dispatched unfinished (64 KiB of it) must come in the same time
        conn.deadline = (conn.head_since or time.monotonic()) + self.limits.head_timeout_s
        while True:
            if not self.serve(conn) or self._stopping or (conn.eof and not conn.buf):
                self._closed(conn)
                return
            if not head_complete(conn.buf) and not self._linger(conn):
                if conn.eof and not conn.buf.strip():  # the client closed while we lingered
                    self._closed(conn)
                    return
                break
            conn.deadline = time.monotonic() + self.limits.head_timeout_s  # pipelined: already here
        conn.sock.setblocking(False)
        self._returned.append(conn)
        self._wake()

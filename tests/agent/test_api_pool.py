"""The local API's worker pool: one worker at start, more on demand up to api.workers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from agent.api.connections import Connection, ConnectionLimits, ConnectionServer


def _workers() -> list[str]:
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith("api-") and t.name != "api-accept")


def _listener(tmp_path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "api.sock"))
    listener.listen(16)
    return listener


def _request(tmp_path: Path) -> socket.socket:
    """A client that sent one request head (the server answers b"ok")."""
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(tmp_path / "api.sock"))
    c.sendall(b"GET / HTTP/1.1\r\n\r\n")
    return c


def test_the_pool_starts_with_one_worker_and_grows_up_to_the_limit(tmp_path: Path) -> None:
    listener = _listener(tmp_path)
    release = threading.Event()
    busy: list[str] = []
    lock = threading.Lock()

    def serve(conn: Connection) -> bool:
        with lock:
            busy.append(threading.current_thread().name)
        release.wait(10)
        conn.write(b"ok")
        return False

    server = ConnectionServer([listener], serve, ConnectionLimits(workers=3, max_queued=8))
    server.start()
    clients = []
    try:
        assert _workers() == ["api-0"]  # a start waits for one worker thread, not api.workers
        for _ in range(5):
            clients.append(_request(tmp_path))
        deadline = time.monotonic() + 10
        while len(busy) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(busy) == 3 and _workers() == ["api-0", "api-1", "api-2"]  # never beyond the limit
        release.set()
        for c in clients:  # the two queued ones are served by the first workers to finish
            c.settimeout(10)
            assert c.recv(16) == b"ok"
        assert len(busy) == 5 and len(_workers()) == 3
    finally:
        release.set()
        for c in clients:
            c.close()
        server.stop()
    assert _workers() == []


def test_a_worker_that_finished_takes_the_next_request_without_a_new_thread(tmp_path: Path) -> None:
    listener = _listener(tmp_path)

    def serve(conn: Connection) -> bool:
        conn.write(b"ok")
        return False

    server = ConnectionServer([listener], serve, ConnectionLimits(workers=4))
    server.start()
    try:
        for _ in range(20):  # one at a time: the one worker serves them all
            c = _request(tmp_path)
            c.settimeout(10)
            assert c.recv(16) == b"ok"
            c.close()
            deadline = time.monotonic() + 10
            while server._idle != 1 and time.monotonic() < deadline:  # its bookkeeping follows the reply
                time.sleep(0.001)
        assert _workers() == ["api-0"]
    finally:
        server.stop()


def test_a_worker_that_cannot_start_leaves_the_api_serving(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a device at its thread limit: starting api-1 and later fails; the acceptor must not die
    # with it, the request waits for the running worker, and stop still ends cleanly
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name.startswith("api-") and self.name not in ("api-0", "api-accept"):
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    listener = _listener(tmp_path)
    release = threading.Event()

    def serve(conn: Connection) -> bool:
        release.wait(10)
        conn.write(b"ok")
        return False

    server = ConnectionServer([listener], serve, ConnectionLimits(workers=3, max_queued=8))
    server.start()
    clients = []
    try:
        for _ in range(3):
            clients.append(_request(tmp_path))
        time.sleep(0.3)
        assert _workers() == ["api-0"]
        assert server._acceptor is not None and server._acceptor.is_alive()
        release.set()
        for c in clients:  # all served, one after the other, by the one worker
            c.settimeout(10)
            assert c.recv(16) == b"ok"
        late = _request(tmp_path)  # and the API still accepts
        late.settimeout(10)
        assert late.recv(16) == b"ok"
        late.close()
    finally:
        release.set()
        for c in clients:
            c.close()
        server.stop()
    assert _workers() == []

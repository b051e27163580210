"""The agent's native journald entries, received on a real unix datagram socket the test
binds in place of /run/systemd/journal/socket and parsed here by the protocol's rules
(systemd.journal-fields(7)): KEY=value lines, a binary-safe form for values with newlines,
and an entry over the datagram limit passed as a sealed memfd."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.journald as journald
from agent.logsetup import setup_logging


def parse(data: bytes) -> dict[str, str]:
    """One native-protocol entry: field -> value (the test's own reading of the format)."""
    out: dict[str, str] = {}
    rest = data
    while rest:
        line, rest = rest.split(b"\n", 1)
        if b"=" in line:
            key, value = line.split(b"=", 1)
        else:  # KEY\n, 64-bit little-endian size, the bytes, \n
            key, (size,) = line, struct.unpack("<Q", rest[:8])
            value, rest = rest[8:8 + size], rest[8 + size:]
            assert rest[:1] == b"\n"
            rest = rest[1:]
        assert key and key == key.upper() and not key.startswith(b"_"), key
        out[key.decode()] = value.decode()
    return out


def receive(sock: socket.socket, *, memfd: bool = False) -> dict[str, str]:
    """A datagram, or the memfd it passes (SCM_RIGHTS; expected when ``memfd``), parsed."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:fds.itemsize])
    assert bool(fds) == memfd
    if fds:
        fd = fds[0]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK, "journald wants it sealed"
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    return parse(data)


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    monkeypatch.setattr(journald, "JOURNAL_SOCKET", str(path))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield sock
    finally:
        for h in root.handlers:
            if h not in saved[0]:
                h.close()
        root.handlers[:], root.level = saved
        sock.close()


def test_agent_lines_carry_priority_device_event_and_release(
    journal: socket.socket, monkeypatch: pytest.MonkeyPatch,
) -> None:
    st = os.fstat(2)  # stderr is the journal's stream, as systemd says in JOURNAL_STREAM
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging("INFO", "text", device_id="dev-7")
    log = logging.getLogger("agent.update.installer")
    # the installer's event line, as it logs every lifecycle event
    log.warning("model=%s event=%s release=%s from=%s reason=%s %s", "clf", "rolled_back", 12, 11,
                "trial_errors", "error rate 0.4 over 0.2")
    entry = receive(journal)
    assert entry["PRIORITY"] == "4" and entry["DEVICE_ID"] == "dev-7"
    assert entry["EVENT"] == "rolled_back" and entry["RELEASE"] == "12" and entry["MODEL"] == "clf"
    assert entry["REASON"] == "trial_errors" and entry["FROM"] == "11"
    assert entry["SYSLOG_IDENTIFIER"] == "edgefleet-agent" and entry["LOGGER"] == "agent.update.installer"
    assert entry["MESSAGE"].endswith("reason=trial_errors error rate 0.4 over 0.2")
    assert entry["CODE_FUNC"] == "test_agent_lines_carry_priority_device_event_and_release"

    logging.getLogger("agent").info("a %s line", "plain", extra={"bundle_digest": "ab12"})
    entry = receive(journal)
    assert entry["PRIORITY"] == "6" and entry["MESSAGE"] == "agent: a plain line"
    assert entry["BUNDLE_DIGEST"] == "ab12" and "EVENT" not in entry


def test_a_traceback_and_a_huge_entry_arrive_whole(journal: socket.socket) -> None:
    setup_logging("INFO", "journal", device_id="dev-8")
    log = logging.getLogger("agent")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("pull failed")
    entry = receive(journal)
    assert entry["PRIORITY"] == "3" and entry["MESSAGE"].startswith("agent: pull failed\nTraceback")
    assert entry["MESSAGE"].endswith("ValueError: bad\nthing")
    big = "x" * (1 << 20)  # over any datagram limit: sent as a memfd
    log.info("blob %s", big)
    assert receive(journal, memfd=True)["MESSAGE"] == f"agent: blob {big}"


def test_without_a_journal_lines_go_to_stderr_with_their_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(journald, "JOURNAL_SOCKET", str(tmp_path / "absent.socket"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "journal")
        logging.getLogger("agent").warning("still %s", "seen")
        sys.stderr.flush()
        assert "<4>agent: still seen" in capfd.readouterr().err
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved

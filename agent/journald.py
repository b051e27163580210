"""Log records to systemd's journal through its native protocol, with structured fields.

The protocol (systemd.journal-fields(7), "Native Journal Protocol"): one datagram per entry
on the unix socket /run/systemd/journal/socket, made of ``KEY=value\\n`` lines; a value
holding a newline is sent as ``KEY\\n``, its length as 64-bit little-endian, the bytes and
``\\n``. An entry too large for a datagram goes in a sealed memfd passed with SCM_RIGHTS.
Keys are upper-case letters, digits and underscores, not starting with an underscore.

Fields of every entry: MESSAGE, PRIORITY (syslog level), SYSLOG_IDENTIFIER, LOGGER,
CODE_FILE/CODE_LINE/CODE_FUNC, THREAD, DEVICE_ID (when known); and from the record:
``key=%s`` pairs of its format string (the agent's event lines: ``model=%s event=%s
release=%s ...`` give MODEL, EVENT, RELEASE, ...) and any ``extra=`` attributes, upper-cased.
So ``journalctl -u edgefleet-agent EVENT=rolled_back RELEASE=12`` finds them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import threading
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

# one printf conversion of a %-format string (the %% escape included, to skip it)
_CONVERSION = re.compile(r"%(?:%|(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa])")
_KEY_BEFORE = re.compile(r"(?:^|[\s,;(\[])([A-Za-z][A-Za-z0-9_]*)=$")
_NOT_KEY = re.compile(r"[^A-Z0-9_]")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "priority"}


def field_name(key: str) -> str | None:
    """``key`` as a journal field name, or None when nothing of it is usable."""
    name = _NOT_KEY.sub("_", key.upper()).lstrip("_")[:64]
    return name if name and not name[0].isdigit() else None


def message_fields(record: logging.LogRecord) -> dict[str, str]:
    """``key=%s`` pairs of the record's format string, with their arguments, and the
    record's extra attributes; names upper-cased."""
    out: dict[str, str] = {}
    args = record.args if isinstance(record.args, tuple) else ()
    if isinstance(record.msg, str) and args:
        index = 0
        for m in _CONVERSION.finditer(record.msg):
            if m.group() == "%%":
                continue
            before = _KEY_BEFORE.search(record.msg, 0, m.start())
            if before is not None and index < len(args):
                name = field_name(before.group(1))
                if name:
                    out[name] = str(args[index])
            index += 1
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            name = field_name(key)
            if name:
                out[name] = str(value)
    return out


def encode_entry(fields: dict[str, str]) -> bytes:
    """One entry in the native protocol's wire format."""
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def journal_stream_is_stderr() -> bool:
    """True when stderr is the journal's stream (JOURNAL_STREAM names its device:inode), the
    test systemd documents for switching to the native protocol."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalHandler(logging.Handler):
    """Sends each record to the journal; a record it cannot send goes to ``fallback``
    (the stderr handler, which journald also collects) so nothing is lost."""

    def __init__(self, *, identifier: str = "edgefleet-agent", device_id: str | None = None,
                 socket_path: str | None = None, fallback: logging.Handler | None = None) -> None:
        super().__init__()
        self.identifier = identifier
        self.device_id = device_id
        self.socket_path = socket_path or JOURNAL_SOCKET
        self.fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send_lock = threading.Lock()

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(PRIORITY.get(record.levelname, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD": record.threadName or "",
        }
        if self.device_id:
            fields["DEVICE_ID"] = self.device_id
        for key, value in message_fields(record).items():
            fields.setdefault(key, value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(encode_entry(self.fields(record)))
        except Exception:
            if self.fallback is not None:
                self.fallback.handle(record)
            else:
                self.handleError(record)

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendto(data, self.socket_path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """An entry over the datagram limit: in a sealed memfd, its descriptor passed."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            # journald takes a memfd only sealed against change
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
                               0, self.socket_path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()


def decode_entry(data: bytes) -> dict[str, Any]:
    """The inverse of ``encode_entry`` (for tests and tools): field -> str."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            out[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return out

"""Checks ``edgefleet serve`` makes before it starts anything, each failure one sentence that
names the address or URL at fault (no traceback unless ``--debug``)."""

from __future__ import annotations

import errno
import socket

SUPPORTED_DATABASES = ("sqlite", "postgresql")
DATABASE_EXAMPLES = "sqlite:///PATH/fleet.db or postgresql://USER@HOST/DB"


class StartError(Exception):
    """The fleet cannot start; the message says which thing at which address, and the fix."""


def check_database_url(url: str) -> None:
    """Only SQLite and PostgreSQL are supported (``postgres://`` and a ``+driver`` accepted)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+", 1)[0] not in (*SUPPORTED_DATABASES, "postgres"):
        raise StartError(
            f"database URL scheme {scheme or url!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_DATABASES)} ({DATABASE_EXAMPLES})"
        )


def check_can_listen(host: str, port: int, what: str, option: str) -> None:
    """Bind ``host:port`` once (as the server will, SO_REUSEADDR) and let it go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartError(
                    f"cannot listen for {what} on {host}:{port}: the address is already in use "
                    f"(another edgefleet serve?); stop that process or choose another {option}"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise StartError(
                    f"cannot listen for {what} on {host}:{port}: no interface of this machine has "
                    f"address {host}; listen on one it has (0.0.0.0 for all)"
                ) from None
            if exc.errno == errno.EACCES:
                raise StartError(
                    f"cannot listen for {what} on {host}:{port}: permission denied (ports below 1024 "
                    f"need privileges); choose another {option}"
                ) from None
            raise StartError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from None


def database_unreachable(url_for_logs: str, exc: BaseException) -> StartError:
    """The driver's first line (``connection refused``, ``password authentication failed``)."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return StartError(f"cannot use the database {url_for_logs}: {first}")

"""Secrets the fleet is given: read from files or the environment, never required on the
command line, where every local user reads them (``ps``, ``/proc/<pid>/cmdline``).

Pure helpers; ``fleet.settings`` reads the ``EDGEFLEET_*_FILE`` variables with them and
``edgefleet serve`` its ``--*-file`` options (docs/deployment.md, "Secrets").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import urlsplit


class SecretError(ValueError):
    """A secret file that cannot be used; the message names the option and the file."""


def read_secret_file(path: Path, what: str) -> str:
    """The secret in ``path``: its one line, surrounding whitespace (a trailing newline) dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SecretError(f"{what}: cannot read {path}: {reason}") from None
    value = text.strip()
    if not value:
        raise SecretError(f"{what}: {path} is empty")
    if "\n" in value:
        raise SecretError(f"{what}: {path} holds several lines; put the secret alone on one line")
    return value


def open_to_others(path: Path) -> bool:
    """Whether group or others may read ``path`` (a secret file should be 0600 or 0400)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def url_has_password(url: str | None) -> bool:
    if not url:
        return False
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def with_database_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its password (the URL itself then holds none)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.password is not None:
        raise SecretError("the database URL has a password already; give it either in the URL or "
                          "as the database password, not both")
    return parsed.set(password=password).render_as_string(hide_password=False)


# (option, env variable, file option) of the secrets ``edgefleet serve`` takes as flags
SECRET_FLAGS = (
    ("--admin-token", "EDGEFLEET_ADMIN_TOKEN", "--admin-token-file"),
    ("--enrollment-token", "EDGEFLEET_ENROLLMENT_TOKEN", "--enrollment-token-file"),
)
SECRET_URL_FLAGS = (
    ("--database-url", "EDGEFLEET_DATABASE_URL", "--database-password-file"),
    ("--mqtt-url", "EDGEFLEET_MQTT_URL", "--mqtt-login-password-file"),
    ("--public-mqtt-url", "EDGEFLEET_PUBLIC_MQTT_URL", None),
)


def command_line_warnings(given: dict[str, str | None]) -> list[str]:
    """What to warn about: each secret given as a command-line flag (``given``: flag → value)."""
    out = []
    for flag, env, file_flag in SECRET_FLAGS:
        if given.get(flag):
            out.append(f"{flag} puts the secret in the process list (ps); use {file_flag} FILE or {env}")
    for flag, env, file_flag in SECRET_URL_FLAGS:
        if url_has_password(given.get(flag)):
            instead = f"{file_flag} FILE" if file_flag else "no password in it"
            out.append(f"{flag} holds a password, shown in the process list (ps); use {instead} or {env}")
    return out

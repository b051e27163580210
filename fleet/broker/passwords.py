"""Per-device broker passwords in a Mosquitto password file, O(1) per change.

- the format is mosquitto_passwd's (Mosquitto 2): one ``user:$7$<iterations>$<salt>$<hash>``
  line per user, PBKDF2-HMAC-SHA512 over the password with a random 12-byte salt, 101
  iterations, a 64-byte hash, salt and hash in standard base64;
- the file is a log: a change *appends* the user's line (O(1), whatever the fleet's size).
  Mosquitto keeps the last line of a user (checked against Mosquitto 2.0 in
  tests/fleet/test_broker_credentials.py), so a newer line replaces an older one;
- revoking a user appends a line whose password is a random secret nobody keeps: the user
  can no longer log in, and Mosquitto's reload disconnects its live session;
- once the file has grown to twice its size after the last compaction (and at least
  ``COMPACT_MIN_BYTES``), it is rewritten with one line per user, atomically (temp file,
  fsync, rename), keeping its mode and group: amortised O(1) per change;
- every change runs under an ``flock`` on a sidecar lock file, so API processes on one host
  never lose each other's updates;
- after a change ``reload_command`` (e.g. ``systemctl reload mosquitto``) makes the broker
  re-read the file. Its failure is logged, not raised: the password is already stored and
  the next reload picks it up.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

from shared.randomtoken import random_token

log = logging.getLogger(__name__)

ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12
HASH_BYTES = 64
RELOAD_TIMEOUT_S = 10.0
COMPACT_MIN_BYTES = 64 << 10  # below this a rewrite costs nothing worth saving


class PasswordFileError(OSError):
    """The password file cannot be read or written; the message names the file."""


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """``$7$...`` as mosquitto_passwd writes it."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(encoded: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` entry (for tests and diagnostics)."""
    try:
        _, kind, iterations, salt, digest = encoded.split("$")
        if kind != "7":
            return False
        expect = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt),
                                  int(iterations), len(expect))
    except ValueError:
        return False
    return hmac.compare_digest(got, expect)


def new_password() -> str:
    return random_token(24)


class BrokerPasswordFile:
    def __init__(self, path: Path, reload_command: str | None = None) -> None:
        self.path = Path(path)
        self.reload_command = reload_command
        self._mark = self.path.with_name(f".{self.path.name}.compacted")

    def entries(self) -> dict[str, str]:
        """user -> encoded password, as the broker reads the file now (the last line wins)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PasswordFileError(f"cannot read broker password file {self.path}: {exc}") from None
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def set(self, user: str, password: str) -> None:
        """Store ``user``'s password (replacing an old one), then ask the broker to reload."""
        self._append(user, hash_password(password))

    def revoke(self, user: str) -> None:
        """``user`` can no longer log in; the broker's reload ends its session at once."""
        self._append(user, hash_password(secrets.token_urlsafe(32)))

    def _append(self, user: str, encoded: str) -> None:
        if not user or ":" in user or "\n" in user or "\r" in user or "\0" in user:
            raise ValueError(f"broker user name {user!r} cannot go into a password file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                size = self._append_line(f"{user}:{encoded}\n".encode())
                if size >= max(COMPACT_MIN_BYTES, 2 * self._compacted_size()):
                    self._compact()
        except OSError as exc:
            raise PasswordFileError(f"cannot update broker password file {self.path}: {exc}") from None
        self.reload()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _append_line(self, line: bytes) -> int:
        """Append one line durably; the file's size after it."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size and not _ends_with_newline(fd):
                line = b"\n" + line  # a hand-edited file without a final newline
            os.write(fd, line)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        return size

    def _compacted_size(self) -> int:
        try:
            return int(self._mark.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _compact(self) -> None:
        """Rewrite the file with one line per user (the last one), atomically."""
        entries = self.entries()
        st = os.stat(self.path)
        body = "".join(f"{user}:{encoded}\n" for user, encoded in entries.items()).encode()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(PermissionError):  # not a member of the file's group
                os.chown(tmp, -1, st.st_gid)
            os.chmod(tmp, st.st_mode & 0o777)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)
        self._mark.write_text(f"{len(body)}\n")
        log.info("broker password file %s compacted: %d users, %d bytes", self.path, len(entries), len(body))

    def reload(self) -> None:
        if not self.reload_command:
            return
        argv = shlex.split(self.reload_command)
        try:
            done = subprocess.run(argv, capture_output=True, timeout=RELOAD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("broker reload command %r failed: %s", self.reload_command, exc)
            return
        if done.returncode != 0:
            log.error("broker reload command %r exited %d: %s", self.reload_command, done.returncode,
                      done.stderr.decode(errors="replace").strip()[:500])


def _ends_with_newline(fd: int) -> bool:
    return os.pread(fd, 1, os.fstat(fd).st_size - 1) == b"\n"


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

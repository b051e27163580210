"""Per-device broker passwords in a Mosquitto password file.

- the format is mosquitto_passwd's (Mosquitto 2): one ``user:$7$<iterations>$<salt>$<hash>``
  line per user, PBKDF2-HMAC-SHA512 over the password with a random 12-byte salt, 101
  iterations, a 64-byte hash, salt and hash in standard base64;
- a set replaces the user's line (or appends one) and keeps every other line as it was;
  the file is rewritten atomically (temp file, fsync, rename) under an ``flock`` on a
  sidecar lock file, so API processes on one host never lose each other's updates;
- the new file keeps the old one's mode and group (the broker must still read it);
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
from pathlib import Path

from shared.randomtoken import random_token

log = logging.getLogger(__name__)

ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12
HASH_BYTES = 64
RELOAD_TIMEOUT_S = 10.0


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

    def entries(self) -> dict[str, str]:
        """user -> encoded password, as the file holds them now."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PasswordFileError(f"cannot read broker password file {self.path}: {exc}") from None
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def set(self, user: str, password: str) -> None:
        """Store ``user``'s password (replacing an old one), then ask the broker to reload."""
        if not user or ":" in user or "\n" in user:
            raise ValueError(f"broker user name {user!r} cannot go into a password file")
        line = f"{user}:{hash_password(password)}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._rewrite(user, line)
        except OSError as exc:
            raise PasswordFileError(f"cannot update broker password file {self.path}: {exc}") from None
        self.reload()

    @contextlib.contextmanager
    def _locked(self):  # type: ignore[no-untyped-def]
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _rewrite(self, user: str, line: str) -> None:
        try:
            old = self.path.read_text()
            st = os.stat(self.path)
            mode, gid = st.st_mode & 0o777, st.st_gid
        except FileNotFoundError:
            old, mode, gid = "", 0o640, -1
        lines = [x for x in old.splitlines() if x.split(":", 1)[0] != user]
        lines.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if gid != -1:
                with contextlib.suppress(PermissionError):  # not a member of the file's group
                    os.chown(tmp, -1, gid)
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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

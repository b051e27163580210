"""Persisted update state in state_dir, written atomically, read fail-closed.

Layout:
    models/<name>.json      the ModelRecord of each model (lifecycle state, releases)
    antirollback.json       highest (release, digest) accepted per model
    agent.lock              held (flock) by the process that may change the state

A record or the anti-rollback file that cannot be read or parsed raises StateError:
the agent refuses to guess, because resetting anti-rollback would reopen the device
to replayed old releases.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import IO

import msgspec

from agent.errors import StateError
from agent.update.lifecycle import ModelRecord
from shared.bundle.manifest import NAME_RE
from shared.fsutil import atomic_write

ANTIROLLBACK_FILE = "antirollback.json"
MAX_STATE_BYTES = 1 << 20


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.models_dir = self.state_dir / "models"
        self._lock = threading.Lock()
        self._lock_fh: IO[bytes] | None = None

    def ensure_dirs(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)

    # -- process lock ---------------------------------------------------------------

    def acquire(self) -> None:
        """Take the exclusive lock on state_dir, or raise StateError when another process holds it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.state_dir / "agent.lock", "ab")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StateError(
                f"another edgefleet-agent process holds {self.state_dir / 'agent.lock'}; "
                "stop it first (systemctl stop edgefleet-agent)"
            ) from None
        self._lock_fh = fh

    def release(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    # -- records --------------------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise ValueError(f"model name {name!r} is not valid")
        return self.models_dir / f"{name}.json"

    def _read(self, path: Path) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read state file {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_STATE_BYTES:
            raise StateError(f"state file {path} is larger than {MAX_STATE_BYTES} bytes")
        return data

    def load(self, name: str) -> ModelRecord | None:
        path = self._record_path(name)
        data = self._read(path)
        if data is None:
            return None
        try:
            record = msgspec.json.decode(data, type=ModelRecord)
        except msgspec.DecodeError as exc:
            raise StateError(
                f"state file {path} is corrupt ({exc}); refusing to guess. Inspect it, then "
                "remove it to reinstall the model from scratch"
            ) from None
        if record.name != name:
            raise StateError(f"state file {path} holds the record of {record.name!r}")
        return record

    def load_all(self) -> dict[str, ModelRecord]:
        if not self.models_dir.is_dir():
            return {}
        out = {}
        for path in sorted(self.models_dir.glob("*.json")):
            record = self.load(path.stem)
            if record is not None:
                out[record.name] = record
        return out

    def save(self, record: ModelRecord) -> None:
        self.ensure_dirs()
        with self._lock:
            atomic_write(self._record_path(record.name), msgspec.json.encode(record))

    # -- anti-rollback --------------------------------------------------------------

    def _antirollback(self) -> dict[str, tuple[int, str]]:
        path = self.state_dir / ANTIROLLBACK_FILE
        data = self._read(path)
        if data is None:
            return {}
        try:
            return msgspec.json.decode(data, type=dict[str, tuple[int, str]])
        except msgspec.DecodeError as exc:
            raise StateError(
                f"anti-rollback file {path} is corrupt ({exc}); refusing to accept any bundle "
                "until it is repaired (it holds the highest release accepted per model)"
            ) from None

    def highest(self, name: str) -> tuple[int, str] | None:
        with self._lock:
            return self._antirollback().get(name)

    def raise_highest(self, name: str, release: int, digest: str) -> None:
        """Record (release, digest) as the highest accepted for ``name``; never lowers it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            table = self._antirollback()
            current = table.get(name)
            if current is not None and current[0] >= release:
                return
            table[name] = (release, digest)
            atomic_write(self.state_dir / ANTIROLLBACK_FILE, msgspec.json.encode(table))


def check_state_dir_writable(state_dir: Path) -> None:
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state_dir {state_dir}: {exc.strerror or exc}") from None
    if not os.access(state_dir, os.W_OK):
        raise StateError(f"state_dir {state_dir} is not writable by this user")

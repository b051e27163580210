"""The builder's release ledger: the highest release issued per model on this machine.

``edgefleet bundle build`` numbers a build ``max(now in ms, highest known + 1)``
(shared.release.next_release); the ledger is where "highest known" lives between builds, so
two builds of one model never share a number however fast they come, and numbers keep
growing when the clock is behind the last release. It is a small JSON file (by default
``releases.json`` in the key directory: whoever signs with these keys shares it), changed
under an exclusive ``flock`` and written atomically, so parallel builds on one machine each
reserve their own number. A number is reserved when it is handed out: a build that fails
afterwards leaves a gap, never a duplicate.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.errors import EdgefleetError
from shared.fsutil import atomic_write
from shared.release import MAX_RELEASE, check_explicit_release, next_release

LEDGER_NAME = "releases.json"


class LedgerError(EdgefleetError):
    """The ledger file cannot be read, parsed or written."""

    code = "ledger"


class ReleaseLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")

    @contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        """The ledger's contents under an exclusive lock; written back when the block ends."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"cannot open the release ledger lock {self._lock_path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read()
            before = dict(entries)
            yield entries
            if entries != before:
                try:
                    atomic_write(self.path, json.dumps(entries, indent=1, sort_keys=True).encode() + b"\n")
                except OSError as exc:
                    raise LedgerError(f"cannot write the release ledger {self.path}: {exc}") from None
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LedgerError(f"cannot read the release ledger {self.path}: {exc}") from None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise LedgerError(
                f"release ledger {self.path} is not JSON ({exc}); repair or remove it "
                "(the fleet still refuses reused numbers)"
            ) from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_RELEASE
            for k, v in data.items()
        ):
            raise LedgerError(f"release ledger {self.path} must map model names to release numbers")
        return data

    def highest(self, model: str) -> int:
        with self._locked() as entries:
            return entries.get(model, 0)

    def reserve(self, model: str, *, now_ms: int, explicit: int | None = None, fleet_highest: int = 0,
                fleet_source: str = "") -> int:
        """Hand out the release of a new build of ``model`` and record it at once.

        ``explicit``: the operator's ``--release``, refused (ReleaseNotAboveError) unless it
        is above both the ledger and ``fleet_highest``."""
        with self._locked() as entries:
            mine = entries.get(model, 0)
            if explicit is not None:
                check_explicit_release(explicit, mine, model=model, source=f"release ledger {self.path}")
                if fleet_highest:
                    check_explicit_release(explicit, fleet_highest, model=model, source=fleet_source)
                release = explicit
            else:
                release = next_release(now_ms, max(mine, fleet_highest))
            entries[model] = release
            return release

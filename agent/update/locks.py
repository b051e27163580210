"""Update locks held by local applications: while any is held, no release is activated.

Rules:
- a lock is named by its holder (``camera-app``); several holders may hold locks at once,
  and activation waits until none is held;
- every lock has a lease (1 s to ``max_lease_s``); taking it again or renewing it starts a
  new lease; a lease that runs out releases the lock by itself, so a crashed application
  cannot block updates for longer than its lease;
- lease deadlines are CLOCK_MONOTONIC times: a jump of the wall clock neither extends nor
  shortens a lease;
- the table is kept in ``state_dir/locks.json`` with the kernel's boot id: a restart of the
  agent keeps the locks (the applications that hold them are still running), a reboot drops
  them (the applications that held them were killed with it). Monotonic time is system-wide
  within one boot, so the remaining lease survives an agent restart exactly.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from shared.fsutil import atomic_write

log = logging.getLogger(__name__)

LOCKS_FILE = "locks.json"
HOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_HOLDERS = 64
MIN_LEASE_S = 1.0
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


class LockError(Exception):
    """A refused lock operation; ``code`` is the API error code, ``status`` the HTTP status."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class Lease(msgspec.Struct, frozen=True):
    holder: str
    deadline: float  # time.monotonic() at which it runs out
    lease_s: float
    reason: str = ""

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)


class _Persisted(msgspec.Struct):
    boot_id: str
    locks: list[tuple[str, float, float, str]]  # holder, monotonic deadline, lease_s, reason


def current_boot_id() -> str:
    """The kernel's id of this boot (changes at every reboot); "" where there is none."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


class LockTable:
    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        max_lease_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        boot_id: str | None = None,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(state_dir) / LOCKS_FILE if state_dir is not None else None
        self.max_lease_s = max_lease_s
        self.clock = clock
        self.boot_id = current_boot_id() if boot_id is None else boot_id
        self.on_release = on_release
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._load()

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read %s (%s); starting without update locks", self.path, exc)
            return
        try:
            doc = msgspec.json.decode(data, type=_Persisted)
        except msgspec.DecodeError as exc:
            log.warning("%s is corrupt (%s); starting without update locks", self.path, exc)
            return
        if not self.boot_id or doc.boot_id != self.boot_id:
            if doc.locks:
                log.info("dropping %d update lock(s) of a previous boot (their holders were "
                         "stopped with it)", len(doc.locks))
            return
        now = self.clock()
        for holder, deadline, lease_s, reason in doc.locks:
            if HOLDER_RE.match(holder) and deadline > now:
                # A deadline can never be further than one lease away (guards a bad file).
                deadline = min(deadline, now + min(lease_s, self.max_lease_s))
                self._leases[holder] = Lease(holder, deadline, lease_s, reason)
        if self._leases:
            log.info("update locks kept across the agent restart: %s", ", ".join(sorted(self._leases)))

    def _save(self) -> None:
        if self.path is None:
            return
        doc = _Persisted(self.boot_id, [(x.holder, x.deadline, x.lease_s, x.reason)
                                        for x in self._leases.values()])
        try:
            atomic_write(self.path, msgspec.json.encode(doc))
        except OSError as exc:  # the locks still hold in memory
            log.warning("cannot write %s: %s", self.path, exc)

    # -- operations --------------------------------------------------------------------

    def _expire(self, now: float) -> bool:
        gone = [h for h, x in self._leases.items() if x.deadline <= now]
        for h in gone:
            log.info("update lock of %r expired (lease %.0f s not renewed)", h, self._leases[h].lease_s)
            del self._leases[h]
        return bool(gone)

    def _check(self, holder: str, lease_s: float) -> None:
        if not HOLDER_RE.match(holder):
            raise LockError(400, "bad_holder", f"holder {holder[:80]!r} must be 1-64 characters of "
                            "letters, digits, '.', '_' or '-', starting with a letter or digit")
        if not MIN_LEASE_S <= lease_s <= self.max_lease_s:
            raise LockError(400, "bad_lease", f"lease_s {lease_s} must be between {MIN_LEASE_S:g} and "
                            f"{self.max_lease_s:g} seconds (update.lock_max_lease_s); renew it "
                            "before it runs out to hold the lock longer")

    def acquire(self, holder: str, lease_s: float, reason: str = "") -> Lease:
        """Take the lock of ``holder`` (or take it again: a new lease)."""
        self._check(holder, lease_s)
        with self._lock:
            now = self.clock()
            self._expire(now)
            if holder not in self._leases and len(self._leases) >= MAX_HOLDERS:
                raise LockError(409, "too_many_locks", f"{MAX_HOLDERS} holders already hold update "
                                "locks; release one first")
            lease = Lease(holder, now + lease_s, lease_s, reason[:200])
            self._leases[holder] = lease
            self._save()
        return lease

    def renew(self, holder: str, lease_s: float | None = None) -> Lease:
        """A new lease for a lock still held; LockError 404 once it expired or was released."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            old = self._leases.get(holder)
            if old is None:
                raise LockError(404, "no_lock", f"{holder!r} holds no update lock (it expired or was "
                                "released; an update may have been activated since): take it again")
            lease_s = old.lease_s if lease_s is None else lease_s
            self._check(holder, lease_s)
            lease = Lease(holder, now + lease_s, lease_s, old.reason)
            self._leases[holder] = lease
            self._save()
        return lease

    def release(self, holder: str) -> None:
        with self._lock:
            self._expire(self.clock())
            if self._leases.pop(holder, None) is None:
                raise LockError(404, "no_lock", f"{holder!r} holds no update lock")
            self._save()
        if self.on_release is not None:
            self.on_release()

    def held(self) -> list[Lease]:
        """The locks held now, the one held longest first."""
        with self._lock:
            if self._expire(self.clock()):
                self._save()
            return sorted(self._leases.values(), key=lambda x: -x.deadline)

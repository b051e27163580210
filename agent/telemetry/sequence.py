"""The numbers of a device's telemetry messages and the session they belong to.

- ``seq`` increases by one per message across kinds; blocks of numbers are reserved on disk
  so a restart continues above every number already used (a clean stop gives the unused
  ones back, so only a crash leaves a jump);
- the session is a new random one whenever the numbers do not continue from the file
  (first start, wiped or unreadable state): readers dedupe by (``session``, ``seq``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import msgspec

from shared.fsutil import atomic_write

log = logging.getLogger(__name__)

SEQ_FILE = "telemetry_seq.json"
SEQ_BLOCK = 1000
SESSION_CHARS = 8  # hex: 32 random bits, per device


class SeqCounter:
    """Message sequence numbers that survive restarts without a write per message, and the
    session they belong to: a new random one whenever the numbers do not continue from the
    file (first start, wiped or unreadable state), so (session, seq) never repeats."""

    def __init__(self, path: Path, block: int = SEQ_BLOCK) -> None:
        self.path = Path(path)
        self.block = block
        self._lock = threading.Lock()
        reserved, session = 0, ""
        if self.path.exists():
            try:
                saved = msgspec.json.decode(self.path.read_bytes())
                reserved = int(saved["reserved"])
                session = str(saved.get("session", ""))
            except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
                # Not a security boundary: continue above the current time, still monotonic.
                log.warning("%s unreadable (%s); continuing sequence from the clock", self.path, exc)
                reserved = int(time.time())
        self.session = session if len(session) == SESSION_CHARS else os.urandom(SESSION_CHARS // 2).hex()
        self._next = reserved
        self._reserved = reserved
        self._reserve()

    def _reserve(self) -> None:
        self._reserved = self._next + self.block
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, msgspec.json.encode({"reserved": self._reserved, "session": self.session}))

    def next(self) -> int:
        with self._lock:
            if self._next >= self._reserved:
                self._reserve()
            value = self._next
            self._next += 1
            return value

    def close(self) -> None:
        """On a clean stop, give back the unused numbers: the next start continues without a gap."""
        with self._lock:
            try:
                saved = {"reserved": self._next, "session": self.session}
                atomic_write(self.path, msgspec.json.encode(saved))
            except OSError as exc:
                log.warning("cannot write %s (%s); the next start skips ahead", self.path, exc)
                return
            self._reserved = self._next

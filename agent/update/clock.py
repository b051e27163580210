"""The best time the agent has, for expiry checks on devices without a trusted clock.

Policy (docs/agent-lifecycle.md, "Time and expiry"):
- best time = max(system clock, latest fleet time seen + monotonic time elapsed since);
  the fleet's time comes with every desired-state answer (``server_time``);
- the latest fleet time is kept in ``state_dir/clock.json`` with the kernel's boot id and
  the monotonic time it was seen at: after an agent restart in the same boot the elapsed
  monotonic time is added; after a reboot (monotonic time restarts) the stored fleet time
  is a floor the clock never goes below;
- the best time only moves forward: a system clock reset to 1970, or set back by an
  attacker with physical access, cannot revive an expired manifest;
- a fleet time that would move the floor backwards is ignored.

The offline-install grace (``update.offline_expiry_grace_s``) is not applied here: the
installer retries the expiry checks ``grace`` seconds earlier for bundle files only, and
logs it. Signatures and anti-rollback never depend on time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from agent.update.locks import current_boot_id
from shared.fsutil import atomic_write
from shared.timeutil import parse_time

log = logging.getLogger(__name__)

CLOCK_FILE = "clock.json"
# A fleet time more than this ahead of the best time is taken, but logged (a clock that was
# never set is usually decades behind; the fleet's answer is authenticated).
JUMP_WARN_S = 366 * 86400.0


class _Persisted(msgspec.Struct):
    fleet_time: float  # UNIX seconds the fleet said it was
    monotonic: float  # time.monotonic() when it was seen
    boot_id: str


class TrustedClock:
    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        boot_id: str | None = None,
    ) -> None:
        self.path = Path(state_dir) / CLOCK_FILE if state_dir is not None else None
        self.wall = wall
        self.monotonic = monotonic
        self.boot_id = current_boot_id() if boot_id is None else boot_id
        self._lock = threading.Lock()
        self._seen: _Persisted | None = None
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            doc = msgspec.json.decode(self.path.read_bytes(), type=_Persisted)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("cannot read %s (%s); the clock starts from the system time", self.path, exc)
            return
        if not math.isfinite(doc.fleet_time) or not math.isfinite(doc.monotonic):
            return
        if not self.boot_id or doc.boot_id != self.boot_id:
            # Another boot: the monotonic time restarted. The fleet time stays a floor.
            doc = _Persisted(doc.fleet_time, self.monotonic(), self.boot_id)
        self._seen = doc

    def _fleet_now(self) -> float | None:
        seen = self._seen
        if seen is None:
            return None
        return seen.fleet_time + max(0.0, self.monotonic() - seen.monotonic)

    def now_ts(self) -> float:
        """Best UNIX time: max(system clock, fleet time seen + monotonic time since)."""
        with self._lock:
            fleet = self._fleet_now()
        wall = self.wall()
        return wall if fleet is None else max(wall, fleet)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ts(), UTC)

    def local_now(self) -> datetime:
        """The best time in the device's local time zone (for windows)."""
        return datetime.fromtimestamp(self.now_ts())

    def behind_s(self) -> float:
        """How far the system clock is behind the best time (0 when it is not)."""
        return max(0.0, self.now_ts() - self.wall())

    def observe(self, fleet_time: float | str | None) -> None:
        """Record a time the fleet stated (desired state ``server_time``: UNIX seconds or ISO)."""
        ts = _as_ts(fleet_time)
        if ts is None:
            return
        with self._lock:
            current = self._fleet_now()
            if current is not None and ts <= current:
                return  # never backwards; an older answer changes nothing
            if ts - max(self.wall(), current or 0.0) > JUMP_WARN_S:
                log.warning("the fleet's time %s is more than a year ahead of this device's clock",
                            datetime.fromtimestamp(ts, UTC).isoformat())
            self._seen = _Persisted(ts, self.monotonic(), self.boot_id)
            if self.path is not None:
                try:
                    atomic_write(self.path, msgspec.json.encode(self._seen))
                except OSError as exc:
                    log.warning("cannot write %s: %s", self.path, exc)


def _as_ts(value: float | str | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        ts = float(value)
    else:
        parsed = parse_time(value)
        if parsed is None:
            return None
        ts = parsed.timestamp()
    # Sane UNIX seconds only (2000 .. 2200).
    if not math.isfinite(ts) or not 946684800.0 <= ts <= 7258118400.0:
        return None
    return ts

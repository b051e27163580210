"""When a staged release may be activated: inside its activation window, with no update lock.

Rules:
- download, verification and staging happen at any time (a metered link has its own
  download window, agent.update.fetch); only the step STAGED -> SMOKE_TESTING (load, golden
  vectors, swap) waits here, so a device never loads a second model outside its window;
- the window is the rollout's (desired state ``activation_window``) when it sets one, else
  the device's ``update.activation_window``; none: any time;
- while any local application holds an update lock (agent.update.locks), activation waits;
- offline installs (``edgefleet-agent install FILE``, an operator at the device) are not gated.

``waiting_for`` answers None (go) or the reason, phrased for ``edgefleet-agent status`` and
the ``waiting`` field of health telemetry. Pure but for the clock and the lock table it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from agent.update.locks import LockTable
from agent.update.window import UpdateWindow


class ActivationGate:
    def __init__(
        self,
        *,
        window: UpdateWindow | None = None,
        locks: LockTable | None = None,
        local_now: Callable[[], datetime] = datetime.now,
        wall_now: Callable[[], float] | None = None,
    ) -> None:
        self.window = window
        self.locks = locks
        self.local_now = local_now
        self.wall_now = wall_now

    def window_of(self, target_window: str | None) -> UpdateWindow | None:
        if target_window:
            try:
                return UpdateWindow.parse(target_window)
            except ValueError:
                return self.window  # the fleet validates it; a bad one falls back to the device's
        return self.window

    def waiting_for(self, target_window: str | None = None) -> str | None:
        window = self.window_of(target_window)
        if window is not None and not window.contains(self.local_now()):
            source = "rollout" if target_window and window.text == target_window.strip() else "device"
            return f"waiting for the activation window {window.text} local time ({source})"
        if self.locks is not None:
            held = self.locks.held()
            if held:
                now = self.locks.clock()
                wall = self.wall_now() if self.wall_now is not None else datetime.now(UTC).timestamp()
                names = ", ".join(
                    f"'{x.holder}' until "
                    f"{datetime.fromtimestamp(wall + x.remaining(now), UTC).strftime('%H:%M:%S')} UTC"
                    for x in held[:5]
                )
                more = f" and {len(held) - 5} more" if len(held) > 5 else ""
                return f"waiting for the update lock held by {names}{more}"
        return None

    def wake_in(self, target_window: str | None = None) -> float | None:
        """Seconds until the answer may change by itself (window opens, a lease runs out)."""
        times: list[float] = []
        window = self.window_of(target_window)
        if window is not None:
            until = window.seconds_until_open(self.local_now())
            if until > 0:
                times.append(until)
        if self.locks is not None:
            now = self.locks.clock()
            times.extend(x.remaining(now) for x in self.locks.held())
        return min(times) if times else None

"""Local-time windows, the one grammar of them: the download window of a metered link, and
the activation window (maintenance window) outside which a staged release waits
(agent.update.gating), set on the device or by a rollout (the fleet checks a rollout's with
``UpdateWindow.parse`` too).

``"02:00-05:00"`` is local time, start inclusive, end exclusive; a window whose end is not
after its start wraps midnight (``"22:00-04:00"``). Pure: the caller passes the time.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import msgspec

WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)\Z")


class UpdateWindow(msgspec.Struct, frozen=True):
    start_min: int  # minutes after local midnight
    end_min: int
    text: str

    @classmethod
    def parse(cls, text: str) -> UpdateWindow:
        """Parse ``HH:MM-HH:MM``; raise ValueError saying what is expected."""
        m = WINDOW_RE.match(text.strip())
        if m is None:
            raise ValueError(f"{text!r} must be HH:MM-HH:MM in local time, e.g. \"02:00-05:00\"")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ValueError(f"{text!r} is an empty window (start equals end)")
        return cls(start, end, text.strip())

    def contains(self, now: datetime) -> bool:
        minute = now.hour * 60 + now.minute
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min

    def waiting_reason(self, now: datetime) -> str | None:
        """None inside the window, else why a download waits (for logs and ``status``)."""
        if self.contains(now):
            return None
        return f"waiting for the update window {self.text} local time (metered link)"

    def seconds_until_open(self, now: datetime) -> float:
        """0 inside the window, else the seconds until it next opens (local wall time)."""
        if self.contains(now):
            return 0.0
        start = now.replace(hour=self.start_min // 60, minute=self.start_min % 60, second=0,
                            microsecond=0)
        if start <= now:
            start += timedelta(days=1)
        return max(0.0, (start - now).total_seconds())

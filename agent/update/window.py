"""Local-time windows: ``shared.window`` (one grammar with the fleet), under the agent's name."""

from __future__ import annotations

from shared.window import WINDOW_RE as WINDOW_RE
from shared.window import UpdateWindow as UpdateWindow

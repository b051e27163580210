"""Waiting on a condition in tests: poll it, never sleep a fixed time and hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """``check()``'s first truthy value; AssertionError naming ``what`` after ``timeout`` s.
    The bound is generous on purpose: it costs nothing when the condition comes, and a
    loaded CI machine must not turn a slow pass into a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")

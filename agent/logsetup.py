"""The agent's log lines: one per record on stderr, text or JSON (``--log-format``); under
systemd (JOURNAL_STREAM set) with a ``<priority>`` prefix that journald takes as the line's
priority, and without a time stamp (journald stamps it)."""

from __future__ import annotations

import logging
import os
import sys


class _JournalFilter(logging.Filter):
    _PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = self._PRIORITY.get(record.levelname, 6)
        return True


class _PriorityPrefix(logging.Formatter):
    """``<6>`` before the line another formatter made: journald's priority of a stream line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{getattr(record, 'priority', 6)}>" + self.inner.format(record)


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    """One line per record on stderr, text or JSON (``--log-format``); under systemd, with a
    <priority> prefix that journald takes as the line's priority."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from shared.logformat import JsonFormatter

        formatter: logging.Formatter = JsonFormatter("agent")
    elif os.environ.get("JOURNAL_STREAM"):
        formatter = logging.Formatter("%(name)s: %(message)s")  # journald stamps the time
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("JOURNAL_STREAM"):
        handler.addFilter(_JournalFilter())
        formatter = _PriorityPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)

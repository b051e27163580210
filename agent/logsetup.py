"""The agent's log lines: one per record on stderr, text or JSON (``--log-format``); under
systemd (JOURNAL_STREAM naming stderr) in text format, or with ``--log-format journal``, each
record goes to the journal through its native protocol with structured fields
(agent/journald.py: PRIORITY, DEVICE_ID, EVENT, RELEASE, ...); a record it cannot send, and
every line when the journal is not used, goes to stderr, under systemd with a ``<priority>``
prefix that journald takes as the line's priority and without a time stamp."""

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


def _stderr_is_journal() -> bool:
    from agent.journald import journal_stream_is_stderr

    return journal_stream_is_stderr()


def setup_logging(level: str = "INFO", log_format: str = "text", device_id: str | None = None) -> None:
    """One record per line on stderr, text or JSON (``--log-format``), or to the journal with
    fields (``journal``, or text under systemd); see the module's docstring."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    under_systemd = bool(os.environ.get("JOURNAL_STREAM"))
    if log_format == "json":
        from shared.logformat import JsonFormatter

        formatter: logging.Formatter = JsonFormatter("agent")
    elif under_systemd or log_format == "journal":
        formatter = logging.Formatter("%(name)s: %(message)s")  # journald stamps the time
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if under_systemd or log_format == "journal":
        handler.addFilter(_JournalFilter())
        formatter = _PriorityPrefix(formatter)
    handler.setFormatter(formatter)
    # without JOURNAL_STREAM stderr is not the journal's: agent.journald is not even imported
    if log_format == "journal" or (log_format == "text" and under_systemd and _stderr_is_journal()):
        from agent.journald import JournalHandler

        journal = JournalHandler(device_id=device_id, fallback=handler)
        journal.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler = journal
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)

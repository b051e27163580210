"""One JSON object per log line, for the fleet and the agent alike (``--log-format json`` or
``EDGEFLEET_LOG_FORMAT=json``). Standard library only: the agent imports it on the device."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "EDGEFLEET_LOG_FORMAT"

# LogRecord attributes that are not "extra" fields
_STANDARD = set(vars(logging.LogRecord("x", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
    "color_message",  # uvicorn's copy of the message with ANSI colours
    "priority",  # the agent's journald priority (a prefix of the line, not a field)
}


class LogFormatError(ValueError):
    """A log format other than text or json."""

    def __init__(self, given: str, source: str) -> None:
        super().__init__(f"{source} {given!r}: use text or json")
        self.given = given


def log_format_from(option: str | None, source: str = "--log-format") -> str:
    """The option if given, else ``EDGEFLEET_LOG_FORMAT``, else text; anything else refused."""
    if option:
        chosen, where = option, source
    else:
        chosen, where = os.environ.get(LOG_FORMAT_ENV, "") or "text", LOG_FORMAT_ENV
    if chosen not in LOG_FORMATS:
        raise LogFormatError(chosen, where)
    return chosen


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, pid, extra fields, exception."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
        }
        if self.role:
            entry["role"] = self.role
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

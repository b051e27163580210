"""The one time helper: now, UTC normalisation, RFC 3339 text both ways.

RFC 3339 in UTC (``2026-12-06T05:24:02Z``) is the only time format in signed documents and
in API answers. ``parse_ts`` is strict (signed documents, request bodies: a named error);
``parse_time`` is lenient (stored or displayed values: None when absent or unreadable).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from shared.errors import MalformedDocumentError


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(ts: datetime | None) -> datetime | None:
    """``ts`` in UTC; a naive datetime is taken as UTC (SQLite hands those back)."""
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def format_ts(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_time(ts: datetime | None) -> str | None:
    """``format_ts`` of a value that may be absent or naive (UTC)."""
    ts = as_utc(ts)
    return format_ts(ts) if ts is not None else None


def parse_time(value: Any) -> datetime | None:
    """UNIX seconds or an ISO 8601 / RFC 3339 text (naive: UTC) as an aware datetime; None
    when absent or unreadable."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return as_utc(ts)


def parse_ts(value: str, *, field: str = "timestamp") -> datetime:
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise MalformedDocumentError(f"{field} {value!r} is not an RFC 3339 timestamp") from None
    if ts.tzinfo is None:
        raise MalformedDocumentError(f"{field} {value!r} has no timezone")
    return ts.astimezone(UTC)


def in_days(days: float) -> str:
    return format_ts(utcnow() + timedelta(days=days))

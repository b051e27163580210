"""RFC 3339 timestamps in UTC, the only time format in signed documents."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.errors import MalformedDocumentError


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_ts(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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

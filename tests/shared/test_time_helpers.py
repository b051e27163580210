"""One time helper (shared.timeutil): the fleet's API, CLI and controller and the agent's clock
read and write times the same way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from shared.errors import MalformedDocumentError
from shared.timeutil import as_utc, format_time, format_ts, parse_time, parse_ts

T = datetime(2026, 12, 6, 5, 24, 2, tzinfo=UTC)


@pytest.mark.parametrize(("value", "want"), [
    ("2026-12-06T05:24:02Z", T),
    ("2026-12-06T06:24:02+01:00", T),
    ("2026-12-06T05:24:02", T),  # naive: UTC
    (T.timestamp(), T),
    (int(T.timestamp()), T),
    (None, None), ("", None), ("yesterday", None), (True, None), ([], None), (1e300, None),
])
def test_parse_time_is_lenient(value: Any, want: datetime | None) -> None:
    assert parse_time(value) == want


def test_the_strict_parser_names_the_field() -> None:
    assert parse_ts("2026-12-06T05:24:02Z") == T
    with pytest.raises(MalformedDocumentError, match="expires '2026-12-06T05:24:02' has no timezone"):
        parse_ts("2026-12-06T05:24:02", field="expires")


def test_formats_round_trip_in_utc() -> None:
    other = T.astimezone(timezone(timedelta(hours=-5)))
    assert format_ts(other) == "2026-12-06T05:24:02Z" == format_time(T.replace(tzinfo=None))
    assert format_time(None) is None and as_utc(None) is None
    assert parse_time(format_time(other)) == T

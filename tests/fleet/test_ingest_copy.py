"""The health reports' and events' binary ``COPY`` on PostgreSQL (fleet.ingest.store.insert_rows):
awkward text goes as it is, ints go into float columns, NULLs stay NULL, and a value its column
cannot hold is refused (never truncated), as the text ``COPY`` did (an integer past int8 by psycopg
before it is sent: ``claims.check`` refuses those first); the batch's isolation then refuses that
message alone (tests/fleet/test_ingest_claims.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.db.engine import make_engine, session_scope, temporary_schema
from fleet.db.models import DeviceEvent, HealthReport, table_of
from fleet.ingest.apply import EVENT_COLUMNS, HEALTH_COLUMNS
from fleet.ingest.store import insert_rows

PG_ENV = "EDGEFLEET_TEST_POSTGRES_URL"
T0 = datetime(2026, 12, 6, 10, 59, 58, 500_000, tzinfo=UTC)


@pytest.fixture
def pg() -> Iterator[Engine]:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/test to run the binary COPY")
    with temporary_schema(base, "t") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def report(device: str = "d0", model: str = "clf", seq: int = 1, **kw: Any) -> tuple[Any, ...]:
    row = dict(device_id=device, ts=1_765_000_000.25, received_at=T0, seq=seq, model=model, release=3,
               inferences=100, errors=1, p50_ms=1.5, p95_ms=None, drift=None, cpu_percent=3, rss_mb=90.0)
    row.update(kw)
    return tuple(row[c] for c in HEALTH_COLUMNS)


def test_binary_copy_stores_the_values_as_given(pg: Engine) -> None:
    names = ['q"uote', "back\\slash", "{br,aces}", "NULL", "\\N", " spaced ", "ünï✓", "a" * 64]
    with session_scope(pg) as s:
        insert_rows(s, table_of(HealthReport), HEALTH_COLUMNS,
                    [report(model=n, seq=i, p95_ms=None if i % 2 else 2.5) for i, n in enumerate(names)])
        event = ("d0", 1_765_000_000.5, T0, 7, "clf", "committed", 3, None, None, "tab\there\nline")
        insert_rows(s, table_of(DeviceEvent), EVENT_COLUMNS, [event])
    with Session(pg) as s:
        got = s.execute(text("SELECT model, seq, ts, received_at, p95_ms, drift, cpu_percent "
                             "FROM healthreport ORDER BY seq")).all()
        ev = s.execute(text(f"SELECT {', '.join(EVENT_COLUMNS)} FROM deviceevent")).one()
    assert [tuple(r) for r in got] == [
        (n, i, 1_765_000_000.25, T0, None if i % 2 else 2.5, None, 3.0) for i, n in enumerate(names)]
    assert tuple(ev) == event


@pytest.mark.parametrize("row, message", [
    (report(model="m" * 65), "too long"),  # refused, not truncated
    (report(device="d" * 65), "too long"),
    (report(seq=2**63), "too big"),  # psycopg refuses it (OverflowError) before it is sent
])
def test_binary_copy_refuses_what_the_column_cannot_hold(pg: Engine, row: tuple[Any, ...],
                                                         message: str) -> None:
    with pytest.raises((psycopg.DataError, OverflowError)) as info, session_scope(pg) as s:
        insert_rows(s, table_of(HealthReport), HEALTH_COLUMNS, [report(seq=1), row])
    assert message in str(info.value)
    with Session(pg) as s:
        assert s.execute(text("SELECT count(*) FROM healthreport")).scalar() == 0


def test_a_column_changed_under_a_running_ingester_is_written_as_its_new_type(pg: Engine) -> None:
    # binary values are decoded as the column's type, not checked against it: with the types
    # of before a migration (bigint -> numeric) PostgreSQL took an int8's 8 bytes as a numeric
    # header and stored 0 for errors=1, without an error. The types are read for every batch.
    with session_scope(pg) as s:
        insert_rows(s, table_of(HealthReport), HEALTH_COLUMNS, [report(seq=1)])
    with session_scope(pg) as s:
        s.execute(text("ALTER TABLE healthreport ALTER COLUMN errors TYPE numeric"))
    with session_scope(pg) as s:
        insert_rows(s, table_of(HealthReport), HEALTH_COLUMNS, [report(seq=2), report(seq=3, errors=4)])
    with Session(pg) as s:
        assert s.execute(text("SELECT seq, errors FROM healthreport ORDER BY seq")).all() == [
            (1, 1), (2, 1), (3, 4)]

"""A batch's per-device statements as one statement each on PostgreSQL (fleet.db.bulk), the
same rows as SQLite's executemany.

- the same batches (health with shadow figures and a recovered event, events, statuses, a
  duplicate, refusals tallied before the batch, a device seen first, a revoked device) leave the
  same device columns, claim rows, hourly rollups, health buckets, reports and events on both
  databases; a batch without health keeps the device's ``last_health``;
- ``Unnest`` sends awkward text as it is (quotes, braces, backslashes, "NULL", non-ASCII), refuses
  a string longer than its column and an integer its column cannot hold (never truncates), takes
  ints in float columns, and processes an INSERT's rows in the order given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.db.bulk import Unnest
from fleet.db.engine import make_engine, session_scope, temporary_schema
from fleet.db.models import (
    Device,
    DeviceClaim,
    DeviceEvent,
    HealthBucket,
    HealthReport,
    HealthRollup,
    table_of,
)
from fleet.ingest.apply import Item
from fleet.ingest.claims_store import Tally
from fleet.ingest.store import store_batch
from shared.telemetry import messages

PG_ENV = "EDGEFLEET_TEST_POSTGRES_URL"
DEVICES = ["d0", "d1", "d2", "revoked"]
T0 = datetime(2026, 12, 6, 10, 59, 58, 500_000, tzinfo=UTC)  # batches straddle an hour and a minute


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/test to compare with PostgreSQL")
    with temporary_schema(base, "t") as url:
        lite, pg = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}"), make_engine(url)
        for engine in (lite, pg):
            with session_scope(engine) as s:
                for d in DEVICES:
                    s.add(Device(id=d, labels={}, credential_hash="0" * 64))
                s.flush()
                s.execute(update(table_of(Device)).where(table_of(Device).c.id == "revoked")
                          .values(revoked_at=T0))
        try:
            yield lite, pg
        finally:
            lite.dispose()
            pg.dispose()


def health(device: str, seq: int, ts: float, *, release: int = 1, inferences: int = 100, errors: int = 1,
           p95: float | None = 3.5, drift: float | None = None, last_event: messages.LastEvent | None = None,
           shadow: bool = False) -> messages.Health:
    models = [messages.ModelHealth(
        name=name, release=release, version="1.0.0", state="committed", inferences=inferences,
        errors=errors, total_inferences=inferences * seq, total_errors=errors * seq, latency_p50_ms=1.0,
        latency_p95_ms=p95, drift=drift, last_event=last_event if name == "det" else None,
        held=[release] if name == "det" else None,
        shadow=messages.ShadowHealth(release=release + 1, samples=10, agreed=9, errors=0, agreement=0.9)
        if shadow and name == "det" else None,
    ) for name in ("det", "clf")]
    return messages.Health(v=1, device_id=device, seq=seq, ts=ts, interval_s=10.0, models=models,
                           cpu_percent=5.0, mem_rss_mb=40.0, mem_percent=2.0, disk_free_mb=500.0,
                           session="s1")


def batches() -> list[tuple[list[Item], dict[str, Tally]]]:
    ts = T0.timestamp()
    at = [T0 + timedelta(seconds=i) for i in range(4)]  # 10:59:58.5 .. 11:00:01.5
    ev = messages.LastEvent(seq=5, ts=ts - 1, kind="activated", release=2, from_release=1)
    status = messages.Status(v=1, device_id="d0", online=True, ts=ts - 5, agent_version="0.9.1", seq=1,
                             session="s1", bd_seq=1)
    event = messages.Event(v=1, device_id="d1", seq=3, ts=ts - 2, model="det", kind="committed", release=1,
                           message='quotes " and \\ and {braces}, NULL', session="s1")
    over = Tally()
    over.add("over_budget", "health: over its messages budget", at[0])
    malformed = Tally()
    malformed.add("malformed", "health: models[0].errors = 9: at most the window's inferences", at[0], n=2)
    first = [
        Item("d0", "status", status, at[0]),
        Item("d0", "health", health("d0", 2, ts, release=2, last_event=ev), at[0]),
        Item("d1", "event", event, at[0]),
        Item("d1", "health", health("d1", 4, ts, p95=None, drift=0.25), at[1]),
        Item("d0", "health", health("d0", 3, ts + 1, release=2, inferences=50, errors=60, shadow=True),
             at[1]),  # suspect
        Item("revoked", "health", health("revoked", 1, ts), at[1]),
        Item("ghost", "health", health("ghost", 1, ts), at[1]),
    ]
    second = [
        Item("d0", "health", health("d0", 3, ts + 1, release=2), at[2]),  # duplicate
        Item("d1", "health", health("d1", 5, ts + 2, p95=7.25), at[2]),
        Item("d1", "health", health("d1", 6, ts + 3, p95=1.0), at[3]),
        Item("d2", "health", health("d2", 1, ts + 3), at[3]),
    ]
    offline = messages.Status(v=1, device_id="d1", online=False, ts=ts + 9, seq=7, session="s1", bd_seq=1)
    third = [Item("d1", "status", offline, at[3])]  # no health: d1 keeps its last_health
    return [(first, {"d0": over, "d2": malformed}), (second, {}), (third, {"d1": over})]


# Columns not compared: set at insert (devices) or serial (reports, events).
_SKIP = {"device": ("credential_hash", "enrolled_at", "labels")}


def contents(engine: Engine) -> dict[str, Any]:
    def norm(v: Any) -> Any:
        if isinstance(v, datetime):
            return (v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)).isoformat()
        if isinstance(v, float):
            return round(v, 9)
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    out: dict[str, Any] = {}
    with Session(engine) as s:
        for model in (Device, DeviceClaim, HealthRollup, HealthBucket, HealthReport, DeviceEvent):
            table = table_of(model)
            columns = [c for c in table.c if c.name not in _SKIP.get(table.name, ("id",))]
            rows = [tuple(norm(v) for v in r) for r in s.execute(select(*columns))]
            out[table.name] = sorted(rows, key=repr)
    return out


def test_postgres_stores_what_sqlite_stores(engines: tuple[Engine, Engine]) -> None:
    lite, pg = engines
    for items, tallies in batches():
        applied = [store_batch(engine, items, {d: _copy(t) for d, t in tallies.items()})
                   for engine in (lite, pg)]
        assert [(a.written, len(a.duplicates), len(a.unknown)) for a in applied] == \
            [(applied[0].written, len(applied[0].duplicates), len(applied[0].unknown))] * 2
    got_lite, got_pg = contents(lite), contents(pg)
    assert got_pg == got_lite
    # and they hold what the batches said
    devices = {r[0]: r for r in got_pg["device"]}
    names = [c.name for c in table_of(Device).c if c.name not in _SKIP["device"]]
    d1 = dict(zip(names, devices["d1"], strict=True))
    assert d1["online"] is False and d1["last_health"]["seq"] == 6  # kept by the status-only batch
    d0 = dict(zip(names, devices["d0"], strict=True))
    assert d0["agent_version"] == "0.9.1" and d0["models"]["det"]["release"] == 2
    assert d0["models"]["det"]["shadow"]["samples"] == 10 and d0["models"]["det"]["event_seq"] == 5
    assert devices["revoked"][names.index("last_seen")] is None
    claims = {r[0]: r for r in got_pg["deviceclaim"]}
    claim_names = [c.name for c in table_of(DeviceClaim).c]
    c0 = dict(zip(claim_names, claims["d0"], strict=True))
    assert (c0["over_budget"], c0["duplicate"], c0["seq_high"]) == (1, 1, 3)
    assert c0["over_budget_at"] is not None
    c1 = dict(zip(claim_names, claims["d1"], strict=True))
    assert c1["over_budget"] == 1 and c1["last_refusal"] == "health: over its messages budget"
    assert dict(zip(claim_names, claims["d2"], strict=True))["malformed"] == 2
    assert "revoked" not in claims
    assert len(got_pg["healthreport"]) == 2 * 6  # 6 health messages stored, two models each
    assert len(got_pg["deviceevent"]) == 2  # d1's event, d0's recovered from its health
    buckets = got_pg["healthbucket"]
    assert sum(r[[c.name for c in table_of(HealthBucket).c].index("suspect")] for r in buckets) == 2


def _copy(t: Tally) -> Tally:
    out = Tally()
    out.merge(t)
    return out


@pytest.fixture
def pg(engines: tuple[Engine, Engine]) -> Engine:
    return engines[1]


def test_unnest_sends_awkward_text_as_it_is_and_in_order(pg: Engine) -> None:
    names = ['q"uote', "back\\slash", "{br,aces}", "NULL", "null", "", " spaced ", "ünï✓", "a" * 64]
    rows = [("d0", n, i, T0, i, 0, 0, None if i % 2 else i, 1.5) for i, n in enumerate(names)]
    stmt = Unnest(table_of(HealthRollup), ("device_id", "model", "release", "hour", "reports", "inferences",
                                           "errors", "p95_ms_max", "last_ts"),
                  "INSERT INTO {table} ({columns}) SELECT * FROM {rows}")
    with session_scope(pg) as s:
        stmt.execute(s, rows)
        got = s.execute(text("SELECT model, release, p95_ms_max, last_ts FROM healthrollup "
                             "ORDER BY ctid")).all()
    assert [tuple(r) for r in got] == [(n, i, None if i % 2 else float(i), 1.5) for i, n in enumerate(names)]
    assert all(type(r[2]) is float for r in got if r[2] is not None)


@pytest.mark.parametrize("row, message", [
    (("d0", "m" * 65, 1, T0, 1, 0, 0, None, 0.0), "too long"),  # refused, not truncated
    (("d0", "m", 2**63, T0, 1, 0, 0, None, 0.0), "out of range"),
    (("d0", "m", 1, T0, 2**31, 0, 0, None, 0.0), "out of range"),  # reports: an int4 column
])
def test_unnest_refuses_what_the_column_cannot_hold(pg: Engine, row: tuple[Any, ...], message: str) -> None:
    stmt = Unnest(table_of(HealthRollup), ("device_id", "model", "release", "hour", "reports", "inferences",
                                           "errors", "p95_ms_max", "last_ts"),
                  "INSERT INTO {table} ({columns}) SELECT * FROM {rows}")
    with pytest.raises(psycopg.DataError) as info, session_scope(pg) as s:
        stmt.execute(s, [row])
    assert message in str(info.value)
    with Session(pg) as s:
        assert s.execute(text("SELECT count(*) FROM healthrollup")).scalar() == 0


def test_unnest_of_no_rows_runs_nothing(pg: Engine) -> None:
    stmt = Unnest(table_of(HealthRollup), ("device_id",), "this is not SQL {rows}")
    with session_scope(pg) as s:
        stmt.execute(s, [])  # would raise had it been sent

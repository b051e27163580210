"""Retention of raw health reports and the hourly rollups that outlive them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fleet_support import admin, enroll
from litestar.testing import TestClient
from sqlalchemy import func
from sqlmodel import Session, select

from fleet.db.engine import session_scope
from fleet.db.models import HealthReport, HealthRollup
from fleet.ingest.rollup import Window, add_windows, hour_of, per_device, per_release, trim

Client = TestClient[Any]


def _report(device: str, release: int, at: datetime, inferences: int, errors: int) -> HealthReport:
    return HealthReport(device_id=device, ts=at.timestamp(), received_at=at, seq=1, model="detector",
                        release=release, inferences=inferences, errors=errors)


def test_rollups_sum_per_device_and_release_and_outlive_trimmed_reports(client: Client) -> None:
    engine = client.app.state.ctx.engine
    for d in ("dev-a", "dev-b"):
        enroll(client, d)
    now = datetime.now(UTC)
    old = hour_of(now - timedelta(days=40)) + timedelta(minutes=10)  # both old rows in one hour
    rows = [("dev-a", 1, old, 100, 5), ("dev-a", 1, old + timedelta(minutes=5), 50, 0),
            ("dev-b", 1, now, 30, 3), ("dev-a", 2, now, 10, 0), ("dev-a", 2, now, 10, 1)]
    with session_scope(engine) as session:
        for device, release, at, inf, err in rows:
            session.add(_report(device, release, at, inf, err))
        add_windows(session, [Window(d, "detector", r, at, at.timestamp(), i, e, 7.0 if r == 2 else None)
                              for d, r, at, i, e in rows[:3]])
    with session_scope(engine) as session:  # a second batch upserts into the same hours
        add_windows(session, [Window(d, "detector", r, at, at.timestamp(), i, e, 9.0)
                              for d, r, at, i, e in rows[3:]])

    deleted = trim(engine, retention_days=30, rollup_retention_days=400)
    assert deleted == {"healthreport": 2, "healthrollup": 0}
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(HealthReport)).one() == 3
        # rollup rows: (a, 1, old hour), (b, 1, now), (a, 2, now)
        assert session.exec(select(func.count()).select_from(HealthRollup)).one() == 3
        by_release = {r["release"]: r for r in per_release(session, "detector")}
        assert (by_release[1]["inferences"], by_release[1]["errors"], by_release[1]["devices"]) == (180, 8, 2)
        assert by_release[2]["reports"] == 2 and by_release[2]["p95_ms_max"] == 9.0
        assert by_release[2]["error_rate"] == 0.05
        mine = {r["release"]: r for r in per_device(session, "dev-a")}
        assert mine[1]["inferences"] == 150 and mine[1]["reports"] == 2

    api = client.get("/api/v1/health/releases", params={"model": "detector"}, headers=admin()).json()
    assert [(r["release"], r["inferences"]) for r in api] == [(1, 180), (2, 20)]
    device = client.get("/api/v1/devices/dev-a", headers=admin()).json()
    assert [(r["release"], r["inferences"]) for r in device["health_by_release"]] == [(1, 150), (2, 20)]

    assert trim(engine, retention_days=30, rollup_retention_days=30)["healthrollup"] == 1

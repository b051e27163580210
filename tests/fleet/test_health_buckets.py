"""Health buckets on SQLite and PostgreSQL: the ingester's real batch path sums reports per
device, model, release and minute (duplicates not counted twice, suspect reports set apart), and
the gates' reads from buckets give the same evidence as the raw reports, the bounds of
fleet.rollout.evidence (issue 16) still applied device by device."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from fleet_support import enroll
from litestar.testing import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet.broker.client import parse_mqtt_url
from fleet.db.engine import make_engine
from fleet.db.models import HealthBucket, HealthReport, as_utc
from fleet.ingest.ingester import Ingester
from fleet.rollout.engine import DeviceState
from fleet.rollout.evidence import device_evidence
from fleet.rollout.health_buckets import bucket_rows, minute_of, suspect
from fleet.rollout.health_reads import raw_windows, target_windows, windows_between
from shared.telemetry import messages, topics

T0 = datetime(2026, 12, 6, 8, 0, 0, tzinfo=UTC)


def report(device: str, at: datetime, inferences: int = 100, errors: int = 1, *, release: int = 2,
           p95: float | None = 3.0, drift: float | None = None, seq: int = 1) -> dict[str, Any]:
    return {"device_id": device, "ts": at.timestamp(), "received_at": at, "seq": seq, "model": "m",
            "release": release, "inferences": inferences, "errors": errors, "p95_ms": p95,
            "drift": drift}


def test_bucket_rows_sum_per_minute_and_set_suspect_reports_apart() -> None:
    rows = bucket_rows([
        report("a", T0 + timedelta(seconds=5), 100, 1, p95=2.0, drift=0.1),
        report("a", T0 + timedelta(seconds=50), 50, 4, p95=4.0),
        report("a", T0 + timedelta(seconds=61), 10, 0, p95=None),
        report("a", T0 + timedelta(seconds=62), -5, 0),
        report("a", T0 + timedelta(seconds=63), 5, 0, p95=math.nan),
        report("b", T0 + timedelta(seconds=1), 7, 7, release=1),
    ])
    assert [(r["device_id"], r["release"], r["minute"]) for r in rows] == [
        ("a", 2, T0), ("a", 2, T0 + timedelta(minutes=1)), ("b", 1, T0)]
    first, second, other = rows
    assert (first["reports"], first["inferences"], first["errors"]) == (2, 150, 5)
    assert (first["p95_sum"], first["p95_count"]) == (6.0, 2)
    assert (first["drift_sum"], first["drift_count"]) == (0.1, 1)
    assert first["first_received"] == T0 + timedelta(seconds=5)
    assert first["last_received"] == T0 + timedelta(seconds=50)
    assert (second["reports"], second["inferences"], second["suspect"], second["p95_count"]) == (1, 10, 2, 0)
    assert (other["inferences"], other["errors"]) == (7, 7)
    assert suspect(1, 2, None, None) and suspect(1, 0, -1.0, None) and not suspect(0, 0, 0.0, 0.0)
    assert minute_of(datetime(2026, 1, 1, 3, 4, 59, 999)) == datetime(2026, 1, 1, 3, 4, tzinfo=UTC)


def _health(device: str, seq: int, inferences: int, errors: int) -> messages.Health:
    m = messages.ModelHealth(name="m", release=2, version="2", state="committed", inferences=inferences,
                             errors=errors, total_inferences=inferences, total_errors=errors,
                             latency_p50_ms=1.0, latency_p95_ms=3.0)
    return messages.Health(v=1, device_id=device, seq=seq, ts=time.time(), interval_s=60.0, models=[m],
                           cpu_percent=5.0, mem_rss_mb=40.0, mem_percent=2.0, disk_free_mb=500.0,
                           session="s1")


def test_the_ingester_sums_reports_into_buckets_once(client: TestClient[Any]) -> None:
    for d in ("d1", "d2"):
        enroll(client, d)
    ing = Ingester(client.app.state.ctx.engine, parse_mqtt_url("mqtt://127.0.0.1:1"))
    at = datetime.now(UTC).replace(second=10, microsecond=0)
    sent = [_health("d1", 1, 100, 2), _health("d1", 2, 50, 0), _health("d2", 1, 30, 30),
            _health("d1", 1, 100, 2)]  # the last: a replay of d1's seq 1
    for i, msg in enumerate(sent):
        assert ing.handle(topics.topic(msg.device_id, "health"), messages.encode(msg),
                          received_at=at + timedelta(seconds=i))
    items = []
    while not ing.queue.empty():
        items.append(ing.queue.get_nowait())
    ing.write_isolating(items[:3])
    ing.write_isolating(items[3:])  # the replay in a later batch: refused as a duplicate
    with Session(client.app.state.ctx.engine) as s:
        buckets = {b.device_id: b for b in s.exec(select(HealthBucket))}
        raw = list(s.exec(select(HealthReport)))
    assert len(raw) == 3
    assert set(buckets) == {"d1", "d2"}
    d1, d2 = buckets["d1"], buckets["d2"]
    assert (d1.reports, d1.inferences, d1.errors, d1.p95_count, d1.suspect) == (2, 150, 2, 2, 0)
    assert (d2.reports, d2.inferences, d2.errors) == (1, 30, 30)
    assert minute_of(d1.minute) == minute_of(at) and d1.release == 2 and d1.model == "m"


def _seed(engine: Engine, reports: list[dict[str, Any]]) -> None:
    from fleet.rollout.health_buckets import add_health

    with Session(engine) as s:
        for r in reports:
            s.add(HealthReport(**r))
        add_health(s, reports)
        s.commit()


def _devices(*ids: str) -> Any:
    """A subquery of device ids, as the controller passes (the rollout's members)."""
    return select(HealthReport.device_id).where(col(HealthReport.device_id).in_(ids)).distinct()


def _evidence(windows: Any, members: list[DeviceState], since: datetime, now: float) -> dict[str, Any]:
    ev = device_evidence(members, windows, 2, now=now, since=since.timestamp(), max_device_rate=10.0)
    return {d: (e.inferences, e.errors, dict(e.refused)) for d, e in ev.items()}


def test_reads_from_buckets_weigh_like_the_raw_reports(db_url: str) -> None:
    engine = make_engine(db_url)
    since = T0 + timedelta(seconds=20)  # the window starts inside a minute
    assigned = since.timestamp()
    reports = [
        report("ok", T0 + timedelta(seconds=10), 50, 0),  # before the window: not read
        report("ok", T0 + timedelta(seconds=30), 100, 1),  # the partial first minute: raw
        *[report("ok", T0 + timedelta(minutes=k, seconds=15), 100, 2) for k in range(1, 6)],
        *[report("ok", T0 + timedelta(minutes=k, seconds=45), 100, 2) for k in range(1, 6)],
        report("old", T0 + timedelta(minutes=2), 100, 0, release=1),  # another release
        # a device claiming more than it could serve: read report by report, the flood refused
        report("greedy", T0 + timedelta(minutes=2, seconds=1), 500, 0),
        report("greedy", T0 + timedelta(minutes=2, seconds=2), 10**6, 0),
        # a report with an impossible figure: read report by report, refused as such
        report("odd", T0 + timedelta(minutes=3), 10, 20),
        report("odd", T0 + timedelta(minutes=4), 10, 1),
        # reported the target before it was assigned (at minute 3)
        report("late", T0 + timedelta(minutes=2, seconds=30), 40, 0),
        report("late", T0 + timedelta(minutes=4, seconds=30), 40, 4),
    ]
    _seed(engine, reports)
    now = (T0 + timedelta(minutes=6)).timestamp()
    members = [DeviceState(d, 0, assigned_at=assigned) for d in ("ok", "old", "greedy", "odd")]
    members.append(DeviceState("late", 0, assigned_at=(T0 + timedelta(minutes=3)).timestamp()))
    ids = _devices("ok", "old", "greedy", "odd", "late")
    with Session(engine) as s:
        from_buckets = target_windows(s, "m", 2, ids, members, since=since, now=now, max_device_rate=10.0)
        from_raw = raw_windows(s, "m", [2], ids, since, None)
    assert len(from_buckets) < len(from_raw)  # "ok" read as one window a minute
    assert _evidence(from_buckets, members, since, now) == _evidence(from_raw, members, since, now)
    got = _evidence(from_buckets, members, since, now)
    assert got["ok"] == (1100, 21, {})
    assert got["greedy"] == (500, 0, {"implausible": 1})
    assert got["odd"] == (10, 1, {"errors_above_inferences": 1})
    assert got["late"] == (40, 4, {"unassigned": 1})
    assert got["old"] == (0, 0, {})


def test_windows_between_reads_whole_minutes_from_buckets_and_edges_raw(db_url: str) -> None:
    engine = make_engine(db_url)
    reports = [report("a", T0 + timedelta(seconds=s), 10, 0, release=1, p95=float(s))
               for s in range(5, 600, 30)]
    _seed(engine, reports)
    start, end = T0 + timedelta(seconds=100), T0 + timedelta(seconds=400)
    with Session(engine) as s:
        windows = windows_between(s, "m", [1], _devices("a"), start, end)
    expected = [r for r in reports if start <= r["received_at"] < end]
    assert sum(w.inferences for w in windows) == sum(r["inferences"] for r in expected)
    assert len(windows) < len(expected)


def test_buckets_past_the_raw_retention_are_trimmed(db_url: str) -> None:
    from fleet.rollout.health_buckets import trim

    engine = make_engine(db_url)
    now = T0 + timedelta(days=40)
    _seed(engine, [report("a", T0 + timedelta(hours=h), 10, 0) for h in range(0, 240, 3)]
          + [report("a", now - timedelta(days=1), 10, 0)])
    deleted = trim(engine, 30.0, now=now)
    with Session(engine) as s:
        left = [as_utc(b.minute) for b in s.exec(select(HealthBucket))]
    assert deleted == 80 and left == [minute_of(now - timedelta(days=1))]

"""A stage's health windows for the gates, read from the per-minute buckets
(fleet.rollout.health_buckets) instead of every raw report.

Rules:
- the minutes wholly inside the window are read as one window per bucket (its sums; latency
  and drift as the means of its reports), received at the bucket's first report;
- the partial minute at each edge of the window is read from the raw reports, so the window
  starts and ends where it says, to the microsecond;
- a device that any bucket marks as one the evidence rules must see report by report is read
  from its raw reports in the window (fleet.rollout.evidence names each refusal): a report
  refused on its own figures (``suspect``), a report of the target received before the device
  was assigned, or more inferences than the device could have served since then. Such devices
  are few (broken or hostile); the others cost one bucket a minute, whatever they send.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select
from sqlmodel import Session, col, select

from fleet.db.models import HealthBucket, HealthReport, as_utc
from fleet.rollout import engine as eng
from fleet.rollout.evidence import WINDOW_SLACK_S
from fleet.rollout.health_buckets import BUCKET_S, minute_of

STEP = timedelta(seconds=BUCKET_S)
DeviceFilter = Select[Any]  # a SELECT of device ids (a subquery: no list of 100,000 parameters)


def _ts(value: datetime | None) -> float | None:
    value = as_utc(value)
    return value.timestamp() if value else None


def raw_windows(
    session: Session, model: str, releases: Collection[int], devices: DeviceFilter | Collection[str],
    start: datetime, end: datetime | None,
) -> list[eng.HealthWindow]:
    """The raw reports of ``releases`` from ``devices`` received in [start, end), in the
    order received."""
    stmt = select(HealthReport).where(
        col(HealthReport.device_id).in_(devices if isinstance(devices, Select) else list(devices)),
        HealthReport.model == model,
        col(HealthReport.release).in_(sorted(releases)),
        col(HealthReport.received_at) >= start,
    )
    if end is not None:
        stmt = stmt.where(col(HealthReport.received_at) < end)
    return [
        eng.HealthWindow(h.device_id, h.release, h.inferences, h.errors, h.p95_ms, h.drift,
                         seq=h.seq, ts=h.ts, received_at=_ts(h.received_at))
        for h in session.exec(stmt.order_by(col(HealthReport.received_at), col(HealthReport.id)))
    ]


def _bucket_window(b: HealthBucket) -> eng.HealthWindow:
    return eng.HealthWindow(
        b.device_id, b.release, b.inferences, b.errors,
        p95_ms=b.p95_sum / b.p95_count if b.p95_count else None,
        drift=b.drift_sum / b.drift_count if b.drift_count else None,
        received_at=_ts(b.first_received),
    )


def _buckets(
    session: Session, model: str, releases: Collection[int], devices: DeviceFilter,
    first: datetime, end: datetime | None,
) -> list[HealthBucket]:
    """Buckets of minutes ``first`` <= minute < ``end`` (both minute starts), by device, minute."""
    stmt = select(HealthBucket).where(
        HealthBucket.model == model,
        col(HealthBucket.release).in_(sorted(releases)),
        col(HealthBucket.minute) >= first,
        col(HealthBucket.device_id).in_(devices),
    )
    if end is not None:
        stmt = stmt.where(col(HealthBucket.minute) < end)
    return list(session.exec(stmt.order_by(col(HealthBucket.device_id), col(HealthBucket.minute))))


def _inner_minutes(start: datetime, end: datetime | None) -> tuple[datetime, datetime | None]:
    """[first, last) minute starts wholly inside [start, end)."""
    first = minute_of(start)
    if first < start:
        first += STEP
    last = minute_of(end) if end is not None else None
    return first, last


def windows_between(
    session: Session, model: str, releases: Collection[int], devices: DeviceFilter,
    start: datetime, end: datetime | None,
) -> list[eng.HealthWindow]:
    """Windows of ``releases`` from ``devices`` received in [start, end): buckets for whole
    minutes, raw reports for the partial minutes at the edges (not in report order)."""
    first, last = _inner_minutes(start, end)
    if last is not None and last <= first:  # within one or two partial minutes: raw only
        return raw_windows(session, model, releases, devices, start, end)
    out = raw_windows(session, model, releases, devices, start, first) if start < first else []
    out += [_bucket_window(b) for b in _buckets(session, model, releases, devices, first, last)]
    if last is not None and end is not None and last < end:
        out += raw_windows(session, model, releases, devices, last, end)
    return out


def target_windows(
    session: Session, model: str, target: int, devices: DeviceFilter,
    members: Iterable[eng.DeviceState], *, since: datetime, now: float, max_device_rate: float,
) -> list[eng.HealthWindow]:
    """The target's windows since ``since`` (the stage start) for fleet.rollout.evidence:
    buckets, and the raw reports of the devices the evidence rules must see one by one."""
    first, _ = _inner_minutes(since, None)
    edge = raw_windows(session, model, [target], devices, since, first) if since < first else []
    buckets = _buckets(session, model, [target], devices, first, None)
    assigned: Mapping[str, float | None] = {m.device_id: m.assigned_at for m in members}
    start = since.timestamp()
    totals: dict[str, int] = {}
    exact: set[str] = set()
    for w in edge:
        totals[w.device_id] = totals.get(w.device_id, 0) + w.inferences
    for b in buckets:
        totals[b.device_id] = totals.get(b.device_id, 0) + b.inferences
        at = assigned.get(b.device_id)
        received = _ts(b.first_received)
        if b.suspect or (at is not None and received is not None and received < at):
            exact.add(b.device_id)
    for device_id, total in totals.items():
        at = assigned.get(device_id)
        ceiling = int(max_device_rate * max(0.0, now - (at if at is not None else start) + WINDOW_SLACK_S))
        if total > ceiling:
            exact.add(device_id)
    out = [w for w in edge if w.device_id not in exact]
    out += [_bucket_window(b) for b in buckets if b.device_id not in exact]
    if exact:
        out += raw_windows(session, model, [target], sorted(exact), since, None)
    return out

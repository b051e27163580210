"""A stage's health windows for the gates, read from the per-minute buckets
(fleet.rollout.health_buckets) instead of every raw report.

Rules:
- the minutes wholly inside the window are summed by the database into one window per device
  (its counts; latency and drift the means of its reports), received at its first report: a
  tick reads one row per device, whatever the window's length;
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func
from sqlalchemy import select as core_select
from sqlmodel import Session

from fleet.db.models import HealthBucket, HealthReport, as_utc, table_of
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
    h = table_of(HealthReport)
    stmt = core_select(h.c.device_id, h.c.release, h.c.inferences, h.c.errors, h.c.p95_ms, h.c.drift,
                       h.c.seq, h.c.ts, h.c.received_at).where(
        h.c.device_id.in_(devices if isinstance(devices, Select) else list(devices)),
        h.c.model == model,
        h.c.release.in_(sorted(releases)),
        h.c.received_at >= start,
    )
    if end is not None:
        stmt = stmt.where(h.c.received_at < end)
    return [
        eng.HealthWindow(r[0], r[1], r[2], r[3], r[4], r[5], seq=r[6], ts=r[7], received_at=_ts(r[8]))
        for r in session.execute(stmt.order_by(h.c.received_at, h.c.id))
    ]


@dataclass(frozen=True)
class DeviceSums:
    """One device's buckets of one release in a span of whole minutes, summed by the database."""

    device_id: str
    release: int
    inferences: int
    errors: int
    p95_sum: float
    p95_count: int
    drift_sum: float
    drift_count: int
    suspect: int
    first_received: datetime

    def window(self) -> eng.HealthWindow:
        """The sums as one window: latency and drift the means of the device's reports."""
        return eng.HealthWindow(
            self.device_id, self.release, self.inferences, self.errors,
            p95_ms=self.p95_sum / self.p95_count if self.p95_count else None,
            drift=self.drift_sum / self.drift_count if self.drift_count else None,
            received_at=_ts(self.first_received),
        )


def _sums(
    session: Session, model: str, releases: Collection[int], devices: DeviceFilter,
    first: datetime, end: datetime | None,
) -> list[DeviceSums]:
    """Each device's buckets of minutes ``first`` <= minute < ``end`` summed per release: one
    row per device whatever the window's length (the database adds the minutes)."""
    b = table_of(HealthBucket)
    stmt = (
        core_select(
            b.c.device_id, b.c.release, func.sum(b.c.inferences), func.sum(b.c.errors),
            func.sum(b.c.p95_sum), func.sum(b.c.p95_count), func.sum(b.c.drift_sum),
            func.sum(b.c.drift_count), func.sum(b.c.suspect), func.min(b.c.first_received),
        )
        .where(b.c.model == model, b.c.release.in_(sorted(releases)), b.c.minute >= first,
               b.c.device_id.in_(devices))
        .group_by(b.c.device_id, b.c.release)
    )
    if end is not None:
        stmt = stmt.where(b.c.minute < end)
    return [
        DeviceSums(r[0], int(r[1]), int(r[2]), int(r[3]), float(r[4]), int(r[5]), float(r[6]), int(r[7]),
                   int(r[8]), r[9] if isinstance(r[9], datetime) else datetime.fromisoformat(str(r[9])))
        for r in session.execute(stmt)
    ]


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
    out += [d.window() for d in _sums(session, model, releases, devices, first, last)]
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
    sums = _sums(session, model, [target], devices, first, None)
    assigned: Mapping[str, float | None] = {m.device_id: m.assigned_at for m in members}
    start = since.timestamp()
    totals: dict[str, int] = {}
    exact: set[str] = set()
    for w in edge:
        totals[w.device_id] = totals.get(w.device_id, 0) + w.inferences
    for d in sums:
        totals[d.device_id] = totals.get(d.device_id, 0) + d.inferences
        at = assigned.get(d.device_id)
        received = _ts(d.first_received)
        if d.suspect or (at is not None and received is not None and received < at):
            exact.add(d.device_id)
    for device_id, total in totals.items():
        at = assigned.get(device_id)
        ceiling = int(max_device_rate * max(0.0, now - (at if at is not None else start) + WINDOW_SLACK_S))
        if total > ceiling:
            exact.add(device_id)
    out = [w for w in edge if w.device_id not in exact]
    out += [d.window() for d in sums if d.device_id not in exact]
    if exact:
        out += raw_windows(session, model, [target], sorted(exact), since, None)
    return out

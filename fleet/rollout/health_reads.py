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
  are few (broken or hostile); the others cost one bucket a minute, whatever they send;
- on PostgreSQL the sums and the raw reads run with ``work_mem`` of at least ``WORK_MEM_PER_DEVICE``
  per device of the stage (``WORK_MEM_FLOOR`` at least, ``WORK_MEM_CEILING`` at most; the
  operator's setting when larger), for
  that statement only: the sums stay one hash aggregate in memory, not a sort of every bucket
  of the window spilled to disk (``external merge`` at 100,000 devices with the default 4 MB).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, text
from sqlalchemy import select as core_select
from sqlmodel import Session

from fleet.db.models import HealthBucket, HealthReport, as_utc, table_of
from fleet.rollout import engine as eng
from fleet.rollout.evidence import WINDOW_SLACK_S
from fleet.rollout.health_buckets import BUCKET_S, minute_of

STEP = timedelta(seconds=BUCKET_S)
DeviceFilter = Select[Any]  # a SELECT of device ids (a subquery: no list of 100,000 parameters)


# The hash aggregate of the window's sums takes ~420 bytes per device (PostgreSQL 15, 100,000
# devices: 42 MB); work_mem is a cap, not an allocation, and PostgreSQL lets a hash use
# hash_mem_multiplier (2 by default) times it.
WORK_MEM_PER_DEVICE = 1024
WORK_MEM_FLOOR = 64 * 1024 * 1024
# PostgreSQL may use work_mem per hash or sort node, times hash_mem_multiplier (2) and per
# parallel worker: a stage of millions of devices must not ask for gigabytes of it.
WORK_MEM_CEILING = 256 * 1024 * 1024
_RAISE_WORK_MEM = text(
    "SELECT current_setting('work_mem'), set_config('work_mem', CASE WHEN "
    "pg_size_bytes(current_setting('work_mem')) < :want THEN :wanted ELSE current_setting('work_mem') END, "
    "true)"
)
_SET_WORK_MEM = text("SELECT set_config('work_mem', :value, true)")


def work_mem_for(devices: int) -> int:
    """The ``work_mem`` (bytes) a read over ``devices`` devices asks for (at most
    ``WORK_MEM_CEILING``: beyond 262,144 devices the sums may spill to disk again, as with an
    operator's smaller setting, rather than the server run out of memory)."""
    return min(WORK_MEM_CEILING, max(WORK_MEM_FLOOR, devices * WORK_MEM_PER_DEVICE))


def read_all(session: Session, stmt: Select[Any], devices: int = 0) -> Sequence[Any]:
    """The rows of ``stmt``; on PostgreSQL with ``work_mem`` raised to ``work_mem_for(devices)``
    for this statement only (``set_config(..., is_local)``: never past the transaction, and set
    back right after the statement; a larger setting of the operator's is kept)."""
    if session.get_bind().dialect.name != "postgresql":
        return session.execute(stmt).all()
    want = work_mem_for(devices)
    before = session.execute(_RAISE_WORK_MEM, {"want": want, "wanted": f"{want // 1024}kB"}).one()[0]
    rows = session.execute(stmt).all()
    # not on an error: the transaction is then rolled back, and the local setting with it
    session.execute(_SET_WORK_MEM, {"value": before})
    return rows


def _ts(value: datetime | None) -> float | None:
    value = as_utc(value)
    return value.timestamp() if value else None


def raw_windows(
    session: Session, model: str, releases: Collection[int], devices: DeviceFilter | Collection[str],
    start: datetime, end: datetime | None, *, size: int = 0,
) -> list[eng.HealthWindow]:
    """The raw reports of ``releases`` from ``devices`` received in [start, end), in the
    order received (``size``: about how many devices, for ``read_all``)."""
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
        for r in read_all(session, stmt.order_by(h.c.received_at, h.c.id), devices=size)
    ]


def _sums(
    session: Session, model: str, releases: Collection[int], devices: DeviceFilter,
    first: datetime, end: datetime | None, *, size: int = 0,
) -> list[tuple[eng.HealthWindow, int]]:
    """Each device's buckets of minutes ``first`` <= minute < ``end`` summed per release: one
    row per device whatever the window's length (the database adds the minutes), as one
    window (latency and drift the means of its reports, received at its first report) and
    the number of its reports marked ``suspect``."""
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
    seconds: dict[Any, float | None] = {}  # a minute's reports often share their first instant
    out = []
    Window = eng.HealthWindow
    for device_id, release, inferences, errors, p95_sum, p95_n, drift_sum, drift_n, suspect, received in (
        read_all(session, stmt, devices=size)
    ):
        at = seconds.get(received)
        if at is None:
            when = received if isinstance(received, datetime) else datetime.fromisoformat(str(received))
            at = seconds[received] = _ts(when)
        p95_count, drift_count = int(p95_n), int(drift_n)
        out.append((
            Window(device_id, int(release), int(inferences), int(errors),
                   float(p95_sum) / p95_count if p95_count else None,
                   float(drift_sum) / drift_count if drift_count else None,
                   None, None, at),
            int(suspect),
        ))
    return out


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
    out += [w for w, _suspect in _sums(session, model, releases, devices, first, last)]
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
    assigned: Mapping[str, float | None] = {m.device_id: m.assigned_at for m in members}
    size = len(assigned)
    edge = raw_windows(session, model, [target], devices, since, first, size=size) if since < first else []
    sums = _sums(session, model, [target], devices, first, None, size=size)
    start = since.timestamp()
    totals: dict[str, int] = {}
    exact: set[str] = set()
    for w in edge:
        totals[w.device_id] = totals.get(w.device_id, 0) + w.inferences
    for w, suspects in sums:
        totals[w.device_id] = totals.get(w.device_id, 0) + w.inferences
        at = assigned.get(w.device_id)
        if suspects or (at is not None and w.received_at is not None and w.received_at < at):
            exact.add(w.device_id)
    for device_id, total in totals.items():
        at = assigned.get(device_id)
        ceiling = int(max_device_rate * max(0.0, now - (at if at is not None else start) + WINDOW_SLACK_S))
        if total > ceiling:
            exact.add(device_id)
    out = [w for w in edge if w.device_id not in exact]
    out += [w for w, _suspects in sums if w.device_id not in exact]
    if exact:
        out += raw_windows(session, model, [target], sorted(exact), since, None)
    return out

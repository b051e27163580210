"""Hourly health rollups and the retention of raw health reports.

The ingester adds every health window to its ``HealthRollup`` row (device, model,
release, hour) in the same transaction that stores the raw ``HealthReport``; the
retention job deletes raw reports older than ``retention_days`` (and rollups older than
``rollup_retention_days``), so the per-device and per-release health stays answerable
long after the raw rows are gone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Engine, Result
from sqlmodel import Session, col

from fleet.db.bulk import Unnest
from fleet.db.engine import session_scope
from fleet.db.models import HealthReport, HealthRollup, table_of
from shared.timeutil import format_ts

log = logging.getLogger(__name__)

DELETE_CHUNK = 5000


@dataclass(frozen=True)
class Window:
    device_id: str
    model: str
    release: int
    received_at: datetime
    ts: float
    inferences: int
    errors: int
    p95_ms: float | None


def hour_of(ts: datetime) -> datetime:
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.replace(minute=0, second=0, microsecond=0)


class HourlyRollup:
    """A batch's windows summed per (device, model, release, hour), as the upsert's rows."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int, datetime], dict[str, Any]] = {}
        # the hour of each received_at seen: a batch's messages share few instants
        self._hours: dict[datetime, datetime] = {}

    def add(
        self,
        device_id: str,
        model: str,
        release: int,
        received_at: datetime,
        ts: float,
        inferences: int,
        errors: int,
        p95_ms: float | None,
    ) -> None:
        hour = self._hours.get(received_at)
        if hour is None:
            hour = self._hours[received_at] = hour_of(received_at)
        key = (device_id, model, release, hour)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = {
                "device_id": device_id,
                "model": model,
                "release": release,
                "hour": hour,
                "reports": 0,
                "inferences": 0,
                "errors": 0,
                "p95_ms_max": None,
                "last_ts": 0.0,
            }
        row["reports"] += 1
        if inferences > 0:
            row["inferences"] += inferences
        if errors > 0:
            row["errors"] += errors
        if p95_ms is not None:
            row["p95_ms_max"] = max(row["p95_ms_max"] or 0.0, p95_ms)
        if ts > row["last_ts"]:
            row["last_ts"] = ts

    def upsert(self, session: Session) -> None:
        """Add the rows to the table (sorted, so concurrent writers never deadlock): one statement
        over all of them on PostgreSQL (``fleet.db.bulk``), an executemany elsewhere."""
        if not self.rows:
            return
        rows = [self.rows[k] for k in sorted(self.rows)]
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            _PG_UPSERT.execute_dicts(session, rows)
        else:
            session.execute(_upsert(dialect), rows)


def add_windows(session: Session, windows: Iterable[Window]) -> None:
    """Upsert the windows into their hourly rows."""
    rollup = HourlyRollup()
    for w in windows:
        rollup.add(w.device_id, w.model, w.release, w.received_at, w.ts, w.inferences, w.errors, w.p95_ms)
    rollup.upsert(session)


_UPSERTS: dict[str, Any] = {}


def _upsert(dialect: str) -> Any:
    """The single-row upsert of a rollup row, executed as one executemany per batch (SQLite;
    PostgreSQL runs ``_PG_UPSERT``, the same upsert over arrays of the rows)."""
    stmt = _UPSERTS.get(dialect)
    if stmt is not None:
        return stmt
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = table_of(HealthRollup)
    greatest = func.greatest if dialect == "postgresql" else func.max
    base = insert(table)
    ex = base.excluded
    stmt = base.on_conflict_do_update(
        index_elements=["device_id", "model", "release", "hour"],
        set_={
            "reports": table.c.reports + ex.reports,
            "inferences": table.c.inferences + ex.inferences,
            "errors": table.c.errors + ex.errors,
            "p95_ms_max": func.coalesce(
                greatest(table.c.p95_ms_max, ex.p95_ms_max), ex.p95_ms_max, table.c.p95_ms_max
            ),
            "last_ts": greatest(table.c.last_ts, ex.last_ts),
        },
    )
    _UPSERTS[dialect] = stmt
    return stmt


# The upsert above as one statement over a batch's rows (fleet.db.bulk), in their order.
_PG_UPSERT = Unnest(
    table_of(HealthRollup),
    ("device_id", "model", "release", "hour", "reports", "inferences", "errors", "p95_ms_max", "last_ts"),
    "INSERT INTO {table} AS t ({columns}) SELECT * FROM {rows} "
    "ON CONFLICT (device_id, model, release, hour) DO UPDATE SET "
    "reports = t.reports + excluded.reports, "
    "inferences = t.inferences + excluded.inferences, "
    "errors = t.errors + excluded.errors, "
    "p95_ms_max = coalesce(greatest(t.p95_ms_max, excluded.p95_ms_max), excluded.p95_ms_max, t.p95_ms_max), "
    "last_ts = greatest(t.last_ts, excluded.last_ts)",
)


def _totals(rows: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        inferences, errors = int(r.inferences or 0), int(r.errors or 0)
        item = {
            "model": r.model,
            "release": r.release,
            "reports": int(r.reports or 0),
            "inferences": inferences,
            "errors": errors,
            "error_rate": (errors / inferences) if inferences else None,
            "p95_ms_max": r.p95_ms_max,
            "first_hour": _iso(r.first_hour),
            "last_hour": _iso(r.last_hour),
        }
        if hasattr(r, "devices"):
            item["devices"] = int(r.devices)
        out.append(item)
    return out


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return format_ts(hour_of(ts))


def _rowcount(result: Result[Any]) -> int:
    """Rows a DELETE touched (a DML statement's result is a CursorResult)."""
    return int(result.rowcount or 0) if isinstance(result, CursorResult) else 0


def _columns() -> list[Any]:
    t = HealthRollup
    return [
        col(t.model),
        col(t.release),
        func.sum(t.reports).label("reports"),
        func.sum(t.inferences).label("inferences"),
        func.sum(t.errors).label("errors"),
        func.max(t.p95_ms_max).label("p95_ms_max"),
        func.min(t.hour).label("first_hour"),
        func.max(t.hour).label("last_hour"),
    ]


def per_release(session: Session, model: str | None = None) -> list[dict[str, Any]]:
    """Totals per model and release over every device that reported it."""
    stmt = select(*_columns(), func.count(func.distinct(HealthRollup.device_id)).label("devices"))
    if model:
        stmt = stmt.where(col(HealthRollup.model) == model)
    stmt = stmt.group_by(col(HealthRollup.model), col(HealthRollup.release)).order_by(
        col(HealthRollup.model), col(HealthRollup.release)
    )
    return _totals(session.execute(stmt).all())


def per_device(session: Session, device_id: str) -> list[dict[str, Any]]:
    """Totals per model and release of one device."""
    stmt = (
        select(*_columns())
        .where(col(HealthRollup.device_id) == device_id)
        .group_by(col(HealthRollup.model), col(HealthRollup.release))
        .order_by(col(HealthRollup.model), col(HealthRollup.release))
    )
    return _totals(session.execute(stmt).all())


def trim(
    engine: Engine, retention_days: float, rollup_retention_days: float, now: datetime | None = None
) -> dict[str, int]:
    """Delete raw health reports and rollups past their retention, in chunks; counts by table."""
    now = now or datetime.now(UTC)
    deleted = {"healthreport": 0, "healthrollup": 0}
    cutoff = now - timedelta(days=retention_days)
    while True:
        with session_scope(engine) as session:
            old = col(HealthReport.received_at) < cutoff
            ids = select(col(HealthReport.id)).where(old).limit(DELETE_CHUNK)
            result = session.execute(delete(HealthReport).where(col(HealthReport.id).in_(ids)))
            n = _rowcount(result)
        deleted["healthreport"] += n
        if n < DELETE_CHUNK:
            break
    with session_scope(engine) as session:
        rollup_cutoff = now - timedelta(days=rollup_retention_days)
        result = session.execute(delete(HealthRollup).where(col(HealthRollup.hour) < rollup_cutoff))
        deleted["healthrollup"] = _rowcount(result)
    if any(deleted.values()):
        log.info("retention: deleted %(healthreport)d health reports and %(healthrollup)d rollups", deleted)
    return deleted

"""Health per device, model, release and minute: summed as reports arrive, read by the gates.

The ingester calls ``add_health(session, rows)`` (or ``add_health_rows`` with tuples) with the
``HealthReport`` rows of its batch,
in the batch's transaction: the rows are summed per (device, model, release, minute of
``received_at``) in Python (``bucket_rows``, pure) and added to their ``HealthBucket`` rows by
one upsert executemany (sorted keys, so concurrent ingesters never deadlock). The gates then
read a stage's window as sums over buckets (fleet.rollout.health_reads), never every raw report.

Rules:
- only reports the ingester accepted reach here: duplicates (device, session, seq) were dropped
  before (fleet.ingest.claims), so a replayed report is not counted twice;
- a report a gate would refuse on its own figures (negative counts, errors above inferences,
  negative or non-finite latency or drift) is counted in ``suspect`` and not in the sums: the
  gate reads such a device from its raw reports, where fleet.rollout.evidence names each refusal;
- ``first_received`` / ``last_received`` bound the bucket's reports, so a reader can tell a
  bucket wholly inside a window from one that straddles its edge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Engine
from sqlmodel import Session

from fleet.db.bulk import Unnest
from fleet.db.engine import session_scope
from fleet.db.models import HealthBucket, as_utc, table_of

BUCKET_S = 60

BucketKey = tuple[str, str, int, datetime]
# A bucket's columns an upsert adds to.
_SUMS = ("reports", "inferences", "errors", "p95_sum", "p95_count", "drift_sum", "drift_count", "suspect")


def minute_of(ts: datetime) -> datetime:
    """The start of the bucket ``ts`` (aware or naive UTC) falls in."""
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.replace(second=0, microsecond=0)


def suspect(inferences: int, errors: int, p95_ms: float | None, drift: float | None) -> bool:
    """Whether a gate refuses the report on its own figures (fleet.rollout.evidence)."""
    if not 0 <= errors <= inferences:
        return True
    return any(v is not None and not 0 <= v < math.inf for v in (p95_ms, drift))


def bucket_rows(reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``HealthBucket`` increments of ``reports`` (``HealthReport`` column dicts), one per
    bucket key, sorted by key."""
    return _bucket_rows(
        (r["device_id"], r["model"], r["release"], r["received_at"], r["inferences"], r["errors"],
         r.get("p95_ms"), r.get("drift"))
        for r in reports
    )


# The report's figures ``_bucket_rows`` reads, in its tuples' order.
_FIGURES = ("device_id", "model", "release", "received_at", "inferences", "errors", "p95_ms", "drift")


def _bucket_rows(reports: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """``bucket_rows`` of reports as tuples in ``_FIGURES`` order."""
    rows: dict[BucketKey, dict[str, Any]] = {}
    minutes: dict[datetime, tuple[datetime, datetime]] = {}  # a batch's reports share few instants
    for device_id, model, release, received_at, n_inferences, n_errors, p95, drift in reports:
        known = minutes.get(received_at)
        if known is None:
            aware = received_at.replace(tzinfo=UTC) if received_at.tzinfo is None else received_at
            known = minutes[received_at] = (aware, minute_of(aware))
        received, minute = known
        key = (device_id, model, int(release), minute)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {
                "device_id": key[0], "model": key[1], "release": key[2], "minute": key[3],
                "reports": 0, "inferences": 0, "errors": 0, "p95_sum": 0.0, "p95_count": 0,
                "drift_sum": 0.0, "drift_count": 0, "suspect": 0,
                "first_received": received, "last_received": received,
            }
        row["first_received"] = min(row["first_received"], received)
        row["last_received"] = max(row["last_received"], received)
        inferences, errors = int(n_inferences), int(n_errors)
        if suspect(inferences, errors, p95, drift):
            row["suspect"] += 1
            continue
        row["reports"] += 1
        row["inferences"] += inferences
        row["errors"] += errors
        if p95 is not None:
            row["p95_sum"] += p95
            row["p95_count"] += 1
        if drift is not None:
            row["drift_sum"] += drift
            row["drift_count"] += 1
    return [rows[k] for k in sorted(rows)]


def add_health(session: Session, reports: Iterable[Mapping[str, Any]]) -> None:
    """Add a batch's health reports to their buckets, in the session's transaction: one
    statement over all the buckets on PostgreSQL (``fleet.db.bulk``), an executemany elsewhere."""
    _upsert_rows(session, bucket_rows(reports))


def add_health_rows(session: Session, columns: Sequence[str], reports: Iterable[Sequence[Any]]) -> None:
    """``add_health`` for reports as tuples in the order of ``columns`` (HealthReport's names)."""
    figures = itemgetter(*(columns.index(name) for name in _FIGURES))
    _upsert_rows(session, _bucket_rows(map(figures, reports)))


def _upsert_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        _PG_UPSERT.execute_dicts(session, rows)
    else:
        session.execute(_upsert(dialect), rows)


def trim(engine: Engine, retention_days: float, now: datetime | None = None) -> int:
    """Delete buckets older than ``retention_days`` (the raw reports' retention), in chunks of
    minutes; the number deleted."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    table = table_of(HealthBucket)
    total = 0
    while True:
        with session_scope(engine) as session:
            oldest = as_utc(session.execute(select(func.min(table.c.minute))).scalar())
            if oldest is None or oldest >= cutoff:
                break
            until = min(cutoff, oldest + timedelta(hours=1))
            result = session.execute(delete(table).where(table.c.minute < until))
            total += int(result.rowcount or 0) if isinstance(result, CursorResult) else 0
    return total


_UPSERTS: dict[str, Any] = {}


def _upsert(dialect: str) -> Any:
    """One single-row upsert, compiled once and run as an executemany (SQLite; PostgreSQL
    runs ``_PG_UPSERT``, the same upsert over arrays of the rows)."""
    stmt = _UPSERTS.get(dialect)
    if stmt is not None:
        return stmt
    pg = dialect == "postgresql"
    insert = postgresql.insert if pg else sqlite.insert
    table = table_of(HealthBucket)
    least, greatest = (func.least, func.greatest) if pg else (func.min, func.max)
    base = insert(table)
    ex = base.excluded
    c = table.c
    stmt = base.on_conflict_do_update(
        index_elements=["device_id", "model", "release", "minute"],
        set_={
            **{name: c[name] + ex[name] for name in _SUMS},
            "first_received": least(c.first_received, ex.first_received),
            "last_received": greatest(c.last_received, ex.last_received),
        },
    )
    _UPSERTS[dialect] = stmt
    return stmt


# The upsert above as one statement over a batch's buckets (fleet.db.bulk), in their order.
_PG_UPSERT = Unnest(
    table_of(HealthBucket),
    ("device_id", "model", "release", "minute", *_SUMS, "first_received", "last_received"),
    "INSERT INTO {table} AS t ({columns}) SELECT * FROM {rows} "
    "ON CONFLICT (device_id, model, release, minute) DO UPDATE SET "
    + ", ".join(f"{c} = t.{c} + excluded.{c}" for c in _SUMS)
    + ", first_received = least(t.first_received, excluded.first_received), "
    "last_received = greatest(t.last_received, excluded.last_received)",
)

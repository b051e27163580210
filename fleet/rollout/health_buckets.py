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
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Engine
from sqlmodel import Session

from fleet.db.engine import session_scope
from fleet.db.models import HealthBucket, as_utc, table_of

BUCKET_S = 60

BucketKey = tuple[str, str, int, datetime]


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
    rows: dict[BucketKey, dict[str, Any]] = {}
    for r in reports:
        received = r["received_at"]
        received = received.replace(tzinfo=UTC) if received.tzinfo is None else received
        key = (r["device_id"], r["model"], int(r["release"]), minute_of(received))
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
        inferences, errors = int(r["inferences"]), int(r["errors"])
        p95, drift = r.get("p95_ms"), r.get("drift")
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
    """Add a batch's health reports to their buckets, in the session's transaction."""
    rows = bucket_rows(reports)
    if rows:
        session.execute(_upsert(session.get_bind().dialect.name), rows)


def add_health_rows(session: Session, columns: Sequence[str], reports: Iterable[Sequence[Any]]) -> None:
    """``add_health`` for reports as tuples in the order of ``columns`` (HealthReport's names)."""
    add_health(session, (dict(zip(columns, r, strict=True)) for r in reports))


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
    """One single-row upsert, compiled once and run as an executemany (see
    fleet.ingest.rollup._upsert for why not one multi-row statement)."""
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
            **{name: c[name] + ex[name] for name in (
                "reports", "inferences", "errors", "p95_sum", "p95_count", "drift_sum", "drift_count",
                "suspect")},
            "first_received": least(c.first_received, ex.first_received),
            "last_received": greatest(c.last_received, ex.last_received),
        },
    )
    _UPSERTS[dialect] = stmt
    return stmt

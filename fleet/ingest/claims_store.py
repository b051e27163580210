"""The ``DeviceClaim`` rows (fleet.ingest.claims): read and locked by a batch, written back with it.

A batch locks its devices' rows (``SELECT ... FOR UPDATE`` on PostgreSQL, sorted, so ingesters
sharing the stream never deadlock and never both accept one seq); a row missing is inserted
first with ``ON CONFLICT DO NOTHING``, so two ingesters creating it at once both go on.
Refusals made before a message reaches the database (malformed, out of bounds, over budget)
are tallied in memory per device (``Tally``) and added to the rows by the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from fleet.db.models import DeviceClaim, as_utc
from fleet.ingest.claims import SeqWindow

CLAIM = DeviceClaim.__table__  # type: ignore[attr-defined]
CAUSES = ("malformed", "duplicate", "over_budget", "db_refused")
REASON_MAX = 300
_WRITTEN = ("session", "seq_high", "seq_mask", "last_ts", *CAUSES, "last_refusal", "last_refused_at",
            "over_budget_at")
_UPDATE = (
    update(CLAIM)
    .where(CLAIM.c.device_id == bindparam("b_device_id"))
    .values({f: bindparam(f"b_{f}", type_=CLAIM.c[f].type) for f in _WRITTEN})
)


@dataclass
class Tally:
    """A device's refusals not yet written: counts by cause, the latest reason and time."""

    counts: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    at: datetime | None = None
    over_budget_at: datetime | None = None

    def add(self, cause: str, reason: str, at: datetime, n: int = 1) -> None:
        self.counts[cause] = self.counts.get(cause, 0) + n
        self.reason, self.at = reason, at
        if cause == "over_budget":
            self.over_budget_at = at

    def merge(self, other: Tally) -> None:
        for cause, n in other.counts.items():
            self.counts[cause] = self.counts.get(cause, 0) + n
        if other.at is not None and (self.at is None or other.at >= self.at):
            self.reason, self.at = other.reason, other.at
        if other.over_budget_at is not None:
            self.over_budget_at = max(filter(None, (self.over_budget_at, other.over_budget_at)))


@dataclass
class ClaimRow:
    """One locked row: its sequence window and counters, changed in Python, written back once."""

    device_id: str
    window: SeqWindow
    counts: dict[str, int]
    last_refusal: str | None
    last_refused_at: datetime | None
    over_budget_at: datetime | None
    changed: bool = False

    def refuse(self, tally: Tally) -> None:
        for cause, n in tally.counts.items():
            self.counts[cause] = self.counts.get(cause, 0) + n
        if tally.at is not None:
            self.last_refusal, self.last_refused_at = tally.reason[:REASON_MAX], tally.at
        if tally.over_budget_at is not None:
            self.over_budget_at = tally.over_budget_at
        self.changed = True

    def params(self) -> dict[str, Any]:
        w = self.window
        values = {"session": w.session, "seq_high": w.high, "seq_mask": w.mask_bytes(), "last_ts": w.last_ts,
                  **{c: self.counts.get(c, 0) for c in CAUSES}, "last_refusal": self.last_refusal,
                  "last_refused_at": self.last_refused_at, "over_budget_at": self.over_budget_at}
        return {"b_device_id": self.device_id, **{f"b_{k}": v for k, v in values.items()}}


def _row(r: Any) -> ClaimRow:
    return ClaimRow(
        r.device_id, SeqWindow.load(r.session, r.seq_high, r.seq_mask, r.last_ts),
        {c: int(getattr(r, c)) for c in CAUSES}, r.last_refusal, r.last_refused_at, r.over_budget_at,
    )


def lock_rows(session: Session, device_ids: set[str]) -> dict[str, ClaimRow]:
    """The claim rows of these (known) devices, locked for the transaction; missing ones created."""
    if not device_ids:
        return {}
    ordered = sorted(device_ids)
    query = select(CLAIM).order_by(CLAIM.c.device_id).with_for_update()
    rows = {r.device_id: _row(r) for r in session.execute(query.where(CLAIM.c.device_id.in_(ordered)))}
    missing = [d for d in ordered if d not in rows]
    if missing:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        defaults = {"session": "", "seq_high": None, "seq_mask": b"", "last_ts": None,
                    **{c: 0 for c in CAUSES}}
        session.execute(insert(CLAIM).on_conflict_do_nothing(index_elements=["device_id"]),
                        [{"device_id": d, **defaults} for d in missing])
        created = session.execute(query.where(CLAIM.c.device_id.in_(missing)))
        rows.update({r.device_id: _row(r) for r in created})
    return rows


def write_rows(session: Session, rows: dict[str, ClaimRow]) -> None:
    params = [rows[d].params() for d in sorted(rows) if rows[d].changed]
    if params:
        session.execute(_UPDATE, params)


def claims_json(session: Session, device_id: str) -> dict[str, Any]:
    """The device detail's ``telemetry_refused`` block: refused messages by cause, the latest reason."""
    row = session.get(DeviceClaim, device_id)
    if row is None:
        return {**{c: 0 for c in CAUSES}, "last_reason": None, "last_refused_at": None,
                "over_budget_at": None, "session": None, "seq_high": None}
    at, over = as_utc(row.last_refused_at), as_utc(row.over_budget_at)
    return {
        **{c: int(getattr(row, c)) for c in CAUSES},
        "last_reason": row.last_refusal,
        "last_refused_at": at.isoformat() if at else None,
        "over_budget_at": over.isoformat() if over else None,
        "session": row.session,
        "seq_high": row.seq_high,
    }

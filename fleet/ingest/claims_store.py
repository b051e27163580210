"""The ``DeviceClaim`` rows (fleet.ingest.claims): read and locked by a batch, written back with it.

A batch locks its devices' rows (``SELECT ... FOR UPDATE`` on PostgreSQL, sorted, so ingesters
sharing the stream never deadlock and never both accept one seq); a row missing is inserted
first with ``ON CONFLICT DO NOTHING``, so two ingesters creating it at once both go on.
Refusals made before a message reaches the database (malformed, out of bounds, over budget)
are tallied in memory per device (``Tally``) and added to the rows by the next batch. On
PostgreSQL the rows are created and written back by one statement each over all of them
(``fleet.db.bulk.Unnest``); elsewhere by an executemany.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from fleet.db.bulk import Unnest
from fleet.db.models import DeviceClaim, as_utc, table_of
from fleet.ingest.claims import SeqWindow

CLAIM = table_of(DeviceClaim)
CAUSES = ("malformed", "duplicate", "over_budget", "db_refused")
REASON_MAX = 300
_WINDOW = ("session", "seq_high", "seq_missing", "last_ts")
_UPDATE_WINDOW = (
    update(CLAIM)
    .where(CLAIM.c.device_id == bindparam("b_device_id"))
    .values({f: bindparam(f"b_{f}", type_=CLAIM.c[f].type) for f in _WINDOW})
)
_WINDOW_PARAMS = ("b_device_id", *(f"b_{f}" for f in _WINDOW))
_REFUSED = ("device_id", *CAUSES, "last_refusal", "last_refused_at", "over_budget_at")
# Counters are added to in SQL: a batch reads only the windows.
_UPDATE_REFUSED = (
    update(CLAIM)
    .where(CLAIM.c.device_id == bindparam("b_device_id"))
    .values({
        **{c: CLAIM.c[c] + bindparam(f"b_{c}", type_=CLAIM.c[c].type) for c in CAUSES},
        "last_refusal": bindparam("b_last_refusal", type_=CLAIM.c.last_refusal.type),
        "last_refused_at": bindparam("b_last_refused_at", type_=CLAIM.c.last_refused_at.type),
        "over_budget_at": func.coalesce(bindparam("b_over_budget_at", type_=CLAIM.c.over_budget_at.type),
                                        CLAIM.c.over_budget_at),
    })
)

# The three statements above as one statement over a batch's rows each on PostgreSQL
# (fleet.db.bulk); the rows are locked already (lock_rows), so their order does not matter.
_PG_CREATE = Unnest(
    CLAIM, ("device_id",),
    "INSERT INTO {table} (device_id, session, seq_missing, "
    + ", ".join(CAUSES)
    + ") SELECT v.device_id, '', ''::bytea, "
    + ", ".join("0" for _ in CAUSES)
    + " FROM {rows} ON CONFLICT (device_id) DO NOTHING",
)
_PG_UPDATE_WINDOW = Unnest(
    CLAIM, ("device_id", *_WINDOW),
    "UPDATE {table} AS c SET " + ", ".join(f"{f} = v.{f}" for f in _WINDOW)
    + " FROM {rows} WHERE c.device_id = v.device_id",
)
_PG_UPDATE_REFUSED = Unnest(
    CLAIM, _REFUSED,
    "UPDATE {table} AS c SET " + ", ".join(f"{c} = c.{c} + v.{c}" for c in CAUSES)
    + ", last_refusal = v.last_refusal, last_refused_at = v.last_refused_at, "
    "over_budget_at = coalesce(v.over_budget_at, c.over_budget_at) "
    "FROM {rows} WHERE c.device_id = v.device_id",
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

    def values(self, device_id: str) -> tuple[Any, ...]:
        """The row's increments, in ``_REFUSED`` order."""
        return (device_id, *(self.counts.get(c, 0) for c in CAUSES), self.reason[:REASON_MAX], self.at,
                self.over_budget_at)

    def params(self, device_id: str) -> dict[str, Any]:
        return dict(zip((f"b_{c}" for c in _REFUSED), self.values(device_id), strict=True))


@dataclass
class ClaimRow:
    """One locked row's sequence window, changed in Python, and the refusals to add to it."""

    device_id: str
    window: SeqWindow
    refused: Tally | None = None
    changed: bool = False  # the window

    def refuse(self, tally: Tally) -> None:
        if self.refused is None:
            self.refused = Tally()
        self.refused.merge(tally)


def lock_rows(session: Session, device_ids: set[str]) -> dict[str, ClaimRow]:
    """The claim rows of these (known) devices, locked for the transaction; missing ones created."""
    if not device_ids:
        return {}
    ordered = sorted(device_ids)
    query = select(CLAIM.c.device_id, *(CLAIM.c[f] for f in _WINDOW)).order_by(CLAIM.c.device_id)
    query = query.with_for_update()

    def read(ids: list[str]) -> dict[str, ClaimRow]:
        found = session.execute(query.where(CLAIM.c.device_id.in_(ids)))
        load = SeqWindow.load
        return {r.device_id: ClaimRow(r.device_id, load(r.session, r.seq_high, r.seq_missing, r.last_ts))
                for r in found}

    rows = read(ordered)
    missing = [d for d in ordered if d not in rows]
    if missing:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        defaults = {"session": "", "seq_high": None, "seq_missing": b"", "last_ts": None,
                    **{c: 0 for c in CAUSES}}
        if dialect == "postgresql":
            _PG_CREATE.execute(session, [(d,) for d in missing])
        else:
            session.execute(insert(CLAIM).on_conflict_do_nothing(index_elements=["device_id"]),
                            [{"device_id": d, **defaults} for d in missing])
        rows.update(read(missing))
    return rows


def write_rows(session: Session, rows: dict[str, ClaimRow]) -> None:
    """The changed windows, and the refusals added to the counters: two statements at most (on
    PostgreSQL over arrays of the rows, ``fleet.db.bulk``; executemany elsewhere)."""
    pg = session.get_bind().dialect.name == "postgresql"
    windows: list[Any] = []
    refused: list[Any] = []
    for d in sorted(rows):
        row = rows[d]
        if row.changed:
            w = row.window
            windows.append((d, w.session, w.high, w.missing_bytes(), w.last_ts))
        if row.refused is not None:
            refused.append(row.refused.values(d) if pg else row.refused.params(d))
    if pg:
        _PG_UPDATE_WINDOW.execute(session, windows)
        _PG_UPDATE_REFUSED.execute(session, refused)
        return
    if windows:
        session.execute(_UPDATE_WINDOW, [dict(zip(_WINDOW_PARAMS, w, strict=True)) for w in windows])
    if refused:
        session.execute(_UPDATE_REFUSED, refused)


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

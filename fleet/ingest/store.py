"""A decoded batch's one transaction (the database half of ingestion).

A batch is a few statements whatever its size: one SELECT of its devices' telemetry columns
and their claim rows, locked (on PostgreSQL one statement, ``_PG_READ``; elsewhere two, the
second ``claims_store.lock_rows``, which also creates the rows a new device lacks), the pure
application of the messages (``fleet.ingest.apply``), the health reports and events
(``insert_rows``: one ``COPY`` on PostgreSQL), then the gates' health buckets, the hourly rollup
upsert, one UPDATE of the merged device state and the claim rows written back: on PostgreSQL each
of these four is one statement over all its rows (``fleet.db.bulk.Unnest``), sent together in
a pipeline and waited for once; elsewhere one executemany each. No ORM objects: building and
flushing them was most of the writer's time, and then the per-row statements of those
executemany were (docs/performance.md).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet.db.bulk import Unnest, pipelined, quote
from fleet.db.device_models import ReportedModel, read_models
from fleet.db.engine import session_scope
from fleet.db.models import Device, DeviceEvent, HealthReport, table_of
from fleet.ingest import claims_store
from fleet.ingest.apply import (
    EVENT_COLUMNS,
    HEALTH_COLUMNS,
    STATE_FIELDS,
    AppliedBatch,
    DeviceRow,
    Item,
    apply_batch,
)
from fleet.ingest.claims import SeqWindow
from fleet.ingest.claims_store import CLAIM, ClaimRow, Tally
from fleet.rollout.health_buckets import add_health_rows

DEVICE = table_of(Device)
HEALTH = table_of(HealthReport)
EVENT = table_of(DeviceEvent)
_STATE_COLUMNS = [DEVICE.c.id, *(DEVICE.c[f] for f in STATE_FIELDS)]


def _update_state(fields: tuple[str, ...]) -> Any:
    return (
        update(DEVICE)
        .where(DEVICE.c.id == bindparam("b_id"))
        .values({f: bindparam(f"b_{f}", type_=DEVICE.c[f].type) for f in fields})
    )


_UPDATE_STATE = _update_state(STATE_FIELDS)
_UPDATE_STATE_HEALTH = _update_state((*STATE_FIELDS, "last_health"))
# Both as one statement over the batch's devices on PostgreSQL (fleet.db.bulk): ``last_health``
# is written when the device's row carries one (a batch with its health), kept otherwise. Rows
# are locked in the array's (sorted) order: the plan is a nested loop over it with the primary
# key (EXPLAIN on 100,000 devices); and concurrent ingesters locked these devices' claim rows
# first anyway (claims_store.lock_rows).
_PG_UPDATE_STATE = Unnest(
    DEVICE,
    ("id", *STATE_FIELDS, "last_health"),
    "UPDATE {table} AS d SET " + ", ".join(f"{f} = v.{f}" for f in STATE_FIELDS)
    + ", last_health = coalesce(v.last_health, d.last_health) FROM {rows} WHERE d.id = v.id",
)
_json = msgspec.json.Encoder().encode
# On PostgreSQL the batch's known devices' columns and their claim rows, locked, in one statement
# (it was two, each compiled by SQLAlchemy with an IN of the batch's ids): the claim rows are
# locked in a CTE, sorted by device as ``claims_store.lock_rows`` does, only those of known,
# unrevoked devices; the devices' rows, then the claim rows, come out of one UNION ALL (``is_device``
# tells them apart). No join: with a join the planner, misjudging the sizes of a fresh table,
# chose a nested loop that ran the locking sub-select once per device (40 ms for 200 devices).
# A device without a claim row yet gets one from ``lock_rows`` after.
_CLAIM_WINDOW = ("session", "seq_high", "seq_missing", "last_ts")
assert STATE_FIELDS[-1] == "models"  # read as its JSON text (_read_models)
_PG_READ = (
    f"WITH c AS MATERIALIZED (SELECT device_id, {', '.join(map(quote, _CLAIM_WINDOW))} "
    f"FROM {quote(CLAIM.name)} WHERE device_id IN (SELECT id FROM {quote(DEVICE.name)} "
    "WHERE id = ANY(%(ids)b::text[]) AND revoked_at IS NULL) ORDER BY device_id FOR UPDATE) "
    f"SELECT true AS is_device, {', '.join(quote(c.name) for c in _STATE_COLUMNS[:-1])}, models::text, "
    f"{', '.join('NULL' for _ in _CLAIM_WINDOW)} FROM {quote(DEVICE.name)} "
    "WHERE id = ANY(%(ids)b::text[]) AND revoked_at IS NULL "
    f"UNION ALL SELECT false, device_id, {', '.join('NULL' for _ in STATE_FIELDS)}, "
    f"{', '.join(map(quote, _CLAIM_WINDOW))} FROM c"
)


def store_batch(engine: Engine, items: list[Item], tallies: dict[str, Tally]) -> AppliedBatch:
    """Apply and store a batch, with the refusals tallied per device since the last one, in one
    transaction; raises what the database raised (nothing is stored then)."""
    ids = {i.device_id for i in items} | set(tallies)
    with session_scope(engine) as session:
        session.autoflush = False
        # A revoked device's claims are no one's: on a broker the fleet does not manage (the
        # embedded one) it may still publish, so they are refused here too.
        if session.get_bind().dialect.name == "postgresql":
            devices, claim_rows = _pg_read(session, ids)
        else:
            devices = {
                r.id: DeviceRow(
                    r.id, r.last_seen, r.online, r.status_ts, r.status_online, r.agent_version,
                    read_models(r.models),
                )
                for r in session.execute(
                    select(*_STATE_COLUMNS).where(DEVICE.c.id.in_(ids), DEVICE.c.revoked_at.is_(None))
                )
            }
            claim_rows = claims_store.lock_rows(session, set(devices))
        for device_id, tally in tallies.items():
            if device_id in claim_rows:
                claim_rows[device_id].refuse(tally)
        applied = apply_batch(items, devices, claim_rows)
        rows = applied.rows
        insert_rows(session, HEALTH, HEALTH_COLUMNS, rows.health)
        insert_rows(session, EVENT, EVENT_COLUMNS, rows.events)
        with pipelined(session):  # PostgreSQL: one wait for the four
            add_health_rows(session, HEALTH_COLUMNS, rows.health)  # the gates' per-minute sums
            rows.rollup.upsert(session)
            touched = [devices[k] for k in sorted(devices) if devices[k].touched]
            if session.get_bind().dialect.name == "postgresql":
                _PG_UPDATE_STATE.execute(session, [_state_row(d) for d in touched])
            else:
                for stmt, with_health in ((_UPDATE_STATE_HEALTH, True), (_UPDATE_STATE, False)):
                    params = [d.params() for d in touched if (d.last_health is not None) is with_health]
                    if params:
                        session.execute(stmt, params)
            claims_store.write_rows(session, claim_rows)
    return applied


_MODELS = msgspec.json.Decoder(dict[str, ReportedModel])


def _read_models(text: str | None) -> dict[str, ReportedModel]:
    """``Device.models`` from its JSON text: decoded straight into the types when it matches
    them (what ``stored_models`` writes), else as ``read_models`` reads it (an entry that does
    not match is read as empty, with a warning)."""
    if text is None:
        return {}
    try:
        return _MODELS.decode(text)
    except msgspec.DecodeError:  # a ValidationError too
        return read_models(json.loads(text))


def _pg_read(session: Session, ids: set[str]) -> tuple[dict[str, DeviceRow], dict[str, ClaimRow]]:
    """``_PG_READ``: the known devices' rows and their claim rows, locked (missing ones created)."""
    if not ids:
        return {}, {}
    driver = session.connection().connection.driver_connection
    assert driver is not None  # a checked-out pool connection holds its DB-API connection
    with driver.cursor() as cur:
        found = cur.execute(_PG_READ, {"ids": sorted(ids)}).fetchall()
    devices: dict[str, DeviceRow] = {}
    claim_rows: dict[str, ClaimRow] = {}
    load = SeqWindow.load
    for is_device, d_id, last_seen, online, status_ts, status_online, agent, models, *window in found:
        if is_device:
            devices[d_id] = DeviceRow(d_id, last_seen, online, status_ts, status_online, agent,
                                      _read_models(models))
        else:
            claim_rows[d_id] = ClaimRow(d_id, load(*window))
    missing = {d for d in devices if d not in claim_rows}
    if missing:  # a device's first batch: its row created (and locked) as lock_rows does
        claim_rows.update(claims_store.lock_rows(session, missing))
    return devices, claim_rows


def _state_row(d: DeviceRow) -> tuple[Any, ...]:
    """A touched device's row of ``_PG_UPDATE_STATE`` (the JSON columns as JSON text)."""
    health = None if d.last_health is None else _json(d.last_health).decode()
    return (d.id, d.last_seen, d.online, d.status_ts, d.status_online, d.agent_version,
            _json(d.models).decode(), health)


def insert_rows(
    session: Session, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """Append rows (tuples in ``columns`` order) to a table in the session's transaction: one
    binary ``COPY`` on PostgreSQL, whose rows psycopg encodes in C (an INSERT executemany cost
    the writer ~40 % of its time there), one INSERT executemany elsewhere."""
    if not rows:
        return
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])
        return
    driver = conn.connection.driver_connection
    assert driver is not None  # a checked-out pool connection holds its DB-API connection
    types = _column_types(driver, table.name, columns)
    copy_sql = f"COPY {quote(table.name)} ({', '.join(map(quote, columns))}) FROM STDIN (FORMAT BINARY)"
    with driver.cursor() as cur, cur.copy(copy_sql) as copy:
        copy.set_types(types)
        write_row = copy.write_row
        for row in rows:
            write_row(row)


def _column_types(driver: Any, table: str, columns: tuple[str, ...]) -> list[int]:
    """The type of each column as the database has it, for a binary ``COPY``: each value is sent
    in its column's own binary format, so the server checks it as it would the text (a string
    too long for its ``varchar(n)`` is refused, an integer out of an ``int4`` column's range
    too) without parsing text (the text ``COPY`` cost the writer ~5 us a row in psycopg,
    the binary one ~1 us: docs/performance.md).

    Read for every batch, not cached for the process: binary values are not checked against
    the column's type, only decoded as it, so types gone stale under a migration (an ``int8``
    column made ``numeric``) would store wrong numbers without an error. One catalog read per
    batch of up to ``batch_size`` messages."""
    with driver.cursor() as cur:
        found = dict(cur.execute(
            "SELECT attname, atttypid::int FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped", [quote(table)]
        ).fetchall())
    return [found[c] for c in columns]


_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)


def transient(exc: BaseException) -> bool:
    """A failure of the database or the connection, not of a message's data."""
    if isinstance(exc, _TRANSIENT):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - SQLite only
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def describe(exc: BaseException) -> str:
    """The first line of a database error, for a refused message's reason."""
    orig = getattr(exc, "orig", None) or exc
    text = f"{type(orig).__name__}: {orig}".splitlines()[0]
    return text[:200]

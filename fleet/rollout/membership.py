"""Which devices a rollout holds, and pointing a stage's devices at its release: set-based.

Every write here is a few statements whatever the fleet's size (bulk inserts, UPDATE/INSERT
... SELECT over a subquery of the rollout's members), never a round trip per device: starting
a rollout of 10,000 devices on SQLite took 31.7 s when each device was read and written alone.
Sets of devices are subqueries, never lists of ids (PostgreSQL takes at most 65,535 parameters
in one statement).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, text, update
from sqlalchemy import select as core_select
from sqlmodel import Session, col, select

from fleet.db.models import Assignment, Device, Rollout, RolloutDevice, table_of
from fleet.errors import ConflictError
from fleet.ingest.store import insert_rows
from fleet.rollout import engine as eng
from fleet.rollout.assignments import Notice, assign_set, bump_set, record, rollout_release

# Devices named in a rollout event's data (the count is always there).
LISTED_DEVICES = 100
# A member row as inserted (fleet.ingest.store.insert_rows: COPY on PostgreSQL)
MEMBER_COLUMNS = ("rollout_id", "device_id", "stage", "previous_bundle_id", "status", "assigned_at",
                  "progress", "reason", "detail")
# Members inserted at once past which PostgreSQL's statistics of the table are refreshed.
ANALYZE_AFTER = 1000


def member_ids(rollout: Rollout, *, max_stage: int | None = None, statuses: list[str] | None = None,
               **equal: Any) -> Select[Any]:
    """A SELECT of the ids of the rollout's members (up to ``max_stage``, in ``statuses``)."""
    rd = table_of(RolloutDevice)
    stmt = core_select(rd.c.device_id).where(rd.c.rollout_id == rollout.id)
    if max_stage is not None:
        stmt = stmt.where(rd.c.stage <= max_stage)
    if statuses is not None:
        stmt = stmt.where(rd.c.status.in_(statuses))
    for name, value in equal.items():
        stmt = stmt.where(rd.c[name].is_(None) if value is None else rd.c[name] == value)
    return stmt


def assign_members(session: Session, rollout: Rollout, spec: eng.RolloutSpec, *,
                   previous: bool = False) -> dict[str, int]:
    """Place every device the spec selects in its stage (engine.assign_stages) as the rollout's
    members, replacing any before; with ``previous``, each remembers the bundle it is assigned
    now (what a rollback returns it to)."""
    session.flush()
    d, rd = table_of(Device), table_of(RolloutDevice)
    devices = [(r.id, r.labels) for r in session.execute(core_select(d.c.id, d.c.labels))]
    stages = eng.assign_stages(rollout.id or 0, spec, devices)
    session.execute(delete(rd).where(rd.c.rollout_id == rollout.id))
    current: dict[str, int] = {}
    if previous:
        a = table_of(Assignment)
        current = {r.device_id: r.bundle_id for r in session.execute(
            core_select(a.c.device_id, a.c.bundle_id).where(a.c.model == rollout.model))}
    rows = [
        (rollout.id, device_id, stage, current.get(device_id), "pending", None, "pending", None, "")
        for device_id, stage in stages.items()
    ]
    if rows:
        # one COPY on PostgreSQL: an INSERT executemany of 100,000 members took 1.5 s of a start
        insert_rows(session, rd, MEMBER_COLUMNS, rows)
        if session.get_bind().dialect.name == "postgresql" and len(rows) >= ANALYZE_AFTER:
            # PostgreSQL plans the ticks' joins on the members from its statistics: right after
            # a bulk insert they say the table is small (a nested loop over 100,000 members)
            session.execute(text("ANALYZE rolloutdevice"))
    expire_members(session)
    return stages


def check_conflicts(session: Session, rollout: Rollout) -> None:
    """Refuse (ConflictError) when a member is in another active rollout."""
    stmt = (
        select(RolloutDevice.device_id, Rollout.id)
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(col(Rollout.state).in_([s.value for s in eng.ACTIVE_STATES]))
        .where(Rollout.id != rollout.id)
        .where(col(RolloutDevice.device_id).in_(member_ids(rollout)))
    )
    clash = session.exec(stmt).all()
    if clash:
        by_rollout: dict[int, list[str]] = {}
        for device_id, rid in clash:
            assert rid is not None
            by_rollout.setdefault(rid, []).append(device_id)
        rid, ids = next(iter(by_rollout.items()))
        raise ConflictError(
            f"{len(clash)} of the rollout's devices are already in another active rollout: "
            f"rollout {rid} holds {', '.join(sorted(ids)[:5])}"
            + ("…" if len(ids) > 5 else "")
            + "; finish, abort or roll back that rollout first",
            rollouts=sorted(by_rollout),
        )


def join_new_devices(session: Session, rollout: Rollout, spec: eng.RolloutSpec) -> None:
    """Devices that enrolled (or matched) after the start join the stage their hash places
    them in; they are assigned when that stage is current or reached. A device in another
    active rollout is left alone."""
    known = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
    fresh = session.exec(select(Device.id, Device.labels).where(col(Device.id).not_in(known))).all()
    stages = eng.assign_stages(rollout.id or 0, spec, [(d, labels) for d, labels in fresh])
    if not stages:
        return
    busy = set(
        session.exec(
            select(RolloutDevice.device_id)
            .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
            .where(col(Rollout.state).in_([s.value for s in eng.ACTIVE_STATES]))
            .where(Rollout.id != rollout.id)
            .where(col(RolloutDevice.device_id).not_in(known))
        )
    )
    joined = {d: st for d, st in stages.items() if d not in busy}
    if not joined:
        return
    current = dict(session.exec(
        select(Assignment.device_id, Assignment.bundle_id)
        .where(Assignment.model == rollout.model, col(Assignment.device_id).not_in(known))
    ).all())
    rd = table_of(RolloutDevice)
    session.flush()
    insert_rows(session, rd, MEMBER_COLUMNS, [
        (rollout.id, d, st, current.get(d), "pending", None, "pending", None, "")
        for d, st in sorted(joined.items())
    ])
    expire_members(session)
    record(
        session,
        rollout,
        "devices_joined",
        f"{len(joined)} devices joined after the start: "
        + ", ".join(f"{d} (stage {spec.stages[st].name})" for d, st in sorted(joined.items())[:10])
        + ("…" if len(joined) > 10 else ""),
        devices=dict(sorted(joined.items())[:LISTED_DEVICES]),
        count=len(joined),
    )


def enter_stage(
    session: Session,
    rollout: Rollout,
    spec: eng.RolloutSpec,
    stage_index: int,
    *,
    now: datetime,
    record_start: bool = True,
) -> list[Notice]:
    """Point the pending devices of stages <= stage_index at the target bundle; in a shadow
    stage, give it to them as a shadow candidate instead (status ``shadow``)."""
    shadowing = spec.stages[stage_index].mode == "shadow"
    statuses = ["pending"] if shadowing else ["pending", "shadow"]
    pending = member_ids(rollout, max_stage=stage_index, statuses=statuses)
    session.flush()
    # on a tick (no record) the statements run on whatever is pending, often nothing
    new = sorted(session.execute(pending).scalars()) if record_start else None
    notices: list[Notice] = []
    if new is None or new:
        if shadowing:
            notices = bump_set(session, pending)
        else:
            notices = assign_set(session, pending, rollout.model, rollout.bundle_id, rollout.id)
    rd = table_of(RolloutDevice)
    session.execute(
        update(rd)
        .where(rd.c.rollout_id == rollout.id, rd.c.stage <= stage_index, rd.c.status.in_(statuses))
        .values(status="shadow" if shadowing else "assigned", assigned_at=now,
                progress=eng.Progress.ASSIGNED.value)
    )
    expire_members(session)
    if new is not None:
        stage = spec.stages[stage_index]
        total = session.exec(
            select(func.count()).select_from(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout.id, RolloutDevice.stage <= stage_index)
        ).one()
        shadow_note = (
            f"; r{rollout_release(session, rollout)} in shadow on {stage.shadow_sample_rate:g} of "
            f"requests, CPU budget {stage.shadow_max_busy_fraction:g}"
            if shadowing
            else ""
        )
        record(
            session,
            rollout,
            "stage_started",
            f"stage {stage.name} started: {len(new)} new devices, {total} in all; "
            f"bake {stage.bake_seconds:g} s{shadow_note}",
            stage=stage.name,
            new_devices=new[:LISTED_DEVICES],
            new_count=len(new),
        )
    return notices


def expire_members(session: Session) -> None:
    """Members written by statements: loaded RolloutDevice objects read them again."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, RolloutDevice | Device | Assignment):
            session.expire(obj)

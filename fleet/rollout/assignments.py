"""The writes a rollout step makes on the database: which release each device should run
(its assignment and generation), shadow candidates ending, and the rollout's history.

Each returns the desired-state notices to publish once the transaction has committed.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from sqlalchemy import Select, and_, delete, exists, literal, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from fleet.db.models import (
    Assignment,
    Bundle,
    Device,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    now_utc,
    table_of,
)
from fleet.rollout import engine as eng

log = logging.getLogger(__name__)

Notice = tuple[str, int]  # (device_id, generation)


def load_spec(rollout: Rollout) -> eng.RolloutSpec:
    return msgspec.convert(rollout.spec, eng.RolloutSpec)


def set_assignment(
    session: Session, device_id: str, model: str, bundle_id: int | None, rollout_id: int | None
) -> Notice | None:
    """Point ``device_id``'s ``model`` at ``bundle_id`` (None: nothing); bump its generation
    when that changes what the device should run."""
    current = session.get(Assignment, (device_id, model))
    if bundle_id is not None and current is not None and current.bundle_id == bundle_id:
        if current.rollout_id != rollout_id:
            current.rollout_id = rollout_id
            session.add(current)
        return None
    if bundle_id is None and current is None:
        return None
    device = session.get(Device, device_id)
    if device is None:
        return None
    device.generation += 1
    session.add(device)
    if bundle_id is None:
        assert current is not None
        session.delete(current)
    elif current is None:
        session.add(
            Assignment(
                device_id=device_id,
                model=model,
                bundle_id=bundle_id,
                rollout_id=rollout_id,
                generation=device.generation,
            )
        )
    else:
        current.bundle_id = bundle_id
        current.rollout_id = rollout_id
        current.generation = device.generation
        current.updated_at = now_utc()
        session.add(current)
    return device_id, device.generation


def assign_set(
    session: Session, devices: Select[Any], model: str, bundle_id: int | None, rollout_id: int | None
) -> list[Notice]:
    """``set_assignment`` for every device ``devices`` (a SELECT of ids) names, in a few
    statements whatever their number: devices already on ``bundle_id`` only take the rollout's
    id; the others get it (or lose the model's assignment, with None) and a new generation."""
    session.flush()
    a = table_of(Assignment)
    d = table_of(Device)
    in_set = d.c.id.in_(devices)
    if bundle_id is None:
        has = exists().where(a.c.device_id == d.c.id, a.c.model == model)
        changed = [(r.id, r.generation + 1) for r in session.execute(core_select(d.c.id, d.c.generation)
                                                                      .where(in_set, has))]
        if changed:
            session.execute(update(d).where(in_set, has).values(generation=d.c.generation + 1))
            session.execute(delete(a).where(a.c.model == model, a.c.device_id.in_(devices)))
        _expire(session)
        return changed
    on_it = exists().where(a.c.device_id == d.c.id, a.c.model == model, a.c.bundle_id == bundle_id)
    session.execute(
        update(a)
        .where(a.c.model == model, a.c.bundle_id == bundle_id, a.c.device_id.in_(devices),
               a.c.rollout_id.is_distinct_from(rollout_id))
        .values(rollout_id=rollout_id)
    )
    changed = [(r.id, r.generation + 1) for r in session.execute(core_select(d.c.id, d.c.generation)
                                                                  .where(in_set, ~on_it))]
    if changed:
        session.execute(update(d).where(in_set, ~on_it).values(generation=d.c.generation + 1))
        # the devices not on it yet still are not (the generations moved, not the assignments)
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        rows = core_select(d.c.id, literal(model), literal(bundle_id), literal(rollout_id), d.c.generation,
                      literal(now_utc(), a.c.updated_at.type)).where(and_(in_set, ~on_it))
        stmt = insert(a).from_select(
            ["device_id", "model", "bundle_id", "rollout_id", "generation", "updated_at"], rows)
        ex = stmt.excluded
        session.execute(stmt.on_conflict_do_update(
            index_elements=["device_id", "model"],
            set_={"bundle_id": ex.bundle_id, "rollout_id": ex.rollout_id, "generation": ex.generation,
                  "updated_at": ex.updated_at},
        ))
    _expire(session)
    return changed


def bump_set(session: Session, devices: Select[Any]) -> list[Notice]:
    """``bump_generation`` for every device ``devices`` (a SELECT of ids) names."""
    session.flush()
    d = table_of(Device)
    in_set = d.c.id.in_(devices)
    ids = core_select(d.c.id, d.c.generation).where(in_set)
    changed = [(r.id, r.generation + 1) for r in session.execute(ids)]
    if changed:
        session.execute(update(d).where(in_set).values(generation=d.c.generation + 1))
    _expire(session)
    return changed


def _expire(session: Session) -> None:
    """Rows changed by statements, not through the session: loaded objects read them again."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Device | Assignment | RolloutDevice):
            session.expire(obj)


def rollout_release(session: Session, rollout: Rollout) -> int | None:
    bundle = session.get(Bundle, rollout.bundle_id)
    return bundle.release if bundle else None


def bump_generation(session: Session, device_id: str) -> Notice | None:
    """A change of the device's desired state other than its assignment (a shadow candidate
    added or removed): bump its generation so it pulls again."""
    device = session.get(Device, device_id)
    if device is None:
        return None
    device.generation += 1
    session.add(device)
    return device_id, device.generation


def end_shadow(session: Session, rollout: Rollout) -> list[Notice]:
    """Stop shadowing: the rollout's devices in shadow go back to pending (never switched)."""
    rd = table_of(RolloutDevice)
    shadowing = core_select(rd.c.device_id).where(rd.c.rollout_id == rollout.id, rd.c.status == "shadow")
    notices = bump_set(session, shadowing)
    if notices:
        session.execute(update(rd).where(rd.c.rollout_id == rollout.id, rd.c.status == "shadow")
                        .values(status="pending"))
        _expire(session)
    return notices


def record(session: Session, rollout: Rollout, kind: str, message: str, /, **data: Any) -> None:
    session.add(RolloutEvent(rollout_id=rollout.id or 0, kind=kind, message=message, data=data))
    log.info("rollout %s: %s", rollout.id, message)

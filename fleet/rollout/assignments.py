"""The writes a rollout step makes on the database: which release each device should run
(its assignment and generation), shadow candidates ending, and the rollout's history.

Each returns the desired-state notices to publish once the transaction has committed.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from sqlmodel import Session, select

from fleet.db.models import Assignment, Bundle, Device, Rollout, RolloutDevice, RolloutEvent, now_utc
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
    notices: list[Notice] = []
    for rd in session.exec(
        select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.status == "shadow")
    ):
        rd.status = "pending"
        session.add(rd)
        notice = bump_generation(session, rd.device_id)
        if notice:
            notices.append(notice)
    return notices


def record(session: Session, rollout: Rollout, kind: str, message: str, /, **data: Any) -> None:
    session.add(RolloutEvent(rollout_id=rollout.id or 0, kind=kind, message=message, data=data))
    log.info("rollout %s: %s", rollout.id, message)

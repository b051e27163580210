"""What each device has accepted, and the refusal of a rollout its devices would refuse.

A device accepts a release only above the highest release of the model it has accepted
(its anti-rollback floor). The fleet cannot read that floor, but it knows what raises it:
the release the device reports serving, releases it reported activated or committed, and
the release it is assigned (it will install it, re-issues included). A rollout whose
release is not above that for some of its devices would stall there (each refuses with
reason ``rollback``), so it is refused before anything is assigned, naming those devices,
unless the operator asks for a re-issue (the same content signed as a new, higher release).

``newer_accepted`` is the decision (pure); ``accepted_releases`` reads the database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select
from sqlmodel import Session, col, func, select

from fleet.db.device_models import read_model
from fleet.db.models import Assignment, Bundle, Device, DeviceEvent
from fleet.errors import ConflictError
from fleet.rollout.stalls import Refusal
from shared.telemetry.vocabulary import EventKind

# Update events after which a device's floor is at least the event's release.
# (Plain strings, the enum values: the query binds them to DeviceEvent.kind.)
ACCEPTING_EVENTS = (EventKind.ACTIVATED.value, EventKind.COMMITTED.value)
NAMED_DEVICES = 10


@dataclass(frozen=True)
class Accepted:
    """The highest release of a model a device is known to have accepted, and why we know."""

    release: int
    version: str | None
    source: str  # "reported" | "event" | "assigned"

    def text(self) -> str:
        version = f" ({self.version})" if self.version else ""
        return f"r{self.release}{version} {self.source}"


class ReleaseNotAboveDevicesError(ConflictError):
    """The rollout's release is not above what some of its devices have accepted."""

    code = "release_not_above"


def newer_accepted(target_release: int, accepted: Mapping[str, Accepted]) -> dict[str, Accepted]:
    """The devices that would refuse ``target_release``: those that accepted it or higher.
    (A device that accepted exactly the target holds the same bundle: the fleet never
    stores two bundles with one number, so it is no refusal.)"""
    return {d: a for d, a in sorted(accepted.items()) if a.release > target_release}


def refuse_lower_release(model: str, target_release: int, target_version: str,
                         refusing: Mapping[str, Accepted], *, devices: int) -> ReleaseNotAboveDevicesError:
    named = ", ".join(f"{d} ({a.text()})" for d, a in list(refusing.items())[:NAMED_DEVICES])
    more = f" and {len(refusing) - NAMED_DEVICES} more" if len(refusing) > NAMED_DEVICES else ""
    top = max(a.release for a in refusing.values())
    return ReleaseNotAboveDevicesError(
        f"{model} r{target_release} ({target_version}) is not above what {len(refusing)} of the "
        f"rollout's {devices} devices already accepted: {named}{more}; they would refuse it "
        f"(anti-rollback, highest r{top}). Nothing was assigned. Build a higher release, or "
        'create the rollout with "reissue": true (edgefleet rollout create --reissue) to sign the '
        "same content again as a new, higher release",
        devices=sorted(refusing), highest=top, release=target_release,
    )


def accepted_releases(
    session: Session, model: str, device_ids: Sequence[str] | Select[Any]
) -> dict[str, Accepted]:
    """For each device (that has any), the highest release of ``model`` it has accepted or will.
    ``device_ids``: a list, or a SELECT of ids (a rollout's members: no list of 100,000)."""
    if not isinstance(device_ids, Select) and not device_ids:
        return {}
    ids = device_ids if isinstance(device_ids, Select) else list(device_ids)
    best: dict[str, Accepted] = {}

    def offer(device_id: str, candidate: Accepted) -> None:
        if device_id not in best or candidate.release > best[device_id].release:
            best[device_id] = candidate

    for device_id, models in session.exec(select(Device.id, Device.models).where(col(Device.id).in_(ids))):
        entry = read_model(models, model)
        if entry.release is not None and entry.release > 0:
            offer(device_id, Accepted(entry.release, entry.version or None, "reported"))
    for device_id, release, version in session.exec(
        select(Assignment.device_id, Bundle.release, Bundle.version)
        .join(Bundle, col(Bundle.id) == col(Assignment.bundle_id))
        .where(Assignment.model == model, col(Assignment.device_id).in_(ids))
    ):
        offer(device_id, Accepted(release, version, "assigned"))
    for device_id, release in session.exec(
        select(DeviceEvent.device_id, func.max(DeviceEvent.release))
        .where(
            DeviceEvent.model == model,
            col(DeviceEvent.device_id).in_(ids),
            col(DeviceEvent.kind).in_(ACCEPTING_EVENTS),
        )
        .group_by(col(DeviceEvent.device_id))
    ):
        if release is not None:
            offer(device_id, Accepted(int(release), None, "activated"))
    return best


def latest_failures(
    session: Session, model: str, release: int, device_ids: Sequence[str], since: datetime | None
) -> dict[str, Refusal]:
    """Each device's latest ``failed`` update event for ``release`` (since ``since``): the
    reason code and the device's own text, for the rollout's status."""
    if not device_ids:
        return {}
    stmt = select(DeviceEvent).where(
        DeviceEvent.model == model,
        DeviceEvent.release == release,
        DeviceEvent.kind == "failed",
        col(DeviceEvent.device_id).in_(list(device_ids)),
    )
    if since is not None:
        stmt = stmt.where(col(DeviceEvent.received_at) >= since)
    out: dict[str, Refusal] = {}
    for e in session.exec(stmt.order_by(col(DeviceEvent.received_at), col(DeviceEvent.id))):
        out[e.device_id] = Refusal(e.reason, (e.message or "").strip())
    return out

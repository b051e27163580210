"""The fleet side of shadow stages, read by the device endpoints.

A device of a running rollout whose current stage runs in shadow has the status
``shadow`` in ``RolloutDevice`` (set by the controller when the stage starts, reset to
``pending`` when the rollout stops running, ``assigned`` when a switch stage takes it).
Its desired state then carries, on the model's entry, the candidate to run beside the
serving release; it may read that bundle's envelope and blobs like an assigned one.
"""

from __future__ import annotations

import msgspec
from sqlmodel import Session, col, select

from fleet.db.models import Bundle, Rollout, RolloutDevice
from fleet.rollout import engine as eng
from shared.contract.desired import DesiredShadow


def _rows(session: Session, device_id: str) -> list[tuple[Rollout, Bundle]]:
    stmt = (
        select(Rollout, Bundle)
        .join(RolloutDevice, col(RolloutDevice.rollout_id) == col(Rollout.id))
        .join(Bundle, col(Bundle.id) == col(Rollout.bundle_id))
        .where(
            RolloutDevice.device_id == device_id,
            RolloutDevice.status == "shadow",
            Rollout.state == eng.RolloutState.RUNNING.value,
        )
    )
    return [(r, b) for r, b in session.exec(stmt).all()]


def shadow_entries(session: Session, device_id: str, base: str) -> dict[str, DesiredShadow]:
    """model -> the ``shadow`` object of its desired entry (docs/rollouts.md)."""
    out: dict[str, DesiredShadow] = {}
    for rollout, bundle in _rows(session, device_id):
        spec = msgspec.convert(rollout.spec, eng.RolloutSpec)
        stage = spec.stages[min(rollout.current_stage, len(spec.stages) - 1)]
        if stage.mode != "shadow":
            continue
        out[rollout.model] = DesiredShadow(
            release=bundle.release,
            digest=bundle.digest,
            bundle_id=bundle.id,
            envelope_url=f"{base}/api/v1/bundles/{bundle.id}/envelope",
            blob_url=f"{base}/api/v1/blobs/{{sha256}}",
            sample_rate=stage.shadow_sample_rate,
            max_busy_fraction=stage.shadow_max_busy_fraction,
            rollout_id=rollout.id,
        )
    return out


def shadow_bundles(session: Session, device_id: str) -> list[Bundle]:
    """Bundles the device evaluates in shadow (it may read their envelope and blobs)."""
    return [b for _r, b in _rows(session, device_id)]

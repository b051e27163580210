"""What the rollout engine needs to decide a step, read from the database: the members'
states, the health windows of the new release and of the previous one (for the latency
gate), install and rollback events, and shadow figures."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_
from sqlmodel import Session, col, select

from fleet.db.device_models import ReportedModel, read_model
from fleet.db.models import Bundle, Device, DeviceEvent, HealthReport, Rollout, RolloutDevice, as_utc
from fleet.rollout import engine as eng

log = logging.getLogger(__name__)

# The latency gate compares with previous-release windows from this long before a device
# was told to update.
LATENCY_BASELINE_S = 3600.0


def gate_inputs(
    session: Session, rollout: Rollout, spec: eng.RolloutSpec, bundle: Bundle, now: datetime
) -> tuple[list[RolloutDevice], dict[str, Any]]:
    """The rollout's members and what the engine needs about them, from the database."""
    stage_index = rollout.current_stage
    members = list(session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)))
    ids = [m.device_id for m in members if m.stage <= stage_index]
    devices = (
        {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))} if ids else {}
    )

    def ts(value: datetime | None) -> float | None:
        value = as_utc(value)
        return value.timestamp() if value else None

    states = []
    for m in members:
        d = devices.get(m.device_id)
        entry = read_model(d.models, rollout.model) if d else ReportedModel()
        states.append(
            eng.DeviceState(
                m.device_id,
                m.stage,
                release=entry.release,
                state=entry.state,
                waiting=entry.waiting,
                online=d.online if d else None,
                last_seen=ts(d.last_seen) if d else None,
                assigned_at=ts(m.assigned_at),
            )
        )
    stage_started = as_utc(rollout.stage_started_at) or now
    started = as_utc(rollout.started_at) or stage_started
    health: list[eng.HealthWindow] = []
    baseline: list[eng.HealthWindow] = []
    events: list[eng.InstallEvent] = []
    target = bundle.release
    if ids:
        # In the order received: the gates take a device's windows up to what it could have
        # served (fleet.rollout.evidence), and refuse a (seq, ts) it already sent.
        health = [
            eng.HealthWindow(h.device_id, h.release, h.inferences, h.errors, h.p95_ms, h.drift,
                             seq=h.seq, ts=h.ts, received_at=ts(h.received_at))
            for h in session.exec(
                select(HealthReport)
                .where(
                    col(HealthReport.device_id).in_(ids),
                    HealthReport.model == rollout.model,
                    HealthReport.release == target,
                    col(HealthReport.received_at) >= stage_started,
                )
                .order_by(col(HealthReport.received_at), col(HealthReport.id))
            )
        ]
        events = [
            eng.InstallEvent(e.device_id, e.release, e.kind, e.reason, e.from_release)
            for e in session.exec(
                select(DeviceEvent)
                .where(
                    col(DeviceEvent.device_id).in_(ids),
                    DeviceEvent.model == rollout.model,
                    or_(DeviceEvent.release == target, DeviceEvent.from_release == target),
                    col(DeviceEvent.received_at) >= started,
                )
                .order_by(col(DeviceEvent.received_at), col(DeviceEvent.id))
            )
        ]
        if spec.gates_of(stage_index).max_latency_ratio is not None:
            in_stage = [m for m in members if m.stage <= stage_index]
            baseline = previous_release_windows(session, rollout, in_stage)
    shadow: list[eng.ShadowFigures] = []
    if spec.stages[stage_index].mode == "shadow":
        shadow = shadow_figures(devices.values(), rollout.model, target, stage_started.timestamp())
    return members, {
        "devices": states, "health": health, "events": events, "baseline": baseline, "shadow": shadow,
    }

def previous_release_windows(
    session: Session, rollout: Rollout, members: Sequence[RolloutDevice]
) -> list[eng.HealthWindow]:
    """Windows of each device's previous release from before it was told to update."""
    previous_ids = {m.previous_bundle_id for m in members if m.previous_bundle_id}
    if not previous_ids:
        return []
    releases = {
        b.id: b.release for b in session.exec(select(Bundle).where(col(Bundle.id).in_(previous_ids)))
    }
    until = {
        m.device_id: (as_utc(m.assigned_at), releases.get(m.previous_bundle_id or 0))
        for m in members
        if m.assigned_at is not None and m.previous_bundle_id in releases
    }
    if not until:
        return []
    first = min(t for t, _ in until.values() if t is not None)
    rows = session.exec(
        select(HealthReport).where(
            col(HealthReport.device_id).in_(list(until)),
            HealthReport.model == rollout.model,
            col(HealthReport.release).in_(sorted(set(releases.values()))),
            col(HealthReport.received_at) >= first - timedelta(seconds=LATENCY_BASELINE_S),
        )
    )
    out = []
    for h in rows:
        assigned, release = until[h.device_id]
        received = as_utc(h.received_at)
        if assigned is None or received is None or h.release != release:
            continue
        if assigned - timedelta(seconds=LATENCY_BASELINE_S) <= received < assigned:
            out.append(
                eng.HealthWindow(h.device_id, h.release, h.inferences, h.errors, h.p95_ms, h.drift)
            )
    return out


def shadow_figures(
    devices: Iterable[Device], model: str, release: int, since: float
) -> list[eng.ShadowFigures]:
    """Each device's latest shadow report of ``release`` (the ingester keeps it in
    ``Device.models[model].shadow``) received since ``since``."""
    out = []
    for d in devices:
        sh = read_model(d.models, model).shadow  # typed: an unreadable entry reads as none
        if sh is None or sh.release != release or sh.received_at < since:
            continue
        out.append(
            eng.ShadowFigures(
                d.id,
                sh.release,
                samples=sh.samples,
                agreed=sh.agreed,
                errors=sh.errors,
                dropped=sh.dropped_queue + sh.dropped_budget,
                max_abs_error=sh.max_abs_error,
                cosine_min=sh.cosine_min,
                candidate_p95_ms=sh.candidate_p95_ms,
                current_p95_ms=sh.current_p95_ms,
                metric=sh.metric or "argmax",
            )
        )
    return out

"""The read side of a rollout: its status document (stages, gates and their history,
members, events) as the API, the CLI and the dashboard show it."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlmodel import Session, col, func, select

from fleet.db.device_models import read_model
from fleet.db.models import Bundle, Device, GateEvaluation, Rollout, RolloutDevice, RolloutEvent
from fleet.rollout import engine as eng
from fleet.rollout.assignments import load_spec
from shared.timeutil import format_time as format_time  # re-exported: the controller
from shared.timeutil import parse_time as parse_time  # re-exported: the controller

GATE_HISTORY_LIMIT = 500
# Members listed in the document (and per stage); the counts cover them all.
MEMBERS_LISTED = 1000


def _stage_state(rollout: Rollout, index: int) -> str:
    current, state = rollout.current_stage, rollout.state
    if state == eng.RolloutState.CREATED.value or index > current:
        return "pending"
    if index < current:
        return "passed"
    if state == eng.RolloutState.RUNNING.value and rollout.awaiting_approval_since is not None:
        return "awaiting_approval"
    return {
        eng.RolloutState.RUNNING.value: "active",
        eng.RolloutState.PAUSED.value: "paused",
        eng.RolloutState.SUCCEEDED.value: "passed",
        eng.RolloutState.ROLLED_BACK.value: "rolled_back",
        eng.RolloutState.ABORTED.value: "aborted",
    }.get(state, state)


def _gate_row(g: GateEvaluation) -> dict[str, Any]:
    return {
        "gate": g.gate,
        "stage": g.stage,
        "stage_name": g.stage_name,
        "status": g.status,
        "observed": g.observed,
        "threshold": g.threshold,
        "sample": g.sample,
        "min_sample": g.min_sample,
        "unit": g.unit,
        "verdict": g.verdict,
        "message": g.message,
        "figures": g.figures,
        "ts": format_time(g.ts),
    }


def rollout_status(session: Session, rollout: Rollout, *, events: bool = True) -> dict[str, Any]:
    spec = load_spec(rollout)
    bundle = session.get(Bundle, rollout.bundle_id)
    of_rollout = RolloutDevice.rollout_id == rollout.id
    # counts by the database; members listed up to MEMBERS_LISTED (a rollout to 100,000 devices
    # would be a 20 MB document): the first stages' first, by id
    counts = session.exec(
        select(RolloutDevice.stage, RolloutDevice.progress, func.count())
        .where(of_rollout).group_by(col(RolloutDevice.stage), col(RolloutDevice.progress))
    ).all()
    members = session.exec(
        select(RolloutDevice).where(of_rollout)
        .order_by(col(RolloutDevice.stage), col(RolloutDevice.device_id)).limit(MEMBERS_LISTED)
    ).all()
    current_gates = [g for g in (rollout.gate_results or []) if isinstance(g, dict)]
    history: list[dict[str, Any]] = []
    if events:
        rows = session.exec(
            select(GateEvaluation)
            .where(GateEvaluation.rollout_id == rollout.id)
            .order_by(col(GateEvaluation.id).desc())
            .limit(GATE_HISTORY_LIMIT)
        ).all()
        history = [_gate_row(g) for g in reversed(rows)]
    latest_by_stage: dict[int, dict[str, dict[str, Any]]] = {}
    for g in [*history, *current_gates]:  # later ones win
        latest_by_stage.setdefault(int(g.get("stage", -1)), {})[str(g.get("gate"))] = g
    stages = []
    for i, st in enumerate(spec.stages):
        committed = sum(n for stage, progress, n in counts
                        if stage <= i and progress == eng.Progress.COMMITTED.value)
        joined = session.exec(
            select(RolloutDevice.device_id).where(of_rollout, RolloutDevice.stage == i)
            .order_by(col(RolloutDevice.device_id)).limit(MEMBERS_LISTED)
        ).all()
        stages.append(
            {
                "name": st.name,
                "index": i,
                "state": _stage_state(rollout, i),
                "devices": list(joined),
                "device_count": sum(n for stage, _, n in counts if stage == i),
                "percent": st.percent,
                "selector": st.selector,
                "min_devices": st.min_devices,
                "bake_seconds": st.bake_seconds,
                "approval": st.approval,
                "mode": st.mode,
                "committed": committed,
                "gate_results": list(latest_by_stage.get(i, {}).values()),
            }
        )
    device_rows = (
        {
            d.id: d
            for d in session.exec(select(Device).where(col(Device.id).in_([m.device_id for m in members])))
        }
        if members
        else {}
    )
    progress_counts: dict[str, int] = {}
    for _, progress, n in counts:
        progress_counts[progress] = progress_counts.get(progress, 0) + n
    out: dict[str, Any] = {
        "id": rollout.id,
        "name": rollout.name,
        "model": rollout.model,
        "bundle_id": rollout.bundle_id,
        "release": bundle.release if bundle else None,
        "version": bundle.version if bundle else None,
        "reissue_of": bundle.reissue_of if bundle else None,
        "state": rollout.state,
        "current_stage": rollout.current_stage,
        "current_stage_name": spec.stages[rollout.current_stage].name,
        "stage_started_at": format_time(rollout.stage_started_at),
        "reason": rollout.reason,
        "last_evaluation": rollout.last_evaluation,
        "awaiting_approval": rollout.awaiting_approval_since is not None
        and rollout.state == eng.RolloutState.RUNNING.value,
        "awaiting_approval_since": format_time(rollout.awaiting_approval_since),
        "approved_stage": rollout.approved_stage,
        "extensions": rollout.extensions,
        "gates": current_gates,
        "progress": dict(sorted(progress_counts.items())),
        "stages": stages,
        "devices": [
            {
                "device_id": m.device_id,
                "stage": m.stage,
                "status": m.status,
                "progress": m.progress,
                "reason": m.reason,
                "detail": m.detail,
                "assigned_at": format_time(m.assigned_at),
                "online": device_rows[m.device_id].online if m.device_id in device_rows else None,
                "last_seen": format_time(device_rows[m.device_id].last_seen)
                if m.device_id in device_rows
                else None,
                "previous_bundle_id": m.previous_bundle_id,
                "shadow": msgspec.to_builtins(
                    read_model(device_rows[m.device_id].models, rollout.model).shadow)
                if m.device_id in device_rows
                else None,
            }
            for m in members
        ],
        "devices_total": sum(n for _, _, n in counts),
        "spec": rollout.spec,
        "created": format_time(rollout.created),
        "updated": format_time(rollout.updated),
    }
    if events:
        rows = session.exec(
            select(RolloutEvent).where(RolloutEvent.rollout_id == rollout.id).order_by(col(RolloutEvent.id))
        ).all()
        out["events"] = [
            {"ts": format_time(e.ts), "kind": e.kind, "message": e.message, "data": e.data} for e in rows
        ]
        out["gate_history"] = history
    return out



"""The rollout controller: loads rollouts from the database, asks the pure engine what to
do, and applies the decision (assignments, desired-state notices, history, rollback).

Everything it knows is in the database (rollout, per-device progress, extensions,
approval, gate results), so a restarted fleet resumes where it was.
Each rollout is handled in its own transaction; on PostgreSQL the rollout row is
locked (FOR UPDATE SKIP LOCKED) so several fleet processes never act on one rollout
at once. Desired-state notices are published only after the transaction committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.broker.client import Publisher
from fleet.db.engine import session_scope
from fleet.db.models import (
    Assignment,
    Bundle,
    Device,
    DeviceEvent,
    GateEvaluation,
    HealthReport,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    as_utc,
    now_utc,
)
from fleet.errors import ConflictError, NotFoundError
from fleet.metrics import record_gate
from fleet.registry.bundles import reissue
from fleet.rollout import engine as eng
from shared.bundle.keyring import Keyring, load_keyring
from shared.errors import EdgefleetError
from shared.telemetry import messages, topics
from shared.timeutil import format_ts, parse_ts

log = logging.getLogger(__name__)

Notice = tuple[str, int]  # (device_id, generation)

# A gate's result is stored (GateEvaluation) when its status changes, when the stage
# decides anything but "wait", and otherwise at most this often.
GATE_RECORD_INTERVAL_S = 30.0
# The latency gate compares with previous-release windows from this long before a device
# was told to update.
LATENCY_BASELINE_S = 3600.0
GATE_HISTORY_LIMIT = 500


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


class RolloutController:
    def __init__(
        self,
        engine: Engine,
        *,
        keys_dir: Path | None = None,
        publisher: Publisher | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.keys_dir = keys_dir
        self.publisher = publisher
        self.interval_s = interval_s
        self._keyring: Keyring | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one tick or operation at a time in this process

    # -- plumbing ------------------------------------------------------------------
    def keyring(self) -> Keyring:
        if self._keyring is None:
            if self.keys_dir is None:
                raise EdgefleetError("no signing keys configured (keys_dir); cannot re-issue a release")
            self._keyring = load_keyring(self.keys_dir)
        return self._keyring

    def notify(self, notices: Sequence[Notice]) -> None:
        if self.publisher is None:
            return
        for device_id, generation in notices:
            payload = messages.encode(
                messages.DesiredNotice(v=messages.VERSION, generation=generation, ts=time.time())
            )
            try:
                self.publisher.publish(topics.topic(device_id, "desired"), payload, qos=1, retain=True)
            except Exception:
                log.exception("publishing the desired notice of %s failed", device_id)

    def _locked_rollout(self, session: Session, rollout_id: int) -> Rollout:
        stmt = select(Rollout).where(Rollout.id == rollout_id).with_for_update()
        rollout = session.exec(stmt).first()
        if rollout is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist", rollout_id=rollout_id)
        return rollout

    # -- membership ------------------------------------------------------------------
    def _assign_members(self, session: Session, rollout: Rollout, spec: eng.RolloutSpec) -> dict[str, int]:
        devices = [(d.id, d.labels) for d in session.exec(select(Device))]
        stages = eng.assign_stages(rollout.id or 0, spec, devices)
        for old in session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)):
            session.delete(old)
        session.flush()
        for device_id, stage in stages.items():
            session.add(RolloutDevice(rollout_id=rollout.id or 0, device_id=device_id, stage=stage))
        return stages

    def _check_conflicts(self, session: Session, rollout: Rollout, device_ids: Sequence[str]) -> None:
        if not device_ids:
            return
        stmt = (
            select(RolloutDevice.device_id, Rollout.id, Rollout.name, Rollout.state)
            .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
            .where(col(Rollout.state).in_([s.value for s in eng.ACTIVE_STATES]))
            .where(Rollout.id != rollout.id)
            .where(col(RolloutDevice.device_id).in_(list(device_ids)))
        )
        clash = session.exec(stmt).all()
        if clash:
            by_rollout: dict[int, list[str]] = {}
            for device_id, rid, _name, _state in clash:
                by_rollout.setdefault(rid, []).append(device_id)
            rid, ids = next(iter(by_rollout.items()))
            raise ConflictError(
                f"{len(clash)} of the rollout's devices are already in another active rollout: "
                f"rollout {rid} holds {', '.join(sorted(ids)[:5])}"
                + ("…" if len(ids) > 5 else "")
                + "; finish, abort or roll back that rollout first",
                rollouts=sorted(by_rollout),
            )

    # -- operations (API) ----------------------------------------------------------
    def create(self, data: Any) -> int:
        spec = eng.parse_spec(data)
        with self._lock, session_scope(self.engine) as session:
            bundle = session.get(Bundle, spec.bundle_id)
            if bundle is None:
                raise NotFoundError(
                    f"bundle {spec.bundle_id} does not exist; upload it first", bundle_id=spec.bundle_id
                )
            rollout = Rollout(
                name=spec.name,
                model=bundle.name,
                bundle_id=spec.bundle_id,
                spec=eng.spec_to_json(spec),
                state=eng.RolloutState.CREATED.value,
            )
            session.add(rollout)
            session.flush()
            stages = self._assign_members(session, rollout, spec)
            self._check_conflicts(session, rollout, list(stages))
            counts = [sum(1 for s in stages.values() if s == i) for i in range(len(spec.stages))]
            record(
                session,
                rollout,
                "created",
                f"created: {bundle.name} r{bundle.release} to {len(stages)} devices "
                + ", ".join(f"{st.name} +{n}" for st, n in zip(spec.stages, counts, strict=True)),
                devices=len(stages),
            )
            assert rollout.id is not None
            return rollout.id

    def start(self, rollout_id: int, now: datetime | None = None) -> None:
        now = now or now_utc()
        notices: list[Notice] = []
        with self._lock, session_scope(self.engine) as session:
            rollout = self._locked_rollout(session, rollout_id)
            new_state = eng.transition(rollout.state, "start")
            spec = load_spec(rollout)
            stages = self._assign_members(session, rollout, spec)
            session.flush()
            self._check_conflicts(session, rollout, list(stages))
            for rd in session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)):
                current = session.get(Assignment, (rd.device_id, rollout.model))
                rd.previous_bundle_id = current.bundle_id if current else None
                session.add(rd)
            rollout.state = new_state.value
            rollout.current_stage = 0
            rollout.started_at = rollout.stage_started_at = now
            rollout.updated = now
            bundle = session.get(Bundle, rollout.bundle_id)
            assert bundle is not None
            record(
                session,
                rollout,
                "started",
                f"started: {bundle.name} r{bundle.release} to {len(stages)} devices",
            )
            notices += self._enter_stage(session, rollout, spec, 0, now=now)
        self.notify(notices)

    def pause(self, rollout_id: int, reason: str = "paused by operator") -> None:
        notices: list[Notice] = []
        with self._lock, session_scope(self.engine) as session:
            rollout = self._locked_rollout(session, rollout_id)
            rollout.state = eng.transition(rollout.state, "pause").value
            rollout.reason = reason
            rollout.updated = now_utc()
            record(session, rollout, "paused", reason)
            notices += end_shadow(session, rollout)
        self.notify(notices)

    def resume(self, rollout_id: int, now: datetime | None = None) -> None:
        now = now or now_utc()
        with self._lock, session_scope(self.engine) as session:
            rollout = self._locked_rollout(session, rollout_id)
            rollout.state = eng.transition(rollout.state, "resume").value
            # The stage starts over: its bake time and health windows count from now.
            rollout.stage_started_at = now
            rollout.reason = None
            rollout.last_evaluation = None
            rollout.extensions = 0
            rollout.awaiting_approval_since = None
            rollout.approved_stage = None
            rollout.updated = now
            spec = load_spec(rollout)
            record(
                session,
                rollout,
                "resumed",
                f"resumed at stage {spec.stages[rollout.current_stage].name}; its bake time restarts",
            )

    def approve(self, rollout_id: int, now: datetime | None = None) -> None:
        """Let a stage that passed and waits for approval go on (then evaluate at once)."""
        now = now or now_utc()
        notices: list[Notice] = []
        with self._lock, session_scope(self.engine) as session:
            rollout = self._locked_rollout(session, rollout_id)
            eng.transition(rollout.state, "approve")
            spec = load_spec(rollout)
            stage = spec.stages[rollout.current_stage]
            if not stage.approval:
                raise ConflictError(
                    f'stage {stage.name} does not ask for approval (its spec has no "approval": true)',
                    stage=stage.name,
                )
            if rollout.awaiting_approval_since is None:
                raise ConflictError(
                    f"stage {stage.name} is not waiting for approval yet: "
                    f"{rollout.last_evaluation or 'not evaluated yet'}",
                    stage=stage.name,
                )
            rollout.approved_stage = rollout.current_stage
            record(session, rollout, "approved", f"stage {stage.name} approved by operator", stage=stage.name)
            # evaluate at once, never at a time before the rollout's last evaluation
            last = as_utc(rollout.updated)
            now = max(now, last) if last is not None else now
            self._step(session, rollout, now, notices)
        self.notify(notices)

    def abort(self, rollout_id: int) -> None:
        notices: list[Notice] = []
        with self._lock, session_scope(self.engine) as session:
            rollout = self._locked_rollout(session, rollout_id)
            rollout.state = eng.transition(rollout.state, "abort").value
            rollout.reason = "aborted by operator; devices keep what they were assigned"
            rollout.updated = now_utc()
            record(session, rollout, "aborted", rollout.reason)
            notices += end_shadow(session, rollout)
        self.notify(notices)

    def rollback(self, rollout_id: int, reason: str = "rollback requested by operator") -> None:
        notices: list[Notice] = []
        with self._lock, session_scope(self.engine) as session:
            rollout = self._locked_rollout(session, rollout_id)
            eng.transition(rollout.state, "rollback")
            notices += self._roll_back(session, rollout, reason)
        self.notify(notices)

    # -- the loop ------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> dict[int, eng.Decision]:
        """Evaluate every running rollout once and apply the decisions."""
        now = now or now_utc()
        with Session(self.engine) as session:
            ids = list(
                session.exec(select(Rollout.id).where(Rollout.state == eng.RolloutState.RUNNING.value))
            )
        decisions: dict[int, eng.Decision] = {}
        for rollout_id in ids:
            assert rollout_id is not None
            notices: list[Notice] = []
            try:
                with self._lock, session_scope(self.engine) as session:
                    stmt = (
                        select(Rollout)
                        .where(Rollout.id == rollout_id, Rollout.state == eng.RolloutState.RUNNING.value)
                        .with_for_update(skip_locked=True)
                    )
                    rollout = session.exec(stmt).first()
                    if rollout is None:
                        continue
                    decision = self._step(session, rollout, now, notices)
                    decisions[rollout_id] = decision
            except Exception:
                log.exception("rollout %s: evaluation failed; will retry", rollout_id)
                continue
            self.notify(notices)
        return decisions

    def _join_new_devices(self, session: Session, rollout: Rollout, spec: eng.RolloutSpec) -> None:
        """Devices that enrolled (or matched) after the start join the stage their hash places
        them in; they are assigned when that stage is current or reached. A device in another
        active rollout is left alone."""
        known = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
        fresh = session.exec(select(Device).where(col(Device.id).not_in(known))).all()
        stages = eng.assign_stages(rollout.id or 0, spec, [(d.id, d.labels) for d in fresh])
        if not stages:
            return
        busy = set(
            session.exec(
                select(RolloutDevice.device_id)
                .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
                .where(col(Rollout.state).in_([s.value for s in eng.ACTIVE_STATES]))
                .where(Rollout.id != rollout.id)
                .where(col(RolloutDevice.device_id).in_(list(stages)))
            )
        )
        joined = {d: st for d, st in stages.items() if d not in busy}
        for device_id, stage in sorted(joined.items()):
            current = session.get(Assignment, (device_id, rollout.model))
            session.add(
                RolloutDevice(
                    rollout_id=rollout.id or 0,
                    device_id=device_id,
                    stage=stage,
                    previous_bundle_id=current.bundle_id if current else None,
                )
            )
        if joined:
            session.flush()
            record(
                session,
                rollout,
                "devices_joined",
                f"{len(joined)} devices joined after the start: "
                + ", ".join(f"{d} (stage {spec.stages[st].name})" for d, st in sorted(joined.items())[:10])
                + ("…" if len(joined) > 10 else ""),
                devices=joined,
            )

    def _inputs(
        self, session: Session, rollout: Rollout, spec: eng.RolloutSpec, bundle: Bundle, now: datetime
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
            entry = (d.models.get(rollout.model) or {}) if d else {}
            states.append(
                eng.DeviceState(
                    m.device_id,
                    m.stage,
                    release=entry.get("release"),
                    state=entry.get("state"),
                    waiting=entry.get("waiting"),
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
            health = [
                eng.HealthWindow(h.device_id, h.release, h.inferences, h.errors, h.p95_ms, h.drift)
                for h in session.exec(
                    select(HealthReport).where(
                        col(HealthReport.device_id).in_(ids),
                        HealthReport.model == rollout.model,
                        HealthReport.release == target,
                        col(HealthReport.received_at) >= stage_started,
                    )
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
                baseline = self._baseline(session, rollout, [m for m in members if m.stage <= stage_index])
        shadow: list[eng.ShadowFigures] = []
        if spec.stages[stage_index].mode == "shadow":
            shadow = shadow_figures(devices.values(), rollout.model, target, stage_started.timestamp())
        return members, {
            "devices": states, "health": health, "events": events, "baseline": baseline, "shadow": shadow,
        }

    def _baseline(
        self, session: Session, rollout: Rollout, members: Sequence[RolloutDevice]
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

    def _step(self, session: Session, rollout: Rollout, now: datetime, notices: list[Notice]) -> eng.Decision:
        spec = load_spec(rollout)
        bundle = session.get(Bundle, rollout.bundle_id)
        assert bundle is not None
        stage_index = rollout.current_stage
        self._join_new_devices(session, rollout, spec)
        # Assign any member of the current stages still pending (joined late, or a crash mid-stage).
        notices += self._enter_stage(session, rollout, spec, stage_index, record_start=False, now=now)
        members, inputs = self._inputs(session, rollout, spec, bundle, now)
        stage_started = as_utc(rollout.stage_started_at) or now
        decision = eng.evaluate_stage(
            spec,
            stage_index,
            bundle.release,
            inputs["devices"],
            inputs["health"],
            inputs["events"],
            baseline=inputs["baseline"],
            now=now.timestamp(),
            stage_started_at=stage_started.timestamp(),
            extensions=rollout.extensions,
            approved=rollout.approved_stage == stage_index,
            shadow=inputs["shadow"],
        )
        self._store_progress(session, members, decision)
        self._store_gates(session, rollout, spec, decision, now)
        rollout.updated = now
        stage = spec.stages[stage_index]
        verdict = decision.verdict
        if verdict is not eng.Verdict.AWAIT_APPROVAL:
            rollout.awaiting_approval_since = None
        if verdict is eng.Verdict.WAIT:
            if decision.message != rollout.last_evaluation:
                record(session, rollout, "evaluation", decision.message, **decision.to_json())
                rollout.last_evaluation = decision.message
        elif verdict is eng.Verdict.AWAIT_APPROVAL:
            if rollout.awaiting_approval_since is None:
                rollout.awaiting_approval_since = now
                record(session, rollout, "awaiting_approval", decision.message, **decision.to_json())
            rollout.last_evaluation = decision.message
        elif verdict is eng.Verdict.EXTEND:
            rollout.extensions += 1
            rollout.last_evaluation = decision.message
            record(session, rollout, "extended", decision.message, **decision.to_json())
        elif verdict is eng.Verdict.INCONCLUSIVE:
            rollout.state = eng.transition(rollout.state, "gate_pause").value
            notices += end_shadow(session, rollout)
            rollout.reason = decision.message
            rollout.last_evaluation = decision.message
            record(session, rollout, "inconclusive", decision.message, **decision.to_json())
            record(session, rollout, "paused", f"paused: {decision.message}")
        elif verdict is eng.Verdict.ADVANCE:
            record(session, rollout, "stage_passed", decision.message, **decision.to_json())
            rollout.current_stage = stage_index + 1
            rollout.stage_started_at = now
            rollout.last_evaluation = None
            rollout.extensions = 0
            rollout.gate_results = None
            notices += self._enter_stage(session, rollout, spec, stage_index + 1, now=now)
        elif verdict is eng.Verdict.COMPLETE:
            record(session, rollout, "stage_passed", decision.message, **decision.to_json())
            rollout.state = eng.transition(rollout.state, "succeed").value
            rollout.reason = None
            rollout.last_evaluation = decision.message
            record(
                session,
                rollout,
                "succeeded",
                f"succeeded: {len(members)} devices run {bundle.name} r{bundle.release}",
            )
        else:
            record(session, rollout, "gate_failed", decision.message, **decision.to_json())
            reason = f"{decision.message} at {now.astimezone(UTC):%H:%M:%S} UTC (gate {decision.gate})"
            rollout.last_evaluation = decision.message
            if spec.on_gate_failure == "pause":
                rollout.state = eng.transition(rollout.state, "gate_pause").value
                notices += end_shadow(session, rollout)
                rollout.reason = reason
                record(session, rollout, "paused", f"paused: {reason}")
            else:
                notices += self._roll_back(session, rollout, reason, stage=stage.name)
        session.add(rollout)
        return decision

    def _store_progress(
        self, session: Session, members: Sequence[RolloutDevice], decision: eng.Decision
    ) -> None:
        by_id = {p.device_id: p for p in decision.devices}
        for m in members:
            p = by_id.get(m.device_id)
            if p is None or m.status not in ("assigned", "shadow"):
                continue
            if (m.progress, m.reason, m.detail) != (p.progress.value, p.reason, p.detail):
                m.progress, m.reason, m.detail = p.progress.value, p.reason, p.detail
                session.add(m)

    def _store_gates(
        self, session: Session, rollout: Rollout, spec: eng.RolloutSpec, decision: eng.Decision, now: datetime
    ) -> None:
        """Keep the latest result of each gate on the rollout; store evaluations that matter."""
        stage_index = rollout.current_stage
        stage_name = spec.stages[stage_index].name
        previous = {
            g.get("gate"): g
            for g in (rollout.gate_results or [])
            if isinstance(g, dict) and g.get("stage") == stage_index
        }
        decided = decision.verdict is not eng.Verdict.WAIT
        out = []
        for r in decision.gates:
            record_gate(r.gate, r.status.value)
            prev = previous.get(r.gate) or {}
            last = _parse(prev.get("recorded_at"))
            due = (
                decided
                or prev.get("status") != r.status.value
                or last is None
                or (now - last).total_seconds() >= GATE_RECORD_INTERVAL_S
            )
            if due:
                session.add(
                    GateEvaluation(
                        rollout_id=rollout.id or 0,
                        stage=stage_index,
                        stage_name=stage_name,
                        gate=r.gate,
                        status=r.status.value,
                        observed=r.observed,
                        threshold=r.threshold,
                        sample=r.sample,
                        min_sample=r.min_sample,
                        unit=r.unit,
                        verdict=decision.verdict.value,
                        message=r.message,
                        figures=r.figures,
                        ts=now,
                    )
                )
                last = now
            out.append(
                {
                    **r.to_json(),
                    "stage": stage_index,
                    "stage_name": stage_name,
                    "ts": _fmt(now),
                    "recorded_at": _fmt(last),
                }
            )
        rollout.gate_results = out

    def _enter_stage(
        self,
        session: Session,
        rollout: Rollout,
        spec: eng.RolloutSpec,
        stage_index: int,
        *,
        record_start: bool = True,
        now: datetime | None = None,
    ) -> list[Notice]:
        """Point the pending devices of stages <= stage_index at the target bundle; in a shadow
        stage, give it to them as a shadow candidate instead (status ``shadow``)."""
        now = now or now_utc()
        shadowing = spec.stages[stage_index].mode == "shadow"
        pending = session.exec(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout.id,
                RolloutDevice.stage <= stage_index,
                col(RolloutDevice.status).in_(["pending"] if shadowing else ["pending", "shadow"]),
            )
        ).all()
        notices: list[Notice] = []
        for rd in pending:
            if shadowing:
                notice = bump_generation(session, rd.device_id)
                rd.status = "shadow"
            else:
                notice = set_assignment(session, rd.device_id, rollout.model, rollout.bundle_id, rollout.id)
                rd.status = "assigned"
            if notice:
                notices.append(notice)
            rd.assigned_at = now
            rd.progress = eng.Progress.ASSIGNED.value
            session.add(rd)
        if record_start:
            stage = spec.stages[stage_index]
            total = session.exec(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id == rollout.id, RolloutDevice.stage <= stage_index
                )
            ).all()
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
                f"stage {stage.name} started: {len(pending)} new devices, {len(total)} in all; "
                f"bake {stage.bake_seconds:g} s{shadow_note}",
                stage=stage.name,
                new_devices=sorted(rd.device_id for rd in pending),
            )
        return notices

    def _roll_back(
        self, session: Session, rollout: Rollout, reason: str, *, stage: str | None = None
    ) -> list[Notice]:
        """Re-issue each device's previous release as a new, higher release and point it there.
        Devices in shadow never switched: they only stop shadowing."""
        shadow_notices = end_shadow(session, rollout)
        session.flush()
        members = session.exec(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout.id, RolloutDevice.status == "assigned"
            )
        ).all()
        keyring: Keyring | None = None
        if any(rd.previous_bundle_id is not None for rd in members):
            try:
                keyring = self.keyring()
            except EdgefleetError as exc:
                rollout.state = eng.RolloutState.PAUSED.value
                rollout.reason = f"{reason}; cannot roll back automatically: {exc}"
                record(session, rollout, "paused", f"paused: {rollout.reason}")
                return shadow_notices
        reissued: dict[int, Bundle] = {}
        notices: list[Notice] = list(shadow_notices)
        removed: list[str] = []
        for rd in members:
            if rd.previous_bundle_id is None:
                notice = set_assignment(session, rd.device_id, rollout.model, None, None)
                rd.status = "removed"
                removed.append(rd.device_id)
            else:
                if rd.previous_bundle_id not in reissued:
                    previous = session.get(Bundle, rd.previous_bundle_id)
                    if previous is None:
                        continue
                    assert keyring is not None
                    new = reissue(session, previous, keyring)
                    reissued[rd.previous_bundle_id] = new
                    record(
                        session,
                        rollout,
                        "reissued",
                        f"re-issued {previous.name} r{previous.release} as r{new.release} "
                        f"(bundle {new.id}) so devices accept it as newer",
                        from_bundle=previous.id,
                        from_release=previous.release,
                        bundle_id=new.id,
                        release=new.release,
                    )
                notice = set_assignment(
                    session, rd.device_id, rollout.model, reissued[rd.previous_bundle_id].id, rollout.id
                )
                rd.status = "rolled_back"
            session.add(rd)
            if notice:
                notices.append(notice)
        rollout.state = eng.RolloutState.ROLLED_BACK.value
        rollout.reason = reason
        rollout.updated = now_utc()
        summary = ", ".join(f"r{b.release}" for b in reissued.values()) or "no re-issue needed"
        shadowed = (
            f"; {len(shadow_notices)} devices stopped shadowing, none switched" if shadow_notices else ""
        )
        record(
            session,
            rollout,
            "rolled_back",
            f"rolled back: {len(members)} devices pointed back ({summary}"
            + (f"; {len(removed)} devices had no previous release and were unassigned" if removed else "")
            + f"{shadowed}); reason: {reason}",
            reissued={str(k): v.id for k, v in reissued.items()},
            removed=removed,
            stage=stage,
        )
        return notices

    # -- thread ----------------------------------------------------------------------
    def start_loop(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def stop_loop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("controller tick failed")


def shadow_figures(
    devices: Iterable[Device], model: str, release: int, since: float
) -> list[eng.ShadowFigures]:
    """Each device's latest shadow report of ``release`` (the ingester keeps it in
    ``Device.models[model]["shadow"]``) received since ``since``."""
    out = []
    for d in devices:
        sh = (d.models.get(model) or {}).get("shadow")
        if not isinstance(sh, dict) or sh.get("release") != release:
            continue
        if float(sh.get("received_at") or 0.0) < since:
            continue
        try:
            out.append(
                eng.ShadowFigures(
                    d.id,
                    int(sh["release"]),
                    samples=int(sh.get("samples") or 0),
                    agreed=int(sh.get("agreed") or 0),
                    errors=int(sh.get("errors") or 0),
                    dropped=int(sh.get("dropped_queue") or 0) + int(sh.get("dropped_budget") or 0),
                    max_abs_error=sh.get("max_abs_error"),
                    cosine_min=sh.get("cosine_min"),
                    candidate_p95_ms=sh.get("candidate_p95_ms"),
                    current_p95_ms=sh.get("current_p95_ms"),
                    metric=str(sh.get("metric") or "argmax"),
                )
            )
        except (KeyError, TypeError, ValueError):
            log.warning("device %s: unreadable shadow figures %r", d.id, sh)
    return out


# -- read side -------------------------------------------------------------------------


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
        "ts": _fmt(g.ts),
    }


def rollout_status(session: Session, rollout: Rollout, *, events: bool = True) -> dict[str, Any]:
    spec = load_spec(rollout)
    bundle = session.get(Bundle, rollout.bundle_id)
    members = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all()
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
        stage_members = [m for m in members if m.stage <= i]
        stages.append(
            {
                "name": st.name,
                "index": i,
                "state": _stage_state(rollout, i),
                "devices": sorted(m.device_id for m in members if m.stage == i),
                "percent": st.percent,
                "selector": st.selector,
                "min_devices": st.min_devices,
                "bake_seconds": st.bake_seconds,
                "approval": st.approval,
                "mode": st.mode,
                "committed": sum(1 for m in stage_members if m.progress == eng.Progress.COMMITTED.value),
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
    for m in members:
        progress_counts[m.progress] = progress_counts.get(m.progress, 0) + 1
    out: dict[str, Any] = {
        "id": rollout.id,
        "name": rollout.name,
        "model": rollout.model,
        "bundle_id": rollout.bundle_id,
        "release": bundle.release if bundle else None,
        "state": rollout.state,
        "current_stage": rollout.current_stage,
        "current_stage_name": spec.stages[rollout.current_stage].name,
        "stage_started_at": _fmt(rollout.stage_started_at),
        "reason": rollout.reason,
        "last_evaluation": rollout.last_evaluation,
        "awaiting_approval": rollout.awaiting_approval_since is not None
        and rollout.state == eng.RolloutState.RUNNING.value,
        "awaiting_approval_since": _fmt(rollout.awaiting_approval_since),
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
                "assigned_at": _fmt(m.assigned_at),
                "online": device_rows[m.device_id].online if m.device_id in device_rows else None,
                "last_seen": _fmt(device_rows[m.device_id].last_seen) if m.device_id in device_rows else None,
                "previous_bundle_id": m.previous_bundle_id,
                "shadow": (device_rows[m.device_id].models.get(rollout.model) or {}).get("shadow")
                if m.device_id in device_rows
                else None,
            }
            for m in sorted(members, key=lambda m: (m.stage, m.device_id))
        ],
        "spec": rollout.spec,
        "created": _fmt(rollout.created),
        "updated": _fmt(rollout.updated),
    }
    if events:
        rows = session.exec(
            select(RolloutEvent).where(RolloutEvent.rollout_id == rollout.id).order_by(col(RolloutEvent.id))
        ).all()
        out["events"] = [
            {"ts": _fmt(e.ts), "kind": e.kind, "message": e.message, "data": e.data} for e in rows
        ]
        out["gate_history"] = history
    return out


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_ts(value)
    except EdgefleetError:
        return None


def _fmt(ts: datetime | None) -> str | None:
    ts = as_utc(ts)
    return format_ts(ts.astimezone(UTC)) if ts else None

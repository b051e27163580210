"""The rollout controller: loads rollouts from the database, asks the pure engine what to
do, and applies the decision (assignments, desired-state notices, history, rollback).

Everything it knows is in the database (rollout, per-device progress, extensions,
approval, gate results), so a restarted fleet resumes where it was.
Each rollout is handled in its own transaction; on PostgreSQL the rollout row is
locked (FOR UPDATE SKIP LOCKED) so several fleet processes never act on one rollout
at once. Desired-state notices are published only after the transaction committed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet.broker.client import Publisher
from fleet.db.engine import session_scope
from fleet.db.models import (
    Bundle,
    GateEvaluation,
    Rollout,
    RolloutDevice,
    as_utc,
    now_utc,
    table_of,
)
from fleet.errors import ConflictError, NotFoundError
from fleet.metrics import record_gate
from fleet.registry.bundles import reissue as reissue_bundle
from fleet.rollout import actions as act
from fleet.rollout import engine as eng
from fleet.rollout.assignments import (
    Notice,
    assign_set,
    end_shadow,
    load_spec,
    record,
)
from fleet.rollout.inputs import Member, collector_paused, gate_inputs
from fleet.rollout.membership import (
    LISTED_DEVICES,
    assign_members,
    check_conflicts,
    enter_stage,
    expire_members,
    join_new_devices,
    member_ids,
)
from fleet.rollout.releases import (
    accepted_releases,
    latest_failures,
    newer_accepted,
    refuse_lower_release,
)
from fleet.rollout.stalls import judge_stall, with_refusal_texts
from fleet.rollout.status import format_time, parse_time
from shared.bundle.keyring import Keyring, load_keyring
from shared.errors import EdgefleetError
from shared.telemetry import messages, topics

log = logging.getLogger(__name__)

# A gate's result is stored (GateEvaluation) when its status changes, when the stage
# decides anything but "wait", and otherwise at most this often.
GATE_RECORD_INTERVAL_S = 30.0


def set_state(rollout: Rollout, op: str, reason: str | None) -> None:
    """The one place a rollout's state changes: by an operation of the transition table
    (TransitionError when its state does not allow it), with the reason it shows."""
    rollout.state = eng.transition(rollout.state, op).value
    rollout.reason = reason


class RolloutController:
    def __init__(
        self,
        db: Engine,
        *,
        keys_dir: Path | None = None,
        publisher: Publisher | None = None,
        interval_s: float = 1.0,
        silence_floor: tuple[float, float] | None = None,
    ) -> None:
        # the database (SQLAlchemy's Engine); ``eng`` is the rollout engine, the pure decisions
        self.db = db
        # (ingester session expiry, device health interval) when ingesters share a subscription:
        # a spec's silent_after_s must cover both (engine.check_silence_floor)
        self.silence_floor = silence_floor
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

    # -- releases --------------------------------------------------------------------
    def _check_releases(
        self, session: Session, rollout: Rollout, bundle: Bundle, devices: int, *, reissue: bool
    ) -> Bundle:
        """The bundle to roll out: ``bundle`` when its release is above what every device
        accepted; with ``reissue``, its content re-signed as a new, higher release; else
        ReleaseNotAboveDevicesError naming the devices (before anything is assigned)."""
        accepted = accepted_releases(session, bundle.name, member_ids(rollout))
        refusing = newer_accepted(bundle.release, accepted)
        if not refusing:
            return bundle
        if not reissue:
            raise refuse_lower_release(bundle.name, bundle.release, bundle.version, refusing,
                                       devices=devices)
        new = reissue_bundle(session, bundle, self.keyring())
        still = newer_accepted(new.release, accepted)
        if still:
            raise refuse_lower_release(new.name, new.release, new.version, still, devices=devices)
        record(
            session,
            rollout,
            "reissued",
            f"re-issued {bundle.name} r{bundle.release} ({bundle.version}) as r{new.release} (bundle "
            f"{new.id}): {len(refusing)} devices had accepted up to "
            f"r{max(a.release for a in refusing.values())}",
            from_bundle=bundle.id,
            from_release=bundle.release,
            bundle_id=new.id,
            release=new.release,
            devices=sorted(refusing),
        )
        rollout.bundle_id = new.id or 0
        session.add(rollout)
        return new

    # -- operations (API) ----------------------------------------------------------
    def create(self, data: Any) -> int:
        """Create a rollout from a spec; ``"reissue": true`` beside the spec re-signs the bundle
        as a new, higher release when some target devices have accepted a release above it."""
        reissue = False
        if isinstance(data, dict) and "reissue" in data:
            data = dict(data)
            reissue = data.pop("reissue")
            if not isinstance(reissue, bool):
                raise eng.SpecError("reissue", f"{reissue!r} must be true or false")
        spec = eng.parse_spec(data)
        if self.silence_floor is not None:
            expiry, interval = self.silence_floor
            eng.check_silence_floor(spec, session_expiry_s=expiry, health_interval_s=interval)
        with self._lock, session_scope(self.db) as session:
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
            stages = assign_members(session, rollout, spec)
            check_conflicts(session, rollout)
            bundle = self._check_releases(session, rollout, bundle, len(stages), reissue=reissue)
            counts = [sum(1 for s in stages.values() if s == i) for i in range(len(spec.stages))]
            record(
                session,
                rollout,
                "created",
                f"created: {bundle.name} r{bundle.release} ({bundle.version}) to {len(stages)} devices "
                + ", ".join(f"{st.name} +{n}" for st, n in zip(spec.stages, counts, strict=True)),
                devices=len(stages),
            )
            assert rollout.id is not None
            return rollout.id

    def start(self, rollout_id: int, now: datetime | None = None) -> None:
        now = now or now_utc()
        notices: list[Notice] = []
        with self._lock, session_scope(self.db) as session:
            rollout = self._locked_rollout(session, rollout_id)
            eng.transition(rollout.state, "start")  # refuse before any work
            spec = load_spec(rollout)
            # each member remembers the bundle it is assigned now (what a rollback returns it to)
            stages = assign_members(session, rollout, spec, previous=True)
            check_conflicts(session, rollout)
            target = session.get(Bundle, rollout.bundle_id)
            assert target is not None
            self._check_releases(session, rollout, target, len(stages), reissue=False)
            set_state(rollout, "start", None)
            rollout.current_stage = 0
            rollout.started_at = rollout.stage_started_at = now
            rollout.updated = now
            bundle = session.get(Bundle, rollout.bundle_id)
            assert bundle is not None
            record(
                session,
                rollout,
                "started",
                f"started: {bundle.name} r{bundle.release} ({bundle.version}) to {len(stages)} devices",
            )
            notices += enter_stage(session, rollout, spec, 0, now=now)
        self.notify(notices)

    def pause(self, rollout_id: int, reason: str = "paused by operator") -> None:
        notices: list[Notice] = []
        with self._lock, session_scope(self.db) as session:
            rollout = self._locked_rollout(session, rollout_id)
            set_state(rollout, "pause", reason)
            rollout.updated = now_utc()
            record(session, rollout, "paused", reason)
            notices += end_shadow(session, rollout)
        self.notify(notices)

    def resume(self, rollout_id: int, now: datetime | None = None) -> None:
        now = now or now_utc()
        with self._lock, session_scope(self.db) as session:
            rollout = self._locked_rollout(session, rollout_id)
            set_state(rollout, "resume", None)
            # The stage starts over: its bake time and health windows count from now.
            rollout.stage_started_at = now
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
        with self._lock, session_scope(self.db) as session:
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
        with self._lock, session_scope(self.db) as session:
            rollout = self._locked_rollout(session, rollout_id)
            set_state(rollout, "abort", "aborted by operator; devices keep what they were assigned")
            rollout.updated = now_utc()
            record(session, rollout, "aborted", rollout.reason or "aborted")
            notices += end_shadow(session, rollout)
        self.notify(notices)

    def rollback(self, rollout_id: int, reason: str = "rollback requested by operator") -> None:
        notices: list[Notice] = []
        with self._lock, session_scope(self.db) as session:
            rollout = self._locked_rollout(session, rollout_id)
            eng.transition(rollout.state, "rollback")
            notices += self._roll_back(session, rollout, reason)
        self.notify(notices)

    # -- the loop ------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> dict[int, eng.Decision]:
        """Evaluate every running rollout once and apply the decisions."""
        now = now or now_utc()
        with Session(self.db) as session:
            ids = list(
                session.exec(select(Rollout.id).where(Rollout.state == eng.RolloutState.RUNNING.value))
            )
        decisions: dict[int, eng.Decision] = {}
        for rollout_id in ids:
            assert rollout_id is not None
            notices: list[Notice] = []
            try:
                with self._lock, session_scope(self.db) as session:
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

    def _step(self, session: Session, rollout: Rollout, now: datetime, notices: list[Notice]) -> eng.Decision:
        spec = load_spec(rollout)
        bundle = session.get(Bundle, rollout.bundle_id)
        assert bundle is not None
        stage_index = rollout.current_stage
        join_new_devices(session, rollout, spec)
        # Assign any member of the current stages still pending (joined late, or a crash mid-stage).
        notices += enter_stage(session, rollout, spec, stage_index, record_start=False, now=now)
        stage_started = as_utc(rollout.stage_started_at) or now
        with collector_paused():  # a large stage's objects are freed by reference counting
            members, inputs = gate_inputs(session, rollout, spec, bundle, now)
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
        decision = self._judge_stall(session, rollout, spec, bundle, decision, now, stage_started)
        self._store_progress(session, rollout, members, decision)
        self._store_gates(session, rollout, spec, decision, now)
        rollout.updated = now
        actions = act.plan(
            spec, stage_index, decision, now=now,
            last_evaluation=rollout.last_evaluation,
            awaiting_approval=rollout.awaiting_approval_since is not None,
            members=inputs["member_count"],
            target=f"{bundle.name} r{bundle.release} ({bundle.version})",
        )
        for action in actions:
            notices += self._apply(session, rollout, spec, action, now)
        session.add(rollout)
        return decision

    def _apply(
        self, session: Session, rollout: Rollout, spec: eng.RolloutSpec, action: act.Action, now: datetime
    ) -> list[Notice]:
        """Carry out one action of ``actions.plan``; the desired-state notices it gives."""
        match action:
            case act.Record(kind, message, details):
                record(session, rollout, kind, message, **details)
            case act.Note(message):
                rollout.last_evaluation = message
            case act.Transition(op, reason):
                set_state(rollout, op, reason)
            case act.WaitForApproval():
                if rollout.awaiting_approval_since is None:
                    rollout.awaiting_approval_since = now
            case act.StopWaitingForApproval():
                rollout.awaiting_approval_since = None
            case act.Extend():
                rollout.extensions += 1
            case act.EndShadow():
                return end_shadow(session, rollout)
            case act.EnterStage(index):
                rollout.current_stage = index
                rollout.stage_started_at = now
                rollout.last_evaluation = None
                rollout.extensions = 0
                rollout.gate_results = None
                return enter_stage(session, rollout, spec, index, now=now)
            case act.RollBack(reason, stage):
                return self._roll_back(session, rollout, reason, stage=stage)
        return []

    def _judge_stall(
        self,
        session: Session,
        rollout: Rollout,
        spec: eng.RolloutSpec,
        bundle: Bundle,
        decision: eng.Decision,
        now: datetime,
        stage_started: datetime,
    ) -> eng.Decision:
        """Failed devices get their own reason text; a stage that cannot progress fails
        (fleet.rollout.stalls)."""
        failed = [p.device_id for p in decision.devices if p.progress is eng.Progress.FAILED]
        if failed:
            since = as_utc(rollout.started_at)
            texts = latest_failures(session, rollout.model, bundle.release, failed, since)
            devices = with_refusal_texts(decision.devices, texts, f"r{bundle.release} ({bundle.version})")
            decision = dataclasses.replace(decision, devices=devices)
        stalled = judge_stall(
            spec, rollout.current_stage, decision,
            now=now.timestamp(), stage_started_at=stage_started.timestamp(),
        )
        return stalled or decision

    def _store_progress(
        self, session: Session, rollout: Rollout, members: Sequence[Member], decision: eng.Decision
    ) -> None:
        """Each assigned member's progress, written where it changed (one executemany)."""
        by_id = {p.device_id: p for p in decision.devices}
        changed = []
        for m in members:
            p = by_id.get(m.device_id)
            if p is None or m.status not in ("assigned", "shadow"):
                continue
            if (m.progress, m.reason, m.detail) != (p.progress.value, p.reason, p.detail):
                changed.append({"b_rollout": rollout.id, "b_id": m.device_id, "b_progress": p.progress.value,
                                "b_reason": p.reason, "b_detail": p.detail})
        if changed:
            session.flush()
            rd = table_of(RolloutDevice)
            session.execute(
                update(rd)
                .where(rd.c.rollout_id == bindparam("b_rollout"), rd.c.device_id == bindparam("b_id"))
                .values(progress=bindparam("b_progress"), reason=bindparam("b_reason"),
                        detail=bindparam("b_detail")),
                changed,
            )
            expire_members(session)

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
        # Waiting for approval repeats its verdict every tick until the operator acts: stored
        # when the wait begins, then like a wait (on a change, or every GATE_RECORD_INTERVAL_S).
        verdict = decision.verdict
        decided = verdict not in (eng.Verdict.WAIT, eng.Verdict.AWAIT_APPROVAL) or (
            verdict is eng.Verdict.AWAIT_APPROVAL and rollout.awaiting_approval_since is None
        )
        out = []
        for r in decision.gates:
            record_gate(r.gate, r.status.value)
            prev = previous.get(r.gate) or {}
            last = parse_time(prev.get("recorded_at"))
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
                    "ts": format_time(now),
                    "recorded_at": format_time(last),
                }
            )
        rollout.gate_results = out

    def _roll_back(
        self, session: Session, rollout: Rollout, reason: str, *, stage: str | None = None
    ) -> list[Notice]:
        """Re-issue each device's previous release as a new, higher release and point it there
        (set-based: a few statements per previous release, whatever the number of devices).
        Devices in shadow never switched: they only stop shadowing."""
        shadow_notices = end_shadow(session, rollout)
        session.flush()
        rd = table_of(RolloutDevice)
        groups: dict[int | None, int] = {
            r[0]: int(r[1]) for r in session.execute(
                core_select(rd.c.previous_bundle_id, func.count())
                .where(rd.c.rollout_id == rollout.id, rd.c.status == "assigned")
                .group_by(rd.c.previous_bundle_id))
        }
        members = sum(groups.values())
        keyring: Keyring | None = None
        if any(previous is not None for previous in groups):
            try:
                keyring = self.keyring()
            except EdgefleetError as exc:
                if rollout.state != eng.RolloutState.RUNNING.value:
                    # an operator's rollback of a paused or succeeded rollout: nothing changes
                    raise ConflictError(
                        f"cannot roll back rollout {rollout.id}: {exc}; it stays {rollout.state}",
                        state=rollout.state,
                    ) from None
                set_state(rollout, "gate_pause", f"{reason}; cannot roll back automatically: {exc}")
                record(session, rollout, "paused", f"paused: {rollout.reason}")
                return shadow_notices
        reissued: dict[int, Bundle] = {}
        notices: list[Notice] = list(shadow_notices)
        removed: list[str] = []

        def mark(previous: int | None, status: str) -> None:
            prev = rd.c.previous_bundle_id
            cond = prev.is_(None) if previous is None else prev == previous
            session.execute(update(rd).where(rd.c.rollout_id == rollout.id, rd.c.status == "assigned", cond)
                            .values(status=status))

        for previous_id in sorted(groups, key=lambda b: (b is not None, b or 0)):
            group = member_ids(rollout, statuses=["assigned"], previous_bundle_id=previous_id)
            if previous_id is None:
                removed = sorted(session.execute(group).scalars())
                notices += assign_set(session, group, rollout.model, None, None)
                mark(None, "removed")
                continue
            previous = session.get(Bundle, previous_id)
            if previous is None:
                continue
            assert keyring is not None
            new = reissue_bundle(session, previous, keyring)
            reissued[previous_id] = new
            record(
                session,
                rollout,
                "reissued",
                f"re-issued {previous.name} r{previous.release} ({previous.version}) as "
                f"r{new.release} (bundle {new.id}) so devices accept it as newer",
                from_bundle=previous.id,
                from_release=previous.release,
                bundle_id=new.id,
                release=new.release,
            )
            assert new.id is not None
            notices += assign_set(session, group, rollout.model, new.id, rollout.id)
            mark(previous_id, "rolled_back")
        expire_members(session)
        set_state(rollout, "rollback", reason)
        rollout.updated = now_utc()
        summary = ", ".join(f"r{b.release}" for b in reissued.values()) or "no re-issue needed"
        shadowed = (
            f"; {len(shadow_notices)} devices stopped shadowing, none switched" if shadow_notices else ""
        )
        record(
            session,
            rollout,
            "rolled_back",
            f"rolled back: {members} devices pointed back ({summary}"
            + (f"; {len(removed)} devices had no previous release and were unassigned" if removed else "")
            + f"{shadowed}); reason: {reason}",
            reissued={str(k): v.id for k, v in reissued.items()},
            removed=removed[:LISTED_DEVICES],
            removed_count=len(removed),
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

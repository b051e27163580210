"""What the rollout engine needs to decide a step, read from the database: the members'
states, the health windows of the new release and of the previous one (for the latency
gate), install and rollback events, and shadow figures."""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import Text, cast, or_
from sqlalchemy import select as core_select
from sqlmodel import Session, col, func, select

from fleet.db.device_models import ReportedModel, read_model
from fleet.db.models import Bundle, Device, DeviceEvent, Rollout, RolloutDevice, as_utc, table_of
from fleet.rollout import engine as eng
from fleet.rollout.health_reads import DeviceFilter, target_windows, windows_between

log = logging.getLogger(__name__)

# The latency gate compares with previous-release windows from this long before a device
# was told to update.
LATENCY_BASELINE_S = 3600.0
_UNSEEN = object()


class Member(NamedTuple):
    """A member of the rollout as the controller reads it each tick (RolloutDevice's columns)."""

    device_id: str
    stage: int
    status: str
    assigned_at: datetime | None
    previous_bundle_id: int | None
    progress: str
    reason: str | None
    detail: str


class Heard(NamedTuple):
    """What the fleet last heard from a device (Device's columns the gates read): its entry
    for the rollout's model (``Device.models[model]``)."""

    id: str
    entry: ReportedModel
    online: bool
    last_seen: datetime | None


# ``Device.models`` as stored (JSON text) with each model's entry left undecoded: a tick
# decodes only the rollout's model, straight into its type (no dict per device first).
_MODELS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENTRY = msgspec.json.Decoder(ReportedModel)


def model_entry(stored: str | None, model: str) -> ReportedModel:
    """``read_model`` of ``Device.models`` read as JSON text: the same entry, the same
    fallbacks (not a JSON object: no entry; an entry not of the type: empty, logged)."""
    try:
        raw = _MODELS.decode(stored) if stored is not None else None
        entry = raw.get(model) if raw is not None else None
        return _ENTRY.decode(entry) if entry is not None else ReportedModel()
    except (msgspec.DecodeError, msgspec.ValidationError):
        try:
            loaded = json.loads(stored) if stored is not None else None
        except ValueError:
            loaded = None
        return read_model(loaded, model)


def heard_devices(session: Session, model: str, devices: DeviceFilter) -> dict[str, Heard]:
    """What the fleet last heard from ``devices`` about ``model``, by device id."""
    d_t = table_of(Device)
    stmt = core_select(d_t.c.id, cast(d_t.c.models, Text), d_t.c.online, d_t.c.last_seen).where(
        d_t.c.id.in_(devices))
    return {
        device_id: Heard(device_id, model_entry(stored, model), online, last_seen)
        for device_id, stored, online, last_seen in session.execute(stmt)
    }


_paused = 0  # collector_paused blocks under way (the controller's thread, a bench)
_pause_lock = threading.Lock()
_enable_after = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a tick reads and decides, on again after (when
    it was on before the first of nested or concurrent blocks).

    A tick over a stage of 100,000 devices makes about a million objects (rows, states,
    windows, evidence) that live until its decision and are freed by reference counting; the
    collections they trigger walk them and the whole heap again and again (~9 full
    collections a tick, a third of its Python time, measured) and free nothing. The pause is process
    wide: in a process that also serves the API or ingests, their cyclic garbage waits for
    the tick's end (a few seconds); a separate controller process has nothing else."""
    global _paused, _enable_after
    with _pause_lock:
        if _paused == 0:
            _enable_after = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _pause_lock:
            _paused -= 1
            if _paused == 0 and _enable_after:
                gc.enable()


def gate_inputs(
    session: Session, rollout: Rollout, spec: eng.RolloutSpec, bundle: Bundle, now: datetime
) -> tuple[list[Member], dict[str, Any]]:
    """The members of the stages reached and what the engine needs about them, from the
    database (``member_count``: all the rollout's members).

    Health comes from the per-minute buckets (fleet.rollout.health_reads), and every set of
    devices is a subquery, never a list of ids (PostgreSQL takes at most 65,535 parameters)."""
    stage_index = rollout.current_stage
    rd = table_of(RolloutDevice)
    # only the members of the stages reached (the engine ignores the others): a canary stage
    # of a rollout to 100,000 devices reads its few devices, and counts the rest; plain rows,
    # not ORM objects (building those was most of a large stage's tick)
    members = [
        Member(*r) for r in session.execute(
            core_select(*(rd.c[f] for f in Member._fields))
            .where(rd.c.rollout_id == rollout.id, rd.c.stage <= stage_index))
    ]
    member_count = session.exec(
        select(func.count()).select_from(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)
    ).one()
    in_stage = select(RolloutDevice.device_id).where(
        RolloutDevice.rollout_id == rollout.id, RolloutDevice.stage <= stage_index
    )
    staged = members
    devices = heard_devices(session, rollout.model, in_stage) if staged else {}
    # UNIX seconds of each time read (a stage's devices share their assignment time)
    seconds: dict[datetime | None, float | None] = {None: None}

    def ts(value: datetime | None) -> float | None:
        known = seconds.get(value, _UNSEEN)
        if known is _UNSEEN:
            aware = as_utc(value)
            known = seconds[value] = aware.timestamp() if aware else None
        return known  # type: ignore[return-value]

    nothing = ReportedModel()
    states = []
    for m in members:
        d = devices.get(m.device_id)
        entry = d.entry if d else nothing
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
    if staged:
        # The gates take a device's windows up to what it could have served
        # (fleet.rollout.evidence); the devices whose reports must be judged one by one are
        # read from their raw reports (health_reads.target_windows).
        health = target_windows(
            session, rollout.model, target, in_stage, [s for s in states if s.stage <= stage_index],
            since=stage_started, now=now.timestamp(),
            max_device_rate=spec.gates_of(stage_index).max_device_rate,
        )
        events = [
            eng.InstallEvent(e.device_id, e.release, e.kind, e.reason, e.from_release)
            for e in session.exec(
                select(DeviceEvent)
                .where(
                    col(DeviceEvent.device_id).in_(in_stage),
                    DeviceEvent.model == rollout.model,
                    or_(col(DeviceEvent.release) == target, col(DeviceEvent.from_release) == target),
                    col(DeviceEvent.received_at) >= started,
                )
                .order_by(col(DeviceEvent.received_at), col(DeviceEvent.id))
            )
        ]
        if spec.gates_of(stage_index).max_latency_ratio is not None:
            baseline = previous_release_windows(session, rollout, staged)
    shadow: list[eng.ShadowFigures] = []
    if spec.stages[stage_index].mode == "shadow":
        shadow = shadow_figures(devices.values(), rollout.model, target, stage_started.timestamp())
    return members, {
        "devices": states, "health": health, "events": events, "baseline": baseline, "shadow": shadow,
        "member_count": member_count,
    }


def previous_release_windows(
    session: Session, rollout: Rollout, members: Sequence[Member]
) -> list[eng.HealthWindow]:
    """Windows of each device's previous release from the LATENCY_BASELINE_S before it was
    told to update: read per time of assignment (a stage's devices share one), from buckets."""
    previous_ids = {m.previous_bundle_id for m in members if m.previous_bundle_id}
    if not previous_ids:
        return []
    releases = {
        b.id: b.release for b in session.exec(select(Bundle).where(col(Bundle.id).in_(previous_ids)))
    }
    release_of: dict[str, int] = {}
    groups: dict[datetime, set[int]] = {}
    for m in members:
        assigned = as_utc(m.assigned_at)
        release = releases.get(m.previous_bundle_id or 0)
        if m.assigned_at is None or assigned is None or release is None:
            continue
        release_of[m.device_id] = release
        groups.setdefault(assigned, set()).add(release)
    out = []
    for assigned, group_releases in sorted(groups.items()):
        same_time = select(RolloutDevice.device_id).where(
            RolloutDevice.rollout_id == rollout.id,
            RolloutDevice.stage <= rollout.current_stage,
            RolloutDevice.assigned_at == assigned,
        )
        start = assigned - timedelta(seconds=LATENCY_BASELINE_S)
        out += [
            w for w in windows_between(session, rollout.model, group_releases, same_time, start, assigned)
            if release_of.get(w.device_id) == w.release
        ]
    return out


def shadow_figures(
    devices: Iterable[Heard], model: str, release: int, since: float
) -> list[eng.ShadowFigures]:
    """Each device's latest shadow report of ``release`` (the ingester keeps it in
    ``Device.models[model].shadow``; ``devices`` hold that entry) received since ``since``."""
    out = []
    for d in devices:
        sh = d.entry.shadow  # typed: an unreadable entry reads as none
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

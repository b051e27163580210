"""The pure half of ingestion: a decoded batch applied to its devices' state, no I/O.

``apply_batch`` takes the batch's messages in arrival order, the telemetry columns of its
known devices (``DeviceRow``, read by ``fleet.ingest.store``) and their sequence windows
(``ClaimRow``), and returns what the transaction writes: health reports and events as rows
in their tables' column order, the hourly rollup, and each touched device's merged state.
A (device, session, seq) seen before is dropped (``admit``); a message from a device not in
``devices`` (unknown or revoked) is set aside. Messages of one device are applied in their
order in the batch, so the merged state is the one the last message leaves.

Events can be lost between the broker and the ingester (docs/telemetry.md "Recovering missed
events"): every health message repeats each model's latest event (``last_event``); one whose
seq is above the latest applied to that model (``ReportedModel.event_seq``) is stored as the
event would have been (``newer_event`` says what "above" means). An event already applied
(the same seq) is not stored twice, and an older one never moves the serving state back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from fleet.db.device_models import ReportedModel, ReportedShadow, stored_models
from fleet.ingest.claims_store import ClaimRow, Tally
from fleet.ingest.rollup import HourlyRollup
from shared.telemetry import messages
from shared.telemetry.vocabulary import EventKind

# Events that say which release a device now serves (after a local rollback: the one it
# went back to, ``release``; the release it left is ``from_release``).
SERVING_KINDS = frozenset({EventKind.ACTIVATED, EventKind.COMMITTED, EventKind.ROLLED_BACK})
# Float round trips through the database: an event's ts must be later by more than this to
# count as a new install's (``newer_event``).
EVENT_TS_SLACK_S = 0.001
# The device columns telemetry merges: a batch reads them once and writes them once, with
# ``last_health`` (replaced, never merged, so not read) when the batch has a health message.
STATE_FIELDS = ("last_seen", "online", "status_ts", "status_online", "agent_version", "models")
# The columns of the rows ``apply_batch`` adds, in the order of its tuples.
HEALTH_COLUMNS = (
    "device_id",
    "ts",
    "received_at",
    "seq",
    "model",
    "release",
    "inferences",
    "errors",
    "p50_ms",
    "p95_ms",
    "drift",
    "cpu_percent",
    "rss_mb",
)
EVENT_COLUMNS = (
    "device_id",
    "ts",
    "received_at",
    "seq",
    "model",
    "kind",
    "release",
    "from_release",
    "reason",
    "message",
)
EVENT_MESSAGE_MAX = 2000


class Item(NamedTuple):
    """One decoded, validated message of a device, as received."""

    device_id: str
    kind: str
    message: messages.Message
    received_at: datetime


@dataclass(slots=True)
class DeviceRow:
    """The telemetry columns of one device row, merged over a batch in message order."""

    id: str
    last_seen: datetime | None
    online: bool
    status_ts: float | None
    status_online: bool | None
    agent_version: str
    models: dict[str, ReportedModel]
    last_health: messages.Health | None = None  # the batch's latest health message, if any
    touched: bool = False

    def params(self) -> dict[str, Any]:
        """The bind parameters of its row in the batch's UPDATE."""
        out: dict[str, Any] = {
            "b_id": self.id,
            "b_last_seen": self.last_seen,
            "b_online": self.online,
            "b_status_ts": self.status_ts,
            "b_status_online": self.status_online,
            "b_agent_version": self.agent_version,
            "b_models": stored_models(self.models),
        }
        if self.last_health is not None:
            out["b_last_health"] = msgspec.to_builtins(self.last_health)
        return out


@dataclass
class BatchRows:
    """What a batch stores: health reports and events (tuples in ``HEALTH_COLUMNS`` and
    ``EVENT_COLUMNS`` order) and the hourly rollup."""

    health: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    rollup: HourlyRollup = field(default_factory=HourlyRollup)


@dataclass
class AppliedBatch:
    """A batch applied: its rows, how many messages it stored, what it set aside."""

    rows: BatchRows
    written: int = 0
    unknown: list[Item] = field(default_factory=list)  # unknown or revoked devices
    duplicates: list[Item] = field(default_factory=list)


def apply_batch(
    items: list[Item], devices: dict[str, DeviceRow], claims: dict[str, ClaimRow]
) -> AppliedBatch:
    """Apply messages in order to their devices' state (``devices``, ``claims``: changed in
    place) and collect the rows to store."""
    out = AppliedBatch(BatchRows())
    rows = out.rows
    for item in items:
        device = devices.get(item.device_id)
        if device is None:
            out.unknown.append(item)
            continue
        if not admit(claims[item.device_id], item):
            out.duplicates.append(item)
            continue
        apply_item(device, item, rows)
        out.written += 1
    return out


def admit(claim: ClaimRow, item: Item) -> bool:
    """Whether a message is new for its device's sequence window. A status always is (it is state,
    retained and sent again on every subscribe); its seq is only marked seen, so births and wills
    leave no gap in the window (an older agent's status, without a session, may carry seq 0)."""
    msg = item.message
    if isinstance(msg, messages.DesiredNotice):
        return True
    claim.changed = True
    if isinstance(msg, messages.Status):
        if msg.session:
            claim.window.admit(msg.session, msg.seq, msg.ts)
        return True
    if claim.window.admit(msg.session, msg.seq, msg.ts):
        return True
    claim.refuse(duplicate(item))
    return False


def duplicate(item: Item) -> Tally:
    """The refusal of a message seen before, for its device's claim row."""
    tally = Tally()
    msg = item.message
    seen = f"session {getattr(msg, 'session', '')!r} seq {getattr(msg, 'seq', '?')}"
    tally.add("duplicate", f"{item.kind} {seen} seen before", item.received_at)
    return tally


def apply_item(device: DeviceRow, item: Item, rows: BatchRows) -> None:
    """Merge one message into its device's state and add the rows it stores."""
    msg = item.message
    received_at = item.received_at
    device.touched = True
    if device.last_seen is None or aware(device.last_seen) < received_at:
        device.last_seen = received_at
    if isinstance(msg, messages.Health):
        _apply_health(device, item, msg, rows)
    elif isinstance(msg, messages.Status):
        if status_applies(device, msg):
            device.online = msg.online
            device.status_ts, device.status_online = msg.ts, msg.online
        if msg.agent_version:
            device.agent_version = msg.agent_version
    elif isinstance(msg, messages.Event):
        device.online = device.status_online is not False
        entry = device.models.get(msg.model) or ReportedModel()
        if newer_event(entry, msg.seq, msg.ts):
            if msg.kind in SERVING_KINDS:
                entry = msgspec.structs.replace(entry, release=msg.release, state=msg.kind, waiting=None)
            entry = msgspec.structs.replace(entry, event_seq=msg.seq, event_ts=msg.ts)
            device.models = {**device.models, msg.model: entry}
        elif msg.seq == entry.event_seq:
            return  # stored already: a redelivery, or recovered from a health message first
        # else an older event arriving late: stored, but the serving state stays
        rows.events.append(event_row(device.id, received_at, msg.model, msg, msg.message[:EVENT_MESSAGE_MAX]))


def _apply_health(device: DeviceRow, item: Item, msg: messages.Health, rows: BatchRows) -> None:
    device.online = device.status_online is not False
    device.last_health = msg
    if not msg.models:
        return
    received_at = item.received_at
    models = dict(device.models)
    for m in msg.models:
        prev = models.get(m.name)
        ev = m.last_event
        event_seq, event_ts = (prev.event_seq, prev.event_ts) if prev is not None else (None, None)
        if ev is not None and (prev is None or newer_event(prev, ev.seq, ev.ts)):
            # An event that reached the broker but not us: stored as the event would have been.
            # Its serving state is this health's own (read by the agent after the event, so
            # never older).
            rows.events.append(
                event_row(device.id, received_at, m.name, ev, f"recovered from health seq {msg.seq}")
            )
            event_seq, event_ts = ev.seq, ev.ts
        models[m.name] = ReportedModel(
            release=m.release,
            version=m.version,
            state=m.state,
            # update windows and locks: what it waits for, what it keeps
            waiting=m.waiting or None,
            held=list(m.held) if m.held is not None else None,
            # shadow evaluation: the candidate's latest (cumulative) figures, read by the
            # rollout's shadow gates (fleet.rollout.controller)
            shadow=shadow(m, received_at) if m.shadow is not None else None,
            # the latest event applied (kept across health messages)
            event_seq=event_seq,
            event_ts=event_ts,
        )
        rows.health.append(
            (
                device.id,
                msg.ts,
                received_at,
                msg.seq,
                m.name,
                m.release,
                m.inferences,
                m.errors,
                m.latency_p50_ms,
                m.latency_p95_ms,
                drift(m),
                msg.cpu_percent,
                msg.mem_rss_mb,
            )
        )
        rows.rollup.add(
            device.id, m.name, m.release, received_at, msg.ts, m.inferences, m.errors, m.latency_p95_ms
        )
    device.models = models


def status_applies(device: DeviceRow, msg: messages.Status) -> bool:
    """Newest wins (messages.status_supersedes): a birth and the death that closes it are
    applied in their order, not their arrival's. Agents without birth/death numbers (bd_seq
    0: their will is stamped before their birth) are applied as they arrive."""
    if msg.bd_seq == 0 or device.status_ts is None or device.status_online is None:
        return True
    return (msg.ts, not msg.online) >= (device.status_ts, not device.status_online)


def newer_event(entry: ReportedModel, seq: int, ts: float) -> bool:
    """Whether an event (or a health message's ``last_event``) is newer than the latest one
    applied to this model entry (``event_seq``, ``event_ts``). The agent keeps its seq counter
    across restarts and takes seq and ts together, so on one install a higher seq is newer.
    A device whose state directory was wiped counts again from 0: a seq not higher but a ts
    later (by more than EVENT_TS_SLACK_S, float round trips through the database) is such a
    new install's. (Cost: after the device's clock stepped back, a late older event could pass.)"""
    last_seq, last_ts = entry.event_seq, entry.event_ts
    if last_seq is None:
        return True
    if seq > last_seq:
        return True
    return last_ts is not None and ts > last_ts + EVENT_TS_SLACK_S


def event_row(
    device_id: str, received_at: datetime, model: str, ev: messages.Event | messages.LastEvent, message: str
) -> tuple[Any, ...]:
    """The ``DeviceEvent`` row (``EVENT_COLUMNS``) of an event, received as such or recovered
    from a health message."""
    return (
        device_id,
        ev.ts,
        received_at,
        ev.seq,
        model,
        ev.kind,
        ev.release,
        ev.from_release,
        ev.reason,
        message,
    )


def drift(m: messages.ModelHealth) -> float | None:
    """The model's drift score when the agent sends one (optional field, newer agents)."""
    value = m.drift
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def shadow(m: messages.ModelHealth, received_at: datetime) -> ReportedShadow | None:
    """The candidate's figures and when they came, when the agent evaluates one."""
    if m.shadow is None:
        return None
    return ReportedShadow(**msgspec.structs.asdict(m.shadow), received_at=received_at.timestamp())


def aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts

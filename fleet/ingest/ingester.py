"""MQTT telemetry into the database.

The paho network thread only checks the device's budget (``fleet.ingest.budget``), parses
and validates (``shared.telemetry``), bounds every figure (``fleet.ingest.claims``) and puts
valid messages on a bounded queue; a writer thread drains it in batches, one
transaction per batch, which also adds each health window to its hourly rollup
(``fleet.ingest.rollup``) and drops a (device, session, seq) seen before (``claims.SeqWindow``).
Anything malformed, out of bounds, over budget, a duplicate, off-layout or from an unknown
device is logged and counted in ``stats.rejected`` by reason, never raised; what a known
device sent is also counted on its ``DeviceClaim`` row (the device detail shows it).

A message is refused alone: when a batch's transaction fails on its data (not on the
database being away), the batch is split in halves and written again until the message
that fails alone is found; it is refused (``db_refused``, the error kept as its reason) and
every other message is stored.

Several ingesters can share the stream: with ``shared_group`` they subscribe to health
and events through an MQTT 5 shared subscription (``$share/<group>/...``), so the
broker hands each message to one of them. Status messages (birth, last will; retained)
are subscribed plainly by every ingester: a shared subscription does not receive
retained messages, and a status only updates the device row, so a duplicate is harmless.
When the broker says it has no shared subscriptions (CONNACK), all are plain.

Events can still be lost between the broker and us: Mosquitto does not keep a shared
subscription over its own restart, so what is published before we subscribe again goes
nowhere. Every health message repeats each model's latest event (``last_event``); one whose
seq is above the latest applied to that model (``Device.models[m].event_seq``) is stored
as the event would have been (``_newer_event`` says what "above" means). An event already
applied (the same seq) is not stored twice, and an older one never moves the serving state back.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet import metrics
from fleet.broker.client import MqttTarget, make_client
from fleet.db.device_models import ReportedModel, ReportedShadow, read_models, stored_models
from fleet.db.engine import session_scope
from fleet.db.models import Device, DeviceEvent, HealthReport, table_of
from fleet.ingest import claims_store
from fleet.ingest.budget import Budget, BudgetExceeded, DeviceBudgets
from fleet.ingest.claims import DEFAULT_BOUNDS, Bounds, ClaimRefused, check
from fleet.ingest.claims_store import ClaimRow, Tally
from fleet.ingest.rollup import Window, add_windows
from fleet.rollout.health_buckets import add_health
from shared.errors import EdgefleetError
from shared.telemetry import messages, topics
from shared.telemetry.vocabulary import EventKind

log = logging.getLogger(__name__)

KINDS = ("status", "health", "event")
# Events that say which release a device now serves (after a local rollback: the one it
# went back to, ``release``; the release it left is ``from_release``).
SERVING_KINDS = frozenset({EventKind.ACTIVATED, EventKind.COMMITTED, EventKind.ROLLED_BACK})
# Per model in ``Device.models`` (fleet.db.device_models.ReportedModel): the seq and ts of the
# latest event applied (an Event message or
# a health message's ``last_event``); older or repeated events never move the serving state back.
EVENT_TS_SLACK_S = 0.001
REFUSAL_LOG_EVERY_S = 60.0  # per device: one log line for its refusals, not one per message
# The broker hands a dead ingester's persistent session its share of the stream until the
# session expires (a restarted process has a new client id and never resumes it): that long
# its devices may go unheard. Kept well under a rollout's silent_after_s (300 s by default)
# less a health interval (60 s), so an ingester's death never makes a device count as silent.
MAX_SESSION_EXPIRY_S = 120

DEVICE = table_of(Device)
HEALTH = table_of(HealthReport)
EVENT = table_of(DeviceEvent)
# The device columns telemetry merges: a batch reads them once and writes them once, with
# ``last_health`` (replaced, never merged, so not read) when the batch has a health message.
STATE_FIELDS = ("last_seen", "online", "status_ts", "status_online", "agent_version", "models")
_STATE_COLUMNS = [DEVICE.c.id, *(DEVICE.c[f] for f in STATE_FIELDS)]


def _update_state(fields: tuple[str, ...]) -> Any:
    return (
        update(DEVICE)
        .where(DEVICE.c.id == bindparam("b_id"))
        .values({f: bindparam(f"b_{f}", type_=DEVICE.c[f].type) for f in fields})
    )


_UPDATE_STATE = _update_state(STATE_FIELDS)
_UPDATE_STATE_HEALTH = _update_state((*STATE_FIELDS, "last_health"))


@dataclass
class IngestStats:
    received: int = 0
    written: int = 0
    batches: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1
        metrics.INGEST_REJECTED.labels(reason=reason).inc()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "received": self.received,
                "written": self.written,
                "batches": self.batches,
                "rejected": dict(self.rejected),
            }


@dataclass(frozen=True)
class Item:
    device_id: str
    kind: str
    message: messages.Message
    received_at: datetime


@dataclass
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
        out = {"b_id": self.id, **{f"b_{f}": getattr(self, f) for f in STATE_FIELDS if f != "models"},
               "b_models": stored_models(self.models)}
        if self.last_health is not None:
            out["b_last_health"] = msgspec.to_builtins(self.last_health)
        return out


@dataclass
class BatchRows:
    """What a batch inserts: health reports and events (column dicts), rollup windows."""

    health: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)


class Ingester:
    def __init__(
        self,
        engine: Engine,
        target: MqttTarget,
        *,
        batch_size: int = 2000,
        flush_interval_s: float = 0.2,
        queue_size: int = 100_000,
        shared_group: str | None = None,
        session_expiry_s: int = 0,
        bounds: Bounds = DEFAULT_BOUNDS,
        budget: Budget | None = None,
    ) -> None:
        self.engine = engine
        self.bounds = bounds
        self.budgets = DeviceBudgets(budget)  # the network thread's alone
        self._tallies: dict[str, Tally] = {}  # refusals not yet on the devices' rows
        self._tally_lock = threading.Lock()
        self._logged_at: dict[str, float] = {}
        self.target = target
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue: queue.Queue[Item] = queue.Queue(maxsize=queue_size)
        self.stats = IngestStats()
        self._received = {kind: metrics.INGEST_RECEIVED.labels(kind=kind) for kind in KINDS}
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.shared_group = shared_group
        self.shared = False  # whether the current connection uses the shared subscription
        self._subscribe_mid: int | None = None
        mqtt5 = shared_group is not None
        # MQTT 5 only: a session the broker keeps across a disconnect (and a broker restart,
        # where it persists sessions), so health that arrives before we re-subscribe waits
        # for us instead of being dropped. One stable client id per process for that.
        if mqtt5 and session_expiry_s > MAX_SESSION_EXPIRY_S:
            log.warning("ingester: session expiry %d s is longer than %d s, the most a dead ingester may "
                        "hold its share of the stream without devices counting as silent; using %d s",
                        session_expiry_s, MAX_SESSION_EXPIRY_S, MAX_SESSION_EXPIRY_S)
            session_expiry_s = MAX_SESSION_EXPIRY_S
        self.session_expiry_s = session_expiry_s if mqtt5 else 0
        client_id = (
            f"edgefleet-ingest-{socket.gethostname()}-{os.getpid()}" if self.session_expiry_s else None
        )
        self.client = make_client(target, "edgefleet-ingest", mqtt5=mqtt5, client_id=client_id)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # -- MQTT side ---------------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: Any, props: object = None
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.error("ingester: broker %s refused the connection: %s", self.target.url, rc)
            return
        available = getattr(props, "SharedSubscriptionAvailable", 1) if props is not None else 1
        self.shared = self.shared_group is not None and bool(available)
        if self.shared_group is not None and not self.shared:
            log.warning("ingester: broker %s has no shared subscriptions; plain ones", self.target.url)
        subs = [(self.subscription(kind), 1) for kind in KINDS]
        _, self._subscribe_mid = client.subscribe(subs)
        log.info("ingester subscribing to %s on %s", ", ".join(t for t, _ in subs), self.target.url)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, *args: object) -> None:
        # Ready only once the broker granted the subscriptions: a message published
        # between CONNACK and SUBACK would otherwise be lost without anyone knowing.
        if mid == self._subscribe_mid:
            self.connected.set()
            log.info("ingester subscribed on %s", self.target.url)

    def subscription(self, kind: str) -> str:
        plain = topics.subscription(kind)
        if self.shared and kind != "status":
            return f"$share/{self.shared_group}/{plain}"
        return plain

    def _on_disconnect(self, *args: object) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.stats.lock:
            self.stats.received += 1
        try:
            self.handle(msg.topic, msg.payload)
        except Exception:  # a bug here must not kill paho's network thread
            log.exception("ingester: unexpected error on %s", msg.topic)
            self.stats.reject("internal")

    def handle(self, topic: str, payload: bytes, received_at: datetime | None = None) -> bool:
        """Validate one message and queue it; False (counted) when it is refused."""
        try:
            device_id, kind = topics.parse_topic(topic)
        except EdgefleetError as exc:
            log.warning("ingester: refused topic: %s", exc)
            self.stats.reject("topic")
            return False
        if kind not in KINDS:
            self.stats.reject("topic")
            return False
        self._received[kind].inc()
        now = time.time()
        try:
            self.budgets.take_message(device_id, len(payload), now)
            message = messages.decode(kind, payload, device_id=device_id)
            check(message, self.bounds, now=now)
            if isinstance(message, messages.Health) and message.models:
                self.budgets.take_rows(device_id, len(message.models), now)
        except BudgetExceeded as exc:
            self.refuse(device_id, "over_budget", "over_budget", f"{kind}: {exc}")
            return False
        except ClaimRefused as exc:
            self.refuse(device_id, "malformed", "bounds", f"{kind}: {exc}")
            return False
        except EdgefleetError as exc:
            self.refuse(device_id, "malformed", "malformed", f"{kind}: {exc}")
            return False
        try:
            self.queue.put_nowait(Item(device_id, kind, message, received_at or datetime.now(UTC)))
        except queue.Full:
            log.error("ingester: queue full, dropping %s from %s", kind, device_id)
            self.stats.reject("overload")
            return False
        return True

    def refuse(self, device_id: str, cause: str, reason: str, detail: str, n: int = 1) -> None:
        """Count a refused message: by ``reason`` in the stats and metrics, by ``cause``
        (claims_store.CAUSES) on the device's row with the next batch; log it, at most once a
        minute per device."""
        for _ in range(n):
            self.stats.reject(reason)
        now = time.time()
        with self._tally_lock:
            self._tallies.setdefault(device_id, Tally()).add(cause, detail, datetime.now(UTC), n)
            logged = self._logged_at.get(device_id, 0.0)
            if now - logged >= REFUSAL_LOG_EVERY_S:
                if len(self._logged_at) > 100_000:
                    self._logged_at.clear()
                self._logged_at[device_id] = now
            else:
                return
        log.warning("ingester: refused %s from %s: %s (further refusals of this device for %g s "
                    "are counted, not logged)", cause, device_id, detail, REFUSAL_LOG_EVERY_S)

    def _take_tallies(self) -> dict[str, Tally]:
        with self._tally_lock:
            tallies, self._tallies = self._tallies, {}
        return tallies

    def _give_back(self, tallies: dict[str, Tally]) -> None:
        """Tallies of a batch whose transaction failed: the next batch writes them."""
        with self._tally_lock:
            for device_id, tally in tallies.items():
                self._tallies.setdefault(device_id, Tally()).merge(tally)

    # -- database side -----------------------------------------------------------
    # A batch is one transaction of a few statements, whatever its size: one SELECT of its
    # devices' telemetry columns, the health reports and events (``_insert_rows``: COPY on
    # PostgreSQL), the hourly rollup upsert (one executemany), and one UPDATE executemany with
    # each device's state merged in Python across the batch. No ORM objects: building and
    # flushing them was most of the writer's time (bench/b_ingest.py, docs/performance.md).
    def write_batch(self, items: list[Item]) -> int:
        """Write a batch in one transaction (with the refusals tallied since the last one);
        returns the number of messages written."""
        tallies = self._take_tallies()
        if not items and not tallies:
            return 0
        try:
            written, unknown, duplicates = self._write(items, tallies)
        except BaseException:
            self._give_back(tallies)
            raise
        for item in unknown:
            log.warning("ingester: %s from unknown or revoked device %r", item.kind, item.device_id)
            self.stats.reject("unknown_device")
        for _ in duplicates:
            self.stats.reject("duplicate")
        with self.stats.lock:
            self.stats.written += written
            self.stats.batches += 1
        metrics.INGEST_WRITTEN.inc(written)
        now = time.time()
        for item in items:
            metrics.record_ingest_lag(now - item.message.ts)
        return written

    def _write(self, items: list[Item], tallies: dict[str, Tally]) -> tuple[int, list[Item], list[Item]]:
        """The batch's transaction: (messages written, those from unknown devices, duplicates)."""
        ids = {i.device_id for i in items} | set(tallies)
        written = 0
        unknown: list[Item] = []
        duplicates: list[Item] = []
        rows = BatchRows()
        with session_scope(self.engine) as session:
            session.autoflush = False
            devices = {
                r.id: DeviceRow(r.id, r.last_seen, r.online, r.status_ts, r.status_online, r.agent_version,
                                read_models(r.models))
                # A revoked device's claims are no one's: on a broker the fleet does not manage
                # (the embedded one) it may still publish, so they are refused here too.
                for r in session.execute(
                    select(*_STATE_COLUMNS).where(DEVICE.c.id.in_(ids), DEVICE.c.revoked_at.is_(None))
                )
            }
            claim_rows = claims_store.lock_rows(session, set(devices))
            for device_id, tally in tallies.items():
                if device_id in claim_rows:
                    claim_rows[device_id].refuse(tally)
            for item in items:
                device = devices.get(item.device_id)
                if device is None:
                    unknown.append(item)
                    continue
                if not _admit(claim_rows[item.device_id], item):
                    duplicates.append(item)
                    continue
                self._apply(device, item, rows)
                written += 1
            _insert_rows(session, HEALTH, rows.health)
            add_health(session, rows.health)  # the gates' per-minute sums (fleet.rollout.health_buckets)
            _insert_rows(session, EVENT, rows.events)
            add_windows(session, rows.windows)
            touched = [devices[k] for k in sorted(devices) if devices[k].touched]
            for stmt, with_health in ((_UPDATE_STATE_HEALTH, True), (_UPDATE_STATE, False)):
                params = [d.params() for d in touched if (d.last_health is not None) is with_health]
                if params:
                    session.execute(stmt, params)
            claims_store.write_rows(session, claim_rows)
        return written, unknown, duplicates

    def _apply(self, device: DeviceRow, item: Item, rows: BatchRows) -> None:
        """Merge one message into its device's state and add the rows it stores (no I/O)."""
        msg = item.message
        device.touched = True
        if device.last_seen is None or _aware(device.last_seen) < item.received_at:
            device.last_seen = item.received_at
        if isinstance(msg, messages.Status):
            if _status_applies(device, msg):
                device.online = msg.online
                device.status_ts, device.status_online = msg.ts, msg.online
            if msg.agent_version:
                device.agent_version = msg.agent_version
        elif isinstance(msg, messages.Health):
            device.online = device.status_online is not False
            models = dict(device.models)
            for m in msg.models:
                prev = models.get(m.name) or ReportedModel()
                ev = m.last_event
                if ev is not None and _newer_event(prev, ev.seq, ev.ts):
                    # An event that reached the broker but not us (docs/telemetry.md "Recovering
                    # missed events"): stored as the event would have been. Its serving state is
                    # this health's own (read by the agent after the event, so never older).
                    rows.events.append(_event_row(
                        device.id, item, m.name, ev, f"recovered from health seq {msg.seq}"))
                    prev = msgspec.structs.replace(prev, event_seq=ev.seq, event_ts=ev.ts)
                models[m.name] = ReportedModel(
                    release=m.release, version=m.version, state=m.state,
                    # update windows and locks: what it waits for, what it keeps
                    waiting=m.waiting or None,
                    held=list(m.held) if m.held is not None else None,
                    # shadow evaluation: the candidate's latest (cumulative) figures,
                    # read by the rollout's shadow gates (fleet.rollout.controller)
                    shadow=_shadow(m, item.received_at),
                    # the latest event applied (kept across health messages)
                    event_seq=prev.event_seq, event_ts=prev.event_ts)
                rows.health.append(_health_row(device.id, item, msg, m))
                rows.windows.append(
                    Window(
                        device.id,
                        m.name,
                        m.release,
                        item.received_at,
                        msg.ts,
                        m.inferences,
                        m.errors,
                        m.latency_p95_ms,
                    )
                )
            device.models = models
            device.last_health = msg
        elif isinstance(msg, messages.Event):
            device.online = device.status_online is not False
            entry = device.models.get(msg.model) or ReportedModel()
            if _newer_event(entry, msg.seq, msg.ts):
                if msg.kind in SERVING_KINDS:
                    entry = msgspec.structs.replace(entry, release=msg.release, state=msg.kind,
                                                    waiting=None)
                entry = msgspec.structs.replace(entry, event_seq=msg.seq, event_ts=msg.ts)
                device.models = {**device.models, msg.model: entry}
            elif msg.seq == entry.event_seq:
                return  # stored already: a redelivery, or recovered from a health message first
            # else an older event arriving late: stored, but the serving state stays
            rows.events.append(_event_row(device.id, item, msg.model, msg, msg.message[:2000]))

    def _drain(self) -> list[Item]:
        """The next batch: from its first message, what arrives within ``flush_interval_s``
        (at most ``batch_size``). Under load a batch grows, so its fixed costs (one UPDATE per
        device, the statements, the commit) are shared by more messages; a quiet stream still
        sees its messages stored within one flush interval."""
        metrics.INGEST_QUEUE.set(self.queue.qsize())
        items: list[Item] = []
        try:
            items.append(self.queue.get(timeout=self.flush_interval_s))
        except queue.Empty:
            return items
        if self.queue.qsize() < self.batch_size:
            self._stop.wait(self.flush_interval_s)
        while len(items) < self.batch_size:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _run_writer(self) -> None:
        while not (self._stop.is_set() and self.queue.empty()):
            items = self._drain()
            if not items:
                with self._tally_lock:
                    pending = bool(self._tallies)
                if not pending:
                    continue
            try:
                self.write_isolating(items)
            except Exception:
                # The database, not a message: keep the messages, retry once after a pause,
                # then count them lost.
                log.exception("ingester: writing a batch of %d failed; retrying", len(items))
                time.sleep(1.0)
                try:
                    self.write_isolating(items)
                except Exception:
                    log.exception("ingester: batch of %d lost", len(items))
                    for _ in items:
                        self.stats.reject("db_error")

    def write_isolating(self, items: list[Item]) -> int:
        """``write_batch``; when it fails on a message's data, the halves again, down to the
        message that fails alone, which is refused (``db_refused``). A failure of the database
        itself (``_transient``) is raised for the caller to retry."""
        try:
            return self.write_batch(items)
        except Exception as exc:
            if _transient(exc):
                raise
            if len(items) <= 1:
                if items:
                    item = items[0]
                    self.refuse(item.device_id, "db_refused", "db_refused",
                                f"{item.kind} seq {getattr(item.message, 'seq', '?')}: {_describe(exc)}")
                return 0
            log.warning("ingester: a batch of %d failed on its data (%s); splitting it",
                        len(items), _describe(exc))
            half = len(items) // 2
            return self.write_isolating(items[:half]) + self.write_isolating(items[half:])

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the queue is empty (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        # one more flush interval so the batch in hand is written
        time.sleep(self.flush_interval_s + 0.05)

    # -- lifecycle -----------------------------------------------------------------
    def start(self, *, wait: float = 0.0) -> None:
        self._stop.clear()
        self._writer = threading.Thread(target=self._run_writer, name="ingest-writer", daemon=True)
        self._writer.start()
        if self.session_expiry_s:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            self.client.connect_async(
                self.target.host, self.target.port, keepalive=30, clean_start=False, properties=props
            )
        else:
            self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()
        if wait and not self.connected.wait(wait):
            log.warning("ingester not yet connected to %s; it keeps trying", self.target.url)

    def stop(self) -> None:
        if self.session_expiry_s:
            # A clean stop ends the session at once: the broker stops handing it messages
            # (this process's client id is never used again).
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self.client.disconnect(properties=props)
        else:
            self.client.disconnect()
        self.client.loop_stop()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(10)
            self._writer = None


def _admit(claim: ClaimRow, item: Item) -> bool:
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
    claim.refuse(_duplicate(item))
    return False


def _duplicate(item: Item) -> Tally:
    tally = Tally()
    msg = item.message
    seen = f"session {getattr(msg, 'session', '')!r} seq {getattr(msg, 'seq', '?')}"
    tally.add("duplicate", f"{item.kind} {seen} seen before", item.received_at)
    return tally


_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)


def _transient(exc: BaseException) -> bool:
    """A failure of the database or the connection, not of a message's data."""
    if isinstance(exc, _TRANSIENT):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - SQLite only
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = f"{type(orig).__name__}: {orig}".splitlines()[0]
    return text[:200]


def _insert_rows(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Append rows (dicts with the same keys) to a table in the session's transaction: one
    ``COPY`` on PostgreSQL, whose rows psycopg encodes in C (an INSERT executemany cost the
    writer ~40 % of its time there), one INSERT executemany elsewhere."""
    if not rows:
        return
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        conn.execute(insert(table), rows)
        return
    from psycopg import sql

    names = list(rows[0])
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, names))
    )
    driver = conn.connection.driver_connection
    assert driver is not None  # a checked-out pool connection holds its DB-API connection
    with driver.cursor() as cur, cur.copy(copy_sql) as copy:
        for row in rows:
            copy.write_row([row[n] for n in names])


def _status_applies(device: DeviceRow, msg: messages.Status) -> bool:
    """Newest wins (messages.status_supersedes): a birth and the death that closes it are
    applied in their order, not their arrival's. Agents without birth/death numbers (bd_seq
    0: their will is stamped before their birth) are applied as they arrive."""
    if msg.bd_seq == 0 or device.status_ts is None or device.status_online is None:
        return True
    return (msg.ts, not msg.online) >= (device.status_ts, not device.status_online)


def _newer_event(entry: ReportedModel, seq: int, ts: float) -> bool:
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


def _event_row(
    device_id: str, item: Item, model: str, ev: messages.Event | messages.LastEvent, message: str
) -> dict[str, Any]:
    """The ``DeviceEvent`` columns of an event, received as such or recovered from a health message."""
    return {
        "device_id": device_id,
        "ts": ev.ts,
        "received_at": item.received_at,
        "seq": ev.seq,
        "model": model,
        "kind": ev.kind,
        "release": ev.release,
        "from_release": ev.from_release,
        "reason": ev.reason,
        "message": message,
    }


def _health_row(device_id: str, item: Item, msg: messages.Health, m: messages.ModelHealth) -> dict[str, Any]:
    """The ``HealthReport`` columns of one model of a health message (a new column: one key here)."""
    return {
        "device_id": device_id,
        "ts": msg.ts,
        "received_at": item.received_at,
        "seq": msg.seq,
        "model": m.name,
        "release": m.release,
        "inferences": m.inferences,
        "errors": m.errors,
        "p50_ms": m.latency_p50_ms,
        "p95_ms": m.latency_p95_ms,
        "drift": _drift(m),
        "cpu_percent": msg.cpu_percent,
        "rss_mb": msg.mem_rss_mb,
    }


def _drift(m: messages.ModelHealth) -> float | None:
    """The model's drift score when the agent sends one (optional field, newer agents)."""
    value = getattr(m, "drift", None)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _shadow(m: messages.ModelHealth, received_at: datetime) -> ReportedShadow | None:
    """The candidate's figures and when they came, when the agent evaluates one."""
    shadow = getattr(m, "shadow", None)
    if shadow is None:
        return None
    return ReportedShadow(**msgspec.structs.asdict(shadow), received_at=received_at.timestamp())


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts

"""MQTT telemetry into the database: the ingester's connection, threads and batches.

The paho network thread only appends what it receives (topic, payload, arrival time) to an
inbox: it runs the same per-message work as any subscriber and little more, since under one
GIL whatever it does per message slows its reading of the socket. A writer thread takes the
inbox in batches and, per message, checks the device's budget (``fleet.ingest.budget``,
before decoding), parses and validates it (``shared.telemetry``) and bounds every figure
(``fleet.ingest.claims``); then it stores the batch in one transaction (``fleet.ingest.store``,
which applies it to the devices' state with ``fleet.ingest.apply``: a (device, session, seq)
seen before is dropped there, each health window is added to its hourly rollup). Anything
malformed, out of bounds, over budget, a duplicate, off-layout or from an unknown device is
logged and counted in ``stats.rejected`` by reason, never raised; what a known device sent is
also counted on its ``DeviceClaim`` row (the device detail shows it).

A batch is what waited while the previous one was written (at most ``batch_size``; a quiet
stream lingers ``flush_interval_s`` for more): under load batches grow, so their fixed costs
(one UPDATE per device, the statements, the commit) are shared by more messages.

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
nowhere; every health message repeats each model's latest event (``fleet.ingest.apply``).
"""

from __future__ import annotations

import collections
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

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy.engine import Engine

from fleet import metrics
from fleet.broker.client import MqttTarget, make_client
from fleet.ingest.apply import Item
from fleet.ingest.budget import Budget, BudgetExceeded, DeviceBudgets
from fleet.ingest.claims import DEFAULT_BOUNDS, Bounds, ClaimRefused, check
from fleet.ingest.claims_store import Tally
from fleet.ingest.store import describe, store_batch, transient
from shared.errors import EdgefleetError
from shared.telemetry import messages, topics

__all__ = ["KINDS", "MAX_SESSION_EXPIRY_S", "IngestStats", "Ingester", "Item"]

log = logging.getLogger(__name__)

KINDS = ("status", "health", "event")
REFUSAL_LOG_EVERY_S = 60.0  # per device: one log line for its refusals, not one per message
# The broker hands a dead ingester's persistent session its share of the stream until the
# session expires (a restarted process has a new client id and never resumes it): that long
# its devices may go unheard. Kept well under a rollout's silent_after_s (300 s by default)
# less a health interval (60 s), so an ingester's death never makes a device count as silent.
MAX_SESSION_EXPIRY_S = 120
# An idle writer wakes on the first message; this often without one (refusals tallied, stop).
IDLE_WAIT_S = 0.5
TOPIC_CACHE_MAX = 200_000  # parsed topics kept (two per active device); cleared past it

Raw = tuple[str, bytes, float]  # (topic, payload, arrival time.time()) as the network thread saw it


@dataclass
class IngestStats:
    received: int = 0
    written: int = 0
    batches: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reject(self, reason: str, n: int = 1) -> None:
        with self.lock:
            self.rejected[reason] += n
        metrics.INGEST_REJECTED.labels(reason=reason).inc(n)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "received": self.received,
                "written": self.written,
                "batches": self.batches,
                "rejected": dict(self.rejected),
            }


class Ingester:
    def __init__(
        self,
        engine: Engine,
        target: MqttTarget,
        *,
        batch_size: int = 2000,
        flush_interval_s: float = 0.02,
        queue_size: int = 100_000,
        shared_group: str | None = None,
        session_expiry_s: int = 0,
        bounds: Bounds = DEFAULT_BOUNDS,
        budget: Budget | None = None,
    ) -> None:
        self.engine = engine
        self.bounds = bounds
        self.budgets = DeviceBudgets(budget)  # the writer thread's alone (or handle()'s caller)
        self._tallies: dict[str, Tally] = {}  # refusals not yet on the devices' rows
        self._tally_lock = threading.Lock()
        self._logged_at: dict[str, float] = {}
        self._topics: dict[str, tuple[str, str] | None] = {}  # topic -> (device, kind), None: refused
        self.target = target
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        # What the network thread received, not yet validated (deque: appends and pops need no lock).
        self._inbox: collections.deque[Raw] = collections.deque()
        self._inbox_max = queue_size
        self._writer_idle = False  # the writer waits on _wake: the network thread sets it
        self._wake = threading.Event()
        # Messages validated by ``handle`` (tests, tools), written with the next batch.
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

    # -- MQTT side (paho's network thread) ---------------------------------------------------
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
        inbox = self._inbox
        if len(inbox) >= self._inbox_max:
            self.stats.reject("overload")
            return
        try:
            inbox.append((msg.topic, msg.payload, time.time()))
        except Exception:  # a bug here must not kill paho's network thread
            log.exception("ingester: unexpected error on a message")
            self.stats.reject("internal")
            return
        if self._writer_idle:
            self._wake.set()

    # -- validation (the writer thread) ------------------------------------------------------
    def handle(self, topic: str, payload: bytes, received_at: datetime | None = None) -> bool:
        """Validate one message and queue it for the next batch; False (counted) when it is refused."""
        with self.stats.lock:
            self.stats.received += 1
        now = time.time()
        item = self._validate(topic, payload, now, received_at or datetime.fromtimestamp(now, UTC))
        if item is None:
            return False
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            log.error("ingester: queue full, dropping %s from %s", item.kind, item.device_id)
            self.stats.reject("overload")
            return False
        return True

    def _parse_topic(self, topic: str) -> tuple[str, str] | None:
        """(device, kind) of a telemetry topic, or None (counted as ``topic``); cached per topic."""
        try:
            return self._topics[topic]
        except KeyError:
            pass
        parsed: tuple[str, str] | None
        try:
            parsed = topics.parse_topic(topic)
        except EdgefleetError as exc:
            log.warning("ingester: refused topic: %s", exc)
            parsed = None
        if parsed is not None and parsed[1] not in KINDS:
            parsed = None
        if len(self._topics) >= TOPIC_CACHE_MAX:
            self._topics.clear()
        self._topics[topic] = parsed
        return parsed

    def _validate(self, topic: str, payload: bytes, now: float, received_at: datetime) -> Item | None:
        """The message as an ``Item``, or None when refused (counted, on the device's row too)."""
        parsed = self._parse_topic(topic)
        if parsed is None:
            self.stats.reject("topic")
            return None
        device_id, kind = parsed
        self._received[kind].inc()
        try:
            self.budgets.take_message(device_id, len(payload), now)
            message = messages.decode(kind, payload, device_id=device_id)
            check(message, self.bounds, now=now)
            if isinstance(message, messages.Health) and message.models:
                self.budgets.take_rows(device_id, len(message.models), now)
        except BudgetExceeded as exc:
            self.refuse(device_id, "over_budget", "over_budget", f"{kind}: {exc}")
            return None
        except ClaimRefused as exc:
            self.refuse(device_id, "malformed", "bounds", f"{kind}: {exc}")
            return None
        except EdgefleetError as exc:
            self.refuse(device_id, "malformed", "malformed", f"{kind}: {exc}")
            return None
        return Item(device_id, kind, message, received_at)

    def _validate_raw(self, raw: list[Raw]) -> list[Item]:
        """The inbox's messages as Items, in order (refusals counted). ``_validate``'s steps,
        inline: this runs per message on the writer thread, which shares the GIL with paho's, so
        every Python call per message counts (the received metric is added to once a batch)."""
        with self.stats.lock:
            self.stats.received += len(raw)
        items: list[Item] = []
        append = items.append
        cache, parse_topic = self._topics, self._parse_topic
        take_message, take_rows = self.budgets.take_message, self.budgets.take_rows
        decode, bounds, health = messages.decode, self.bounds, messages.Health
        received = dict.fromkeys(KINDS, 0)
        stamps: dict[float, datetime] = {}  # a burst shares arrival instants
        try:
            for topic, payload, at in raw:
                try:
                    received_at = stamps.get(at)
                    if received_at is None:
                        received_at = stamps[at] = datetime.fromtimestamp(at, UTC)
                    parsed = cache[topic] if topic in cache else parse_topic(topic)
                    if parsed is None:
                        self.stats.reject("topic")
                        continue
                    device_id, kind = parsed
                    received[kind] += 1
                    try:
                        take_message(device_id, len(payload), at)
                        message = decode(kind, payload, device_id=device_id)
                        check(message, bounds, now=at)
                        if isinstance(message, health) and message.models:
                            take_rows(device_id, len(message.models), at)
                    except BudgetExceeded as exc:
                        self.refuse(device_id, "over_budget", "over_budget", f"{kind}: {exc}")
                        continue
                    except ClaimRefused as exc:
                        self.refuse(device_id, "malformed", "bounds", f"{kind}: {exc}")
                        continue
                    except EdgefleetError as exc:
                        self.refuse(device_id, "malformed", "malformed", f"{kind}: {exc}")
                        continue
                    append(Item(device_id, kind, message, received_at))
                except Exception:  # a bug in validation must not lose the batch
                    log.exception("ingester: unexpected error on %s", topic)
                    self.stats.reject("internal")
        finally:
            for kind, n in received.items():
                if n:
                    self._received[kind].inc(n)
        return items

    def refuse(self, device_id: str, cause: str, reason: str, detail: str, n: int = 1) -> None:
        """Count a refused message: by ``reason`` in the stats and metrics, by ``cause``
        (claims_store.CAUSES) on the device's row with the next batch; log it, at most once a
        minute per device."""
        self.stats.reject(reason, n)
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

    # -- database side (the writer thread) ---------------------------------------------------
    def write_batch(self, items: list[Item]) -> int:
        """Write a batch in one transaction (with the refusals tallied since the last one);
        returns the number of messages written."""
        tallies = self._take_tallies()
        if not items and not tallies:
            return 0
        try:
            applied = store_batch(self.engine, items, tallies)
        except BaseException:
            self._give_back(tallies)
            raise
        for item in applied.unknown:
            log.warning("ingester: %s from unknown or revoked device %r", item.kind, item.device_id)
        if applied.unknown:
            self.stats.reject("unknown_device", len(applied.unknown))
        if applied.duplicates:
            self.stats.reject("duplicate", len(applied.duplicates))
        written = applied.written
        with self.stats.lock:
            self.stats.written += written
            self.stats.batches += 1
        metrics.INGEST_WRITTEN.inc(written)
        now, record = time.time(), metrics.record_ingest_lag
        for item in items:
            record(now - item.message.ts)
        return written

    def write_isolating(self, items: list[Item]) -> int:
        """``write_batch``; when it fails on a message's data, the halves again, down to the
        message that fails alone, which is refused (``db_refused``). A failure of the database
        itself (``store.transient``) is raised for the caller to retry."""
        try:
            return self.write_batch(items)
        except Exception as exc:
            if transient(exc):
                raise
            if len(items) <= 1:
                if items:
                    item = items[0]
                    self.refuse(item.device_id, "db_refused", "db_refused",
                                f"{item.kind} seq {getattr(item.message, 'seq', '?')}: {describe(exc)}")
                return 0
            log.warning("ingester: a batch of %d failed on its data (%s); splitting it",
                        len(items), describe(exc))
            half = len(items) // 2
            return self.write_isolating(items[:half]) + self.write_isolating(items[half:])

    def _wait_inbox(self, timeout: float) -> bool:
        """Wait until the inbox holds a message (or ``timeout``); whether it does."""
        if self._inbox:
            return True
        self._writer_idle = True
        try:
            if not self._inbox:  # again: a message appended before the flag was seen
                self._wake.wait(timeout)
        finally:
            self._writer_idle = False
            self._wake.clear()
        return bool(self._inbox)

    def _drain(self) -> list[Item]:
        """The next batch: what ``handle`` queued, then what the network thread received since
        the last batch (at most ``batch_size``), validated. From the first message, it lingers
        ``flush_interval_s`` when fewer than ``batch_size`` wait, so a quiet stream is not one
        transaction per message; under load the messages that arrived while the previous batch
        was written are the next batch, so batches grow with the rate."""
        inbox = self._inbox
        metrics.INGEST_QUEUE.set(len(inbox) + self.queue.qsize())
        items: list[Item] = []
        while len(items) < self.batch_size:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        if not items and not self._wait_inbox(IDLE_WAIT_S):
            return items
        if len(inbox) < self.batch_size:
            self._stop.wait(self.flush_interval_s)
        n = min(len(inbox), self.batch_size - len(items))
        popleft = inbox.popleft
        raw = [popleft() for _ in range(n)]
        return items + self._validate_raw(raw)

    def _run_writer(self) -> None:
        while not (self._stop.is_set() and self.queue.empty() and not self._inbox):
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
                    self.stats.reject("db_error", len(items))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until nothing waits to be written (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while (not self.queue.empty() or self._inbox) and time.monotonic() < deadline:
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
        self._wake.set()
        if self._writer is not None:
            self._writer.join(10)
            self._writer = None

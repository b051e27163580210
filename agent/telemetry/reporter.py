"""MQTT reporter, the device's session with the broker: birth and last will, periodic
health, update events, desired notices. What a health message says is assembled in
agent.telemetry.health_report; message numbers and the session id are
agent.telemetry.sequence's.

- client id = device id; the last will is a retained ``Status(online=False)`` on the
  status topic, the birth a retained ``Status(online=True)`` sent on every connect;
- health every ``health_interval_s`` (QoS 1), events QoS 1; each model's health carries
  the latest lifecycle event published for it (``last_event``, kept in memory), so the
  fleet recovers an event that reached the broker but not the fleet;
- ``seq`` increases by one per message across kinds and survives restarts
  (agent.telemetry.sequence);
- a message on the device's desired topic calls ``on_desired`` (pull now);
- store-and-forward: every health and event message is first appended to the on-disk
  spool (agent.telemetry.spool), in seq order; a sender thread hands the spool's records
  to paho while connected, at most ``window`` unacknowledged at a time (paho's in-flight
  limit is the same, so paho's own memory queue never holds more), and acknowledges each
  record in the spool when paho reports the broker's PUBACK (``on_publish`` with its mid).
  Unacknowledged records survive a reconnect (paho resends its window) and a restart (the
  spool sends them again): delivery is at least once, in order; readers dedupe by
  (``session``, ``seq``): the session is new whenever the counter starts over.
  When the spool is full its oldest health goes first; drops are counted by kind in Health;
- status (birth, will, clean offline) is state, retained and not spooled: a stale birth
  means nothing. The will's seq, reserved at start, only appears if the will fires;
- protocol (agent.telemetry.connection): MQTT 5 or 3.1.1, the same messages, QoS, retain
  flags and will on both. MQTT 5 connects with clean start and a session expiry of 0,
  which is 3.1.1's clean session: the spool, not the broker, keeps what is unsent. In
  ``auto`` a CONNACK "unsupported protocol version" makes the sender thread (which owns
  the in-flight records) swap in a 3.1.1 client; the version that worked is kept for
  every reconnect. With MQTT 5 a PUBACK can refuse a message (e.g. the ACL): it is logged
  and dropped like the 3.1.1 broker drops it silently, so one refused message cannot
  block the spool.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.runtime.host import ModelHost
from agent.telemetry.connection import (
    PROTOCOLS,
    UNSUPPORTED_PROTOCOL_VERSION,
    TlsOptions,
    describe_connect_error,
    parse_mqtt_url,
)
from agent.telemetry.health_report import HealthAssembler
from agent.telemetry.sequence import SEQ_FILE, SeqCounter
from agent.telemetry.spool import DEFAULT_MAX_BYTES, SPOOL_DIR, Spool
from shared.errors import EdgefleetError
from shared.telemetry import messages, topics
from shared.telemetry.content import content_type

if TYPE_CHECKING:  # paho and psutil load with the first Reporter (~30 ms, ~2.4 MB): an agent
    import paho.mqtt.client as mqtt  # without telemetry never imports them
    from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

WINDOW = 16  # spooled messages handed to paho and not yet acknowledged
SYNC_EVERY_S = 1.0  # the sender's idle wake-up: fsync batched health, write the spool cursor
# auto: an MQTT 5 CONNECT not answered by then counts as refused (amqtt, given a will,
# neither answers nor hangs up: it waits for bytes that never come).
CONNACK_TIMEOUT_S = 10.0
# CONNACK reasons of a refused login (paho maps 3.1.1's return codes 4 and 5 to them).
LOGIN_REFUSED = (0x86, 0x87)  # bad user name or password, not authorised


class Reporter:
    def __init__(
        self,
        *,
        device_id: str,
        mqtt_url: str,
        state_dir: Path,
        host: ModelHost,
        states: Callable[[], dict[str, str]] = dict,
        model_details: Callable[[], dict[str, dict[str, Any]]] | None = None,
        on_desired: Callable[[], None] | None = None,
        health_interval_s: float = 10.0,
        keepalive_s: int = 60,
        username: str | None = None,
        password: str | None = None,
        spool_max_bytes: int = DEFAULT_MAX_BYTES,
        window: int = WINDOW,
        encoding: str = "msgpack",
        protocol: str = "auto",
        tls: TlsOptions | None = None,
        connack_timeout_s: float = CONNACK_TIMEOUT_S,
    ) -> None:
        self.device_id = topics.check_device_id(device_id)
        if protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
        if encoding not in messages.ENCODINGS:  # agent.config refuses it first
            raise ValueError(f"encoding {encoding!r} must be one of {', '.join(messages.ENCODINGS)}")
        self.address = parse_mqtt_url(mqtt_url)
        self.broker = (self.address.host, self.address.port)
        if tls is not None and tls != TlsOptions() and not self.address.tls:
            log.warning("mqtt TLS options are ignored: %s is not an mqtts:// URL", self.address.url)
        self.tls = (tls or TlsOptions()) if self.address.tls else None
        if username is None:  # a fleet-less device may carry its credential in the URL
            username, password = self.address.username, self.address.password
        self.username, self.password = username, password
        self.protocol = protocol
        # The version in use: 5 until a broker refuses it (auto), then 3.1.1 for good.
        self.mqtt5 = protocol != "3.1.1"
        self.negotiated: str | None = None  # "5" or "3.1.1" once a broker accepted it
        self.last_error: str | None = None  # why the last connection attempt failed; None when up
        self._fallback = False  # set by on_connect, done by the sender thread
        self._new_tls: TlsOptions | None = None  # set by use_tls, done by the sender thread
        self._connack = False  # whether this connection attempt got a CONNACK
        self._attempt_at: float | None = None  # when this attempt's socket opened
        self.connack_timeout_s = connack_timeout_s
        self._refused_publish: set[int] = set()
        self.state_dir = Path(state_dir)
        self.on_desired = on_desired
        # Called (network thread; keep it short) when the broker refuses the login itself
        # (bad user name or password, not authorised): the agent may fetch new credentials.
        self.on_login_refused: Callable[[], None] | None = None
        self.health_interval_s = health_interval_s
        self.keepalive_s = keepalive_s
        self.seq = SeqCounter(self.state_dir / SEQ_FILE)
        self.spool = Spool(self.state_dir / SPOOL_DIR, max_bytes=spool_max_bytes)
        self.window = window
        # health and events; status stays JSON (retained, read by anyone)
        self.encoding: messages.Encoding = "json" if encoding == "json" else "msgpack"
        # What each health message says; ``model_details``: extra per-model health fields
        # (update ``waiting``, ``held`` releases), by model name.
        self.report = HealthAssembler(
            device_id=self.device_id, host=host, state_dir=self.state_dir, seq=self.seq,
            spool=self.spool, interval_s=health_interval_s, states=states, model_details=model_details)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._emit_lock = threading.Lock()  # seq order == spool order
        self._cond = threading.Condition()
        self._acked: list[int] = []  # mids paho reported as acknowledged
        self._kick = False
        self._sending = False
        self._mids: dict[int, int] = {}  # mid -> spool token (the sender thread's own)
        self.will_seq = self.seq.next()
        # Birth/death pairing (shared.telemetry.messages.Status.bd_seq): each connection's
        # number and the time its CONNECT was made; the birth carries both, the will both
        # with its time just after.
        self.bd_seq = 0
        self._connect_ts = time.time()
        self._will = self._arm_will()
        self.client = self._new_client()

    def _arm_will(self) -> bytes:
        """A new connection's number and time, and the last will that closes it."""
        self.bd_seq += 1
        self._connect_ts = time.time()
        will = messages.Status(v=messages.VERSION, device_id=self.device_id, online=False,
                               ts=self._connect_ts + messages.WILL_AFTER_BIRTH_S,
                               agent_version=__version__, seq=self.will_seq, session=self.seq.session,
                               bd_seq=self.bd_seq)
        return messages.encode(will)

    def _on_pre_connect(self, client: mqtt.Client, _userdata: object) -> None:
        self._will = self._arm_will()
        client.will_set(self.topic("status"), self._will, qos=1, retain=True,
                        properties=self._properties(self._will, will=True))

    def _new_client(self) -> mqtt.Client:
        """A paho client for the current protocol version; the same settings on both."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion  # loaded by paho.mqtt.client already

        if self.mqtt5:
            client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=self.device_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=self.device_id, clean_session=True, protocol=mqtt.MQTTv311)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls is not None:
            client.tls_set_context(self.tls.context())
            client.tls_insecure_set(self.tls.insecure)
        # The spool is the queue: paho holds at most the window (plus a few status messages).
        client.max_inflight_messages_set(self.window)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.will_set(self.topic("status"), self._will, qos=1, retain=True,
                        properties=self._properties(self._will, will=True))
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_open = self._on_socket_open
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect(self) -> None:
        host, port = self.broker
        if self.mqtt5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0  # the session ends with the connection: clean session
            self.client.connect_async(host, port, keepalive=self.keepalive_s, clean_start=True,
                                      properties=props)
        else:
            self.client.connect_async(host, port, keepalive=self.keepalive_s)
        self.client.loop_start()

    @property
    def version(self) -> str:
        return "5" if self.mqtt5 else "3.1.1"

    def _properties(self, payload: bytes, *, will: bool = False) -> Any:
        """The MQTT 5 ``content-type`` of ``payload`` (docs/asyncapi.json); None on 3.1.1,
        which has no properties. paho's client module has loaded these modules already."""
        if not self.mqtt5:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.WILLMESSAGE if will else PacketTypes.PUBLISH)
        props.ContentType = content_type(payload)
        return props

    def use_login(self, username: str, password: str | None) -> None:
        """Log in with a new broker password from now on (re-enrollment, rotation), without a
        restart. The fleet's broker reload ends the session made with the old password, and
        paho's reconnect (1 s later) presents the new one; nothing spooled is lost."""
        if (username, password) == (self.username, self.password):
            return
        self.username, self.password = username, password
        self.client.username_pw_set(username, password)  # read by paho at its next CONNECT
        log.info("mqtt: broker login of %s changed; used from the next connection", username)

    def topic(self, kind: str) -> str:
        return topics.topic(self.device_id, kind)

    # -- paho callbacks (network thread) --------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: ReasonCode, properties: object) -> None:
        self._connack = True
        if reason_code.is_failure:
            if reason_code.value == UNSUPPORTED_PROTOCOL_VERSION and self._may_fall_back():
                self._fall_back("refused MQTT 5")
                return
            self._note_error(f"{self.address.url} refused the MQTT {self.version} connection: "
                             f"{reason_code}")
            if reason_code.value in LOGIN_REFUSED and self.on_login_refused is not None:
                self.on_login_refused()
            return
        if self.negotiated != self.version:
            log.info("mqtt: %s speaks MQTT %s; used from now on", self.address.url, self.version)
            self.negotiated = self.version
        self.last_error = None
        log.info("mqtt connected to %s", self.address.url)
        self._publish("status", messages.Status(
            v=messages.VERSION, device_id=self.device_id, online=True, ts=self._connect_ts,
            agent_version=__version__, seq=self.seq.next(), session=self.seq.session,
            bd_seq=self.bd_seq), retain=True)
        client.subscribe(self.topic("desired"), qos=1)
        self.connected.set()
        self._wake()

    def _may_fall_back(self) -> bool:
        return self.mqtt5 and self.protocol == "auto" and self.negotiated is None

    def _fall_back(self, why: str) -> None:
        log.info("mqtt: %s %s; falling back to 3.1.1", self.address.url, why)
        with self._cond:
            self._fallback = True
            self._cond.notify()

    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        self._connack = False
        self._attempt_at = time.monotonic()

    def _connack_overdue(self) -> bool:
        started = self._attempt_at
        return (started is not None and not self._connack and self._may_fall_back()
                and time.monotonic() - started > self.connack_timeout_s)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho calls this inside its ``except OSError`` around the connect: the error is live.
        self._note_error(describe_connect_error(sys.exc_info()[1], self.address, self.tls))

    def _note_error(self, message: str) -> None:
        """Log a connection failure once, not on every retry; ``last_error`` keeps it."""
        if message != self.last_error:
            log.error("mqtt: %s", message)
        self.last_error = message

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason_code: ReasonCode, properties: object) -> None:
        self.connected.clear()
        connack, self._connack = self._connack, False
        if not connack and self._may_fall_back() and not self._stop.is_set():
            # Some 3.1.1-only brokers (amqtt with a will) hang up on an MQTT 5 CONNECT
            # instead of answering "unsupported protocol version".
            self._fall_back("closed the MQTT 5 connection without a CONNACK")
            return
        if not self._stop.is_set():
            log.warning("mqtt disconnected (%s); reconnecting", reason_code)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: object) -> None:
        # Called under paho's message lock: only note the mid; the sender does the rest.
        if reason_code.is_failure and reason_code.value not in self._refused_publish:
            # MQTT 5 only (a 3.1.1 broker drops a refused message and acknowledges it).
            self._refused_publish.add(reason_code.value)
            log.warning("mqtt: %s refused a message: %s; such messages are dropped",
                        self.address.url, reason_code)
        with self._cond:
            self._acked.append(mid)
            self._cond.notify()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.topic("desired"):
            return
        try:
            notice = messages.decode("desired", bytes(msg.payload))
        except EdgefleetError as exc:
            log.warning("ignoring bad desired notice: %s", exc)
            return
        log.info("desired-state notice (generation %s)", getattr(notice, "generation", "?"))
        if self.on_desired is not None:
            self.on_desired()

    # -- publishing -------------------------------------------------------------------

    def _publish(self, kind: str, message: messages.Message, *, retain: bool = False) -> None:
        """Status only: straight to paho (retained state, not spooled)."""
        payload = messages.encode(message)
        self.client.publish(self.topic(kind), payload, qos=1, retain=retain,
                            properties=self._properties(payload))

    def _spool(self, kind: str, build: Callable[[int], messages.Message]) -> messages.Message:
        """Number, encode and store one message; the sender takes it from there."""
        with self._emit_lock:
            message = build(self.seq.next())
            # Never sent when over the fleet's bound: the broker would drop it (MQTT 5: with a
            # PUBACK paho takes for a protocol error, so it would be resent on every reconnect).
            self.spool.append(kind, messages.encode(message, self.encoding), messages.MAX_MESSAGE_BYTES)
        self._wake()
        return message

    def _wake(self) -> None:
        with self._cond:
            self._kick = True
            self._cond.notify()

    def event(self, model: str, kind: str, release: int, from_release: int | None,
              reason: str | None = None, message: str = "") -> None:
        def build(seq: int) -> messages.Message:
            ev = messages.Event(
                v=messages.VERSION, device_id=self.device_id, seq=seq, ts=time.time(),
                model=model, kind=kind, release=release, from_release=from_release, reason=reason,
                message=message[:2000], session=self.seq.session)
            # Under the emit lock: a health numbered after this event carries it (or a later one).
            self.report.remember(ev)
            return ev

        self._spool("event", build)

    def last_events(self) -> dict[str, messages.LastEvent]:
        """Per model, the latest lifecycle event published since the agent started."""
        return self.report.last_events()

    def health(self, *, reset_window: bool = True, seq: int | None = None) -> messages.Health:
        """One health message (agent.telemetry.health_report), numbered here unless ``seq``."""
        return self.report.build(reset_window=reset_window, seq=seq)

    def publish_health(self) -> None:
        self._spool("health", lambda seq: self.health(seq=seq))

    def _health_loop(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            try:
                self.publish_health()
            except Exception:
                log.exception("health report failed")

    def _send_loop(self) -> None:
        """Spool -> paho, at most ``window`` unacknowledged; PUBACKs -> spool."""
        last_sync = time.monotonic()
        while True:
            with self._cond:
                if not (self._kick or self._acked or self._fallback or self._new_tls or not self._sending):
                    self._cond.wait(SYNC_EVERY_S)
                new_tls, self._new_tls = self._new_tls, None
                acked, self._acked = self._acked, []
                self._kick = False
                running = self._sending
                fallback, self._fallback = self._fallback, False
            for mid in acked:
                token = self._mids.pop(mid, None)
                if token is not None:
                    self.spool.ack(token)
            if running and not fallback and self._connack_overdue():
                log.info("mqtt: %s did not answer the MQTT 5 CONNECT in %.0f s; falling back to 3.1.1",
                         self.address.url, self.connack_timeout_s)
                fallback = True
            if fallback and running:
                self._reconnect_as_311()
            elif new_tls is not None and running:
                log.info("mqtt: reconnecting to %s with the new client certificate", self.address.url)
                self.tls = new_tls
                self._replace_client(mqtt5=self.mqtt5)
            if not running:
                return
            if self.connected.is_set():
                self._hand_out()
            if time.monotonic() - last_sync >= SYNC_EVERY_S:
                self.spool.sync(force=False)
                last_sync = time.monotonic()

    def use_tls(self, tls: TlsOptions) -> None:
        """Connect with ``tls`` from now on (a renewed client certificate): the sender thread
        replaces the client, which reconnects at once; nothing spooled is lost."""
        with self._cond:
            self._new_tls = tls
            self._cond.notify()

    def _reconnect_as_311(self) -> None:
        """Replace the MQTT 5 client by a 3.1.1 one (sender thread: it owns ``_mids``)."""
        self._replace_client(mqtt5=False)

    def _replace_client(self, *, mqtt5: bool) -> None:
        """A new client for ``mqtt5`` and the current TLS options; the old one disconnects
        cleanly (no will) and what it had in flight is sent again (sender thread)."""
        old = self.client
        for name in ("on_connect", "on_connect_fail", "on_socket_open", "on_disconnect", "on_publish",
                     "on_message"):
            setattr(old, name, None)
        old.disconnect()
        old.loop_stop()
        if self._mids:  # handed to the old client, never acknowledged: send them again
            self.spool.rewind(next(iter(self._mids.values())))
            self._mids.clear()
        with self._cond:
            self._acked.clear()  # the old client's mids; the new one counts from 1 again
        self.connected.clear()
        self.mqtt5 = mqtt5
        self._attempt_at = None
        self.client = self._new_client()
        self._connect()

    def _hand_out(self) -> None:
        import paho.mqtt.client as mqtt

        for token, kind, payload in self.spool.take(self.window):
            try:
                info = self.client.publish(self.topic(kind), payload, qos=1,
                                           properties=self._properties(payload))
            except (ValueError, RuntimeError) as exc:
                log.error("mqtt publish of a spooled %s message failed: %s", kind, exc)
                self.spool.rewind(token)
                return
            # NO_CONN still queues a QoS 1 message in paho: it goes out on reconnect.
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning("mqtt publish refused (%s); the message stays spooled",
                            mqtt.error_string(info.rc))
                self.spool.rewind(token)
                return
            self._mids[info.mid] = token

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the spool is empty (everything acknowledged); for tests and shutdown."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.spool.stats().pending == 0:
                return True
            time.sleep(0.02)
        return self.spool.stats().pending == 0

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._sending = True
        self._sender = threading.Thread(target=self._send_loop, name="telemetry-send", daemon=True)
        self._sender.start()
        self._connect()
        self._thread = threading.Thread(target=self._health_loop, name="health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Clean shutdown: a short chance to empty the spool, say offline (retained), disconnect.
        What is still spooled is sent after the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.connected.is_set():
            self.flush(timeout / 2)  # a short chance to empty the spool before saying offline
        with self._cond:
            self._sending = False
            self._cond.notify()
        if self._sender is not None:
            self._sender.join(timeout)
        if self.connected.is_set():
            death = messages.encode(messages.Status(
                v=messages.VERSION, device_id=self.device_id, online=False,
                ts=max(time.time(), self._connect_ts + messages.WILL_AFTER_BIRTH_S),
                agent_version=__version__, seq=self.seq.next(), session=self.seq.session,
                bd_seq=self.bd_seq))
            info = self.client.publish(self.topic("status"), death, qos=1, retain=True,
                                       properties=self._properties(death))
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        self.spool.close()
        self.seq.close()

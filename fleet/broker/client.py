"""MQTT connection helpers shared by the ingester and the controller (paho-mqtt 2.x).

``mqtts://`` verifies the broker's certificate chain and host name against ``ca_file``
(the system CAs without one); there is no switch to skip either.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared import mqtturl
from shared.errors import MalformedDocumentError
from shared.telemetry.content import content_type

if TYPE_CHECKING:
    from fleet.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttTarget:
    """The target of a broker URL (the grammar of ``shared.mqtturl``, shared with the agent)."""
    u = mqtturl.parse_mqtt_url(url)
    return MqttTarget(u.host, u.port, u.tls, u.username, u.password)


def target_from_settings(settings: Settings, url: str) -> MqttTarget:
    """``url`` with the fleet's broker login and CA file from the settings (they win over
    user info in the URL)."""
    target = parse_mqtt_url(url)
    if settings.mqtt_username:
        target = replace(target, username=settings.mqtt_username, password=settings.mqtt_password)
    if settings.mqtt_ca_file is not None:
        if not target.tls:
            raise MalformedDocumentError(
                f"mqtt_ca_file {settings.mqtt_ca_file} is set but the MQTT URL {target.url} is not mqtts://"
            )
        target = replace(target, ca_file=Path(settings.mqtt_ca_file))
    return target


def make_client(
    target: MqttTarget, prefix: str, *, mqtt5: bool = False, client_id: str | None = None
) -> mqtt.Client:
    """A paho client with a unique id (so several fleet processes never kick each other off);
    ``client_id`` when the caller needs a stable one (a persistent session)."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"{prefix}-{secrets.token_hex(4)}",
        protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
    )
    if target.username:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        ctx = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        client.tls_set_context(ctx)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    client.on_connect_fail = _connect_fail_logger(target, prefix)
    return client


def _connect_fail_logger(target: MqttTarget, prefix: str) -> Callable[[mqtt.Client, object], None]:
    """Log why a connection failed (TLS refusal, broker down) once per distinct reason."""
    last: list[str] = [""]

    def on_connect_fail(client: mqtt.Client, userdata: object) -> None:
        # paho calls this inside its ``except OSError`` around the connect: the error is live.
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLCertVerificationError):
            ca = target.ca_file or "the system CA store"
            reason = f"TLS: {target.url} certificate refused ({exc.verify_message}; CA: {ca})"
        else:
            reason = f"cannot connect to {target.url}: {exc}"
        if reason != last[0]:
            log.error("%s: %s", prefix, reason)
            last[0] = reason

    return on_connect_fail


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...


class MqttPublisher:
    """A connected client that publishes; paho queues messages while disconnected."""

    def __init__(self, target: MqttTarget, *, mqtt5: bool = False) -> None:
        """``mqtt5``: speak MQTT 5 and set each message's content-type (docs/asyncapi.json);
        the fleet's embedded broker (amqtt) speaks 3.1.1 only."""
        self.target = target
        self.mqtt5 = mqtt5
        self.client = make_client(target, "edgefleet-fleet-pub", mqtt5=mqtt5)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None
    ) -> None:
        if not getattr(rc, "is_failure", False):
            self.connected.set()

    def _on_disconnect(self, *args: object) -> None:
        self.connected.clear()

    def start(self, timeout: float = 10.0) -> None:
        self.client.connect_async(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            log.warning("publisher not yet connected to %s; it keeps trying", self.target.url)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type(payload)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))


class RecordingPublisher:
    """A Publisher that keeps what it was given (for tests and runs without MQTT)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.messages.append((topic, payload, qos, retain))

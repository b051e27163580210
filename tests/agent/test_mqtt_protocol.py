"""The reporter's broker connection: MQTT 5 where the broker speaks it, 3.1.1 where it does
not (the embedded amqtt broker), TLS against a real Mosquitto, and the [mqtt] config keys."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from agent.runtime.host import ModelHost
from agent.telemetry.connection import TlsOptions, parse_mqtt_url
from agent.telemetry.reporter import Reporter
from fleet.broker.embedded import EmbeddedBroker
from fleet.broker.passwords import hash_password
from shared.telemetry import messages, topics

from ..conftest import free_port
from ..tls_broker import TlsBroker, make_tls_broker


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Watcher:
    """A subscriber to one device's telemetry (MQTT 3.1.1, works on every broker)."""

    def __init__(self, url: str, device: str, *, ca_file: Path | None = None,
                 user: tuple[str, str] | None = None) -> None:
        addr = parse_mqtt_url(url)
        self.got: list[tuple[str, bool, Any]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        if user:
            self.client.username_pw_set(*user)
        if addr.tls:
            self.client.tls_set_context(ssl.create_default_context(cafile=str(ca_file)))
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.device = device
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        assert self.ready.wait(15), "watcher did not subscribe"

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(topics.topic(self.device, "status"), qos=1)
        client.subscribe(topics.topic(self.device, "health"), qos=1)
        self.ready.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        _, kind = topics.parse_topic(msg.topic)
        with self.lock:
            self.got.append((kind, bool(msg.retain), messages.decode(kind, msg.payload)))

    def has(self, kind: str, pred: Callable[[Any], bool] = lambda m: True) -> bool:
        with self.lock:
            return any(k == kind and pred(m) for k, _, m in self.got)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def reporter(url: str, state_dir: Path, device: str = "dev-p", **kw: Any) -> Reporter:
    return Reporter(device_id=device, mqtt_url=url, state_dir=state_dir, host=ModelHost(),
                    health_interval_s=3600, **kw)


def test_negotiates_mqtt5_with_mosquitto(mosquitto: Any, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.telemetry.reporter")
    watcher = Watcher(mosquitto.url, "dev-p")
    rep = reporter(mosquitto.url, tmp_path)
    rep.start()
    try:
        assert rep.connected.wait(15)
        assert rep.negotiated == "5" and rep.client.protocol == mqtt.MQTTv5
        rep.publish_health()
        assert rep.flush(15)
        wait_for(lambda: watcher.has("health") and watcher.has("status", lambda m: m.online),
                 what="birth and health over MQTT 5")
        assert "speaks MQTT 5" in caplog.text and "falling back" not in caplog.text
    finally:
        rep.stop()
        watcher.close()


def test_pinned_311_with_mosquitto(mosquitto: Any, tmp_path: Path) -> None:
    rep = reporter(mosquitto.url, tmp_path, protocol="3.1.1")
    rep.start()
    try:
        assert rep.connected.wait(15)
        assert rep.negotiated == "3.1.1" and rep.client.protocol == mqtt.MQTTv311
    finally:
        rep.stop()


@pytest.fixture
def amqtt() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_falls_back_to_311_on_amqtt_and_keeps_it(amqtt: EmbeddedBroker, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.telemetry.reporter")
    watcher = Watcher(amqtt.url, "dev-p")
    # amqtt does not answer an MQTT 5 CONNECT with a will: the CONNACK timeout decides.
    rep = reporter(amqtt.url, tmp_path, connack_timeout_s=2.0)
    rep.start()
    try:
        wait_for(rep.connected.is_set, what="the 3.1.1 connection")
        assert rep.negotiated == "3.1.1" and rep.client.protocol == mqtt.MQTTv311
        rep.publish_health()
        assert rep.flush(15)
        wait_for(lambda: watcher.has("health") and watcher.has("status", lambda m: m.online),
                 what="birth and health over 3.1.1")
        # A broker restart: the reporter reconnects with 3.1.1 at once, no new refusal.
        watcher.close()
        amqtt.stop()
        wait_for(lambda: not rep.connected.is_set(), what="the disconnect")
        amqtt.start()
        wait_for(rep.connected.is_set, timeout=40, what="the reconnect")
        assert caplog.text.count("falling back to 3.1.1") == 1
        assert caplog.text.count("speaks MQTT 3.1.1") == 1
        assert rep.client.protocol == mqtt.MQTTv311
    finally:
        rep.stop()


def test_pinned_5_does_not_fall_back(amqtt: EmbeddedBroker, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.telemetry.reporter")
    rep = reporter(amqtt.url, tmp_path, protocol="5", connack_timeout_s=0.5)
    rep.start()
    try:
        time.sleep(3)  # well past the CONNACK timeout that makes "auto" fall back
        assert not rep.connected.is_set() and rep.client.protocol == mqtt.MQTTv5
        assert "falling back" not in caplog.text
    finally:
        rep.stop()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    from ..conftest import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed: apt-get install mosquitto")
    broker = make_tls_broker(tmp_path / "broker")
    broker.password_file.write_text(
        f"dev-t:{hash_password('dev-secret')}\nedgefleet-fleet:{hash_password('fleet-secret')}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_tls_with_the_ca(tls_broker: TlsBroker, tmp_path: Path) -> None:
    watcher = Watcher(tls_broker.fleet_url, "dev-t", ca_file=tls_broker.ca_file,
                      user=("edgefleet-fleet", "fleet-secret"))
    rep = reporter(tls_broker.url, tmp_path / "state", "dev-t", username="dev-t",
                   password="dev-secret", tls=TlsOptions(ca_file=tls_broker.ca_file))
    rep.start()
    try:
        assert rep.connected.wait(15), rep.last_error
        assert rep.negotiated == "5" and rep.last_error is None
        rep.publish_health()
        assert rep.flush(15)
        wait_for(lambda: watcher.has("health"), what="health over TLS")
    finally:
        rep.stop()
        watcher.close()


def test_tls_refuses_a_broker_signed_by_another_ca(tls_broker: TlsBroker, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="agent.telemetry.reporter")
    rep = reporter(tls_broker.url, tmp_path / "state", "dev-t", username="dev-t",
                   password="dev-secret", tls=TlsOptions(ca_file=tls_broker.other_ca_file))
    rep.start()
    try:
        wait_for(lambda: rep.last_error is not None, what="the TLS refusal")
        assert "certificate" in (rep.last_error or "") and str(tls_broker.other_ca_file) in rep.last_error
        assert not rep.connected.is_set()
        assert "was refused" in caplog.text
    finally:
        rep.stop()


def test_wrong_password_is_reported(tls_broker: TlsBroker, tmp_path: Path) -> None:
    rep = reporter(tls_broker.url, tmp_path / "state", "dev-t", username="dev-t",
                   password="wrong", tls=TlsOptions(ca_file=tls_broker.ca_file))
    rep.start()
    try:
        wait_for(lambda: rep.last_error is not None, what="the refusal")
        assert "refused the MQTT 5 connection" in (rep.last_error or "")
        assert not rep.connected.is_set()
    finally:
        rep.stop()


# -- [mqtt] config --------------------------------------------------------------------


def _config(tmp_path: Path, **mqtt: Any) -> Any:
    return parse_config({"state_dir": "s", "trust_root": "r.json", "device_id": "d1", "mqtt": mqtt},
                        base_dir=tmp_path)


def test_config_tls_and_protocol(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    cfg = _config(tmp_path, url="mqtts://b:8883", protocol="3.1.1", ca_file="ca.crt")
    assert cfg.mqtt.protocol == "3.1.1" and cfg.mqtt.ca_file == tmp_path / "ca.crt"
    assert cfg.mqtt.tls_insecure is False
    assert _config(tmp_path, url="mqtt://b").mqtt.protocol == "auto"


@pytest.mark.parametrize(("mqtt_table", "message"), [
    ({"url": "mqtt://b", "protocol": "4"}, "mqtt.protocol = '4' must be one of"),
    ({"url": "mqtts://b", "ca_file": "missing.crt"}, "mqtt.ca_file = 'missing.crt' is not a file"),
    ({"url": "mqtt://b", "tls_insecure": True}, "mqtt.tls_insecure = True needs a TLS URL"),
    ({"url": "mqtts://b", "tls_insecure": "yes"}, "mqtt.tls_insecure = 'yes' must be a bool"),
    ({"url": "http://b"}, "mqtt.url = 'http://b' must be a URL"),
])
def test_config_names_the_bad_key(tmp_path: Path, mqtt_table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _config(tmp_path, **mqtt_table)


def test_config_key_needs_cert(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"mqtt\.key_file = .* needs mqtt\.cert_file"):
        _config(tmp_path, url="mqtts://b", key_file="k.pem")

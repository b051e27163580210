"""Telemetry ingestion against a real Mosquitto, the embedded broker, and the app's lifespan."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fleet_support import ADMIN, ENROLL, admin, enroll
from litestar.testing import TestClient
from sqlmodel import Session, select

from fleet.app import create_app
from fleet.broker.client import parse_mqtt_url
from fleet.broker.embedded import BrokerStartError, EmbeddedBroker
from fleet.db.engine import make_engine
from fleet.db.models import Device, DeviceEvent, HealthReport
from fleet.ingest.ingester import Ingester
from fleet.settings import Settings
from shared.telemetry import messages, topics

from ..waiting import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health(device_id: str, seq: int, release: int = 1, inferences: int = 10, errors: int = 1) -> bytes:
    return messages.encode(
        messages.Health(
            v=1,
            device_id=device_id,
            seq=seq,
            ts=time.time(),
            interval_s=5.0,
            models=[
                messages.ModelHealth(
                    name="detector",
                    release=release,
                    version="1.0.0",
                    state="committed",
                    inferences=inferences,
                    errors=errors,
                    total_inferences=inferences,
                    total_errors=errors,
                    latency_p50_ms=1.5,
                    latency_p95_ms=4.0,
                )
            ],
            cpu_percent=12.0,
            mem_rss_mb=80.0,
            mem_percent=5.0,
            disk_free_mb=1000.0,
        )
    )


class Sender:
    def __init__(self, url: str) -> None:
        target = parse_mqtt_url(url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.connect(target.host, target.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    with Session(engine) as s:
        s.add(Device(id="dev-1", labels={"site": "lab"}, credential_hash="x" * 64))
        s.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def ingester(sqlite_engine: Any, mosquitto: Any) -> Iterator[Ingester]:
    ing = Ingester(sqlite_engine, parse_mqtt_url(mosquitto.url), flush_interval_s=0.05)
    ing.start(wait=10)
    assert ing.connected.is_set()
    yield ing
    ing.stop()


def test_ingests_valid_messages_and_counts_bad_ones(
    ingester: Ingester, mosquitto: Any, sqlite_engine: Any
) -> None:
    sender = Sender(mosquitto.url)
    try:
        sender.send(
            topics.topic("dev-1", "status"),
            messages.encode(
                messages.Status(v=1, device_id="dev-1", online=True, ts=time.time(), agent_version="0.1.0")
            ),
        )
        for seq in range(1, 4):
            sender.send(topics.topic("dev-1", "health"), health("dev-1", seq))
        sender.send(
            topics.topic("dev-1", "event"),
            messages.encode(
                messages.Event(
                    v=1,
                    device_id="dev-1",
                    seq=4,
                    ts=time.time(),
                    model="detector",
                    kind="failed",
                    release=2,
                    reason="hash",
                    message="blob hash mismatch",
                )
            ),
        )
        # malformed and misdirected messages: each counted, none fatal
        sender.send(topics.topic("dev-1", "health"), b"{not json")
        sender.send(topics.topic("dev-1", "health"), b'{"v": 1}')
        sender.send(topics.topic("dev-1", "health"), health("dev-2", 1))  # names another device
        sender.send(
            topics.topic("dev-1", "event"),
            b'{"v":1,"device_id":"dev-1","seq":1,"ts":1,"model":"m","kind":"exploded","release":1}',
        )
        sender.send(topics.topic("ghost", "health"), health("ghost", 1))  # not enrolled
        sender.send("edgefleet/v1/devices/dev-1/health", b"\xff\xfe" * 10)
        # still alive afterwards
        sender.send(topics.topic("dev-1", "health"), health("dev-1", 9, errors=0))

        def settled() -> bool:
            snap = ingester.stats.snapshot()
            # all six valid messages (status, 3 health, event, last health) and six refusals
            return snap["written"] >= 6 and sum(snap["rejected"].values()) >= 6

        wait_for(settled)
    finally:
        sender.close()
    snap = ingester.stats.snapshot()
    assert snap["rejected"] == {"malformed": 5, "unknown_device": 1}, snap
    with Session(sqlite_engine) as s:
        device = s.get(Device, "dev-1")
        assert device is not None
        assert device.online and device.agent_version == "0.1.0" and device.last_seen is not None
        assert device.models["detector"]["release"] == 1
        assert device.last_health is not None and device.last_health["seq"] == 9
        rows = s.exec(select(HealthReport).where(HealthReport.device_id == "dev-1")).all()
        assert sorted(r.seq for r in rows) == [1, 2, 3, 9]
        assert rows[0].p95_ms == 4.0 and rows[0].cpu_percent == 12.0
        (event,) = s.exec(select(DeviceEvent)).all()
        assert (event.kind, event.release, event.reason) == ("failed", 2, "hash")


def test_handle_refuses_off_layout_topics(ingester: Ingester) -> None:
    assert not ingester.handle("other/topic", b"{}")
    assert not ingester.handle(topics.topic("dev-1", "desired"), b"{}")
    assert ingester.stats.rejected["topic"] == 2


def test_status_offline_last_will(ingester: Ingester, mosquitto: Any, sqlite_engine: Any) -> None:
    sender = Sender(mosquitto.url)
    try:
        for online in (True, False):
            sender.send(
                topics.topic("dev-1", "status"),
                messages.encode(messages.Status(v=1, device_id="dev-1", online=online, ts=time.time())),
                retain=True,
            )
        wait_for(lambda: ingester.stats.snapshot()["written"] >= 2)
    finally:
        sender.close()
    with Session(sqlite_engine) as s:
        device = s.get(Device, "dev-1")
        assert device is not None and device.online is False


def test_embedded_broker_start_stop_and_port_in_use() -> None:
    port = free_port()
    broker = EmbeddedBroker("127.0.0.1", port)
    broker.start()
    try:
        with pytest.raises(BrokerStartError, match="already in use"):
            EmbeddedBroker("127.0.0.1", port).start()
        got: list[bytes] = []
        done = threading.Event()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sub.on_message = lambda c, u, m: (got.append(m.payload), done.set())
        sub.connect("127.0.0.1", port)
        sub.subscribe("edgefleet/v1/devices/+/health", qos=1)
        sub.loop_start()
        time.sleep(0.2)
        sender = Sender(broker.url)
        sender.send(topics.topic("d", "health"), b"hello")
        assert done.wait(5) and got == [b"hello"]
        sender.close()
        sub.disconnect()
        sub.loop_stop()
    finally:
        broker.stop()
    # the port is free again
    again = EmbeddedBroker("127.0.0.1", port)
    again.start()
    again.stop()


def test_app_lifespan_runs_embedded_broker_ingester_and_controller(tmp_path: Path, keyring: Any) -> None:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        keys_dir=keyring.directory,
        admin_token=ADMIN,
        enrollment_token=ENROLL,
        embedded_mqtt_port=port,
        controller_interval_s=0.1,
    )
    with TestClient(create_app(settings)) as client:
        enroll(client, "edge-1", site="lab")
        sender = Sender(f"mqtt://127.0.0.1:{port}")
        try:
            sender.send(topics.topic("edge-1", "health"), health("edge-1", 1, release=4))

            def seen() -> Any:
                d = client.get("/api/v1/devices/edge-1", headers=admin()).json()
                return d if d["models"] else None

            device = wait_for(seen)
        finally:
            sender.close()
        assert device["online"] and device["models"]["detector"]["release"] == 4
        assert device["health"]["cpu_percent"] == 12.0
        stats = client.get("/api/v1/stats", headers=admin()).json()
        assert stats["ingest"]["written"] >= 1


def test_persistent_session_keeps_health_sent_while_the_ingester_was_away(
    sqlite_engine: Any, mosquitto: Any
) -> None:
    """MQTT 5 session expiry: what devices send while the ingester is disconnected is queued
    by the broker and written once it is back, not dropped for lack of a subscriber."""
    ing = Ingester(sqlite_engine, parse_mqtt_url(mosquitto.url), shared_group="ingest",
                   session_expiry_s=60, flush_interval_s=0.05)
    ing.start(wait=10)
    try:
        assert ing.connected.is_set()
        ing.client.disconnect()  # a normal DISCONNECT keeps the session for its expiry
        ing.client.loop_stop()
        wait_for(lambda: not ing.connected.is_set())
        sender = Sender(mosquitto.url)
        try:
            for seq in range(1, 4):
                sender.send(topics.topic("dev-1", "health"), health("dev-1", seq))
        finally:
            sender.close()
        assert ing.stats.snapshot()["received"] == 0
        ing.client.reconnect()
        ing.client.loop_start()
        wait_for(lambda: ing.stats.snapshot()["written"] >= 3, timeout=15)
    finally:
        ing.stop()
    with Session(sqlite_engine) as s:
        rows = s.exec(select(HealthReport).where(HealthReport.device_id == "dev-1")).all()
        assert sorted(r.seq for r in rows) == [1, 2, 3]


def test_clean_session_without_expiry(sqlite_engine: Any) -> None:
    ing = Ingester(sqlite_engine, parse_mqtt_url("mqtt://127.0.0.1:9"), shared_group=None,
                   session_expiry_s=60)
    assert ing.session_expiry_s == 0  # MQTT 3.1.1 (embedded broker): no persistent session

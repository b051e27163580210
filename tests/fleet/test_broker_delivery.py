"""A subscriber gets only what its filter matches, once: on the embedded broker (amqtt, which
sent every connecting client the retained messages of every client's filters) and on
Mosquitto alike. Real brokers, real paho clients, MQTT 3.1.1 (what amqtt speaks)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from fleet.broker.embedded import EmbeddedBroker
from shared.telemetry import topics

from ..conftest import free_port
from ..waiting import wait_for

Received = tuple[str, bytes, bool]  # topic, payload, retain flag


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_port(request: pytest.FixtureRequest) -> Iterator[int]:
    if request.param == "mosquitto":
        yield request.getfixturevalue("mosquitto").port
        return
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        yield broker.port
    finally:
        broker.stop()


class Client:
    def __init__(self, port: int, *filters: str) -> None:
        self.got: list[Received] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if filters:
            self.client.subscribe([(f, 1) for f in filters])
            assert self.subscribed.wait(10), f"no SUBACK for {filters}"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, msg.payload, bool(msg.retain)))

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.got)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _settle(*clients: Client, quiet_s: float = 0.4) -> None:
    """Wait until no client has received anything for ``quiet_s``."""
    last = [sum(len(c.messages()) for c in clients), time.monotonic()]

    def quiet() -> bool:
        now = sum(len(c.messages()) for c in clients)
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] >= quiet_s

    wait_for(quiet, 10, "the brokers' deliveries to settle")


def test_a_subscriber_gets_only_what_its_filter_matches_once(broker_port: int) -> None:
    status_d1, desired_d1, desired_d2 = (topics.topic("d1", "status"), topics.topic("d1", "desired"),
                                         topics.topic("d2", "desired"))
    publisher = Client(broker_port)
    clients = [publisher]
    try:
        publisher.publish(status_d1, b"online", retain=True)
        publisher.publish(desired_d1, b"d1-r1", retain=True)
        publisher.publish(desired_d2, b"d2-r1", retain=True)
        # another client already holds a filter over every /desired
        fleet_side = Client(broker_port, topics.subscription("desired"))
        clients.append(fleet_side)
        wait_for(lambda: len(fleet_side.messages()) == 2, 10, "the fleet side's retained /desired")

        status_reader = Client(broker_port, topics.subscription("status"))
        clients.append(status_reader)
        wait_for(lambda: status_reader.messages(), 10, "the retained status")
        publisher.publish(desired_d1, b"d1-r2", retain=True)
        publisher.publish(status_d1, b"offline")
        device_d1 = Client(broker_port, desired_d1)  # a device: its own desired state only
        clients.append(device_d1)
        idle = Client(broker_port)  # subscribes to nothing
        clients.append(idle)
        _settle(*clients)

        assert status_reader.messages() == [(status_d1, b"online", True), (status_d1, b"offline", False)]
        assert device_d1.messages() == [(desired_d1, b"d1-r2", True)]
        assert idle.messages() == []
        # retained messages once, at its own SUBSCRIBE: never again when others subscribe
        assert sorted(fleet_side.messages()) == sorted([
            (desired_d1, b"d1-r1", True), (desired_d2, b"d2-r1", True), (desired_d1, b"d1-r2", False),
        ])
    finally:
        for c in clients:
            c.close()

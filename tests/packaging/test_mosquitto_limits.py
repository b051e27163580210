"""The shipped Mosquitto telemetry limits, run for real (packaging/mosquitto/edgefleet.conf as
shipped, its port rewritten): a payload over the fleet's 64 KiB never reaches a subscriber and
the device stays connected; a packet over 128 KiB ends the connection. The production config
carries the same limits."""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from shared.telemetry import messages

from ..conftest import Broker, free_port, mosquitto_binary
from .conftest import PACKAGING

LIMITS = ("message_size_limit", "max_packet_size", "max_queued_messages", "max_queued_bytes")
TOPIC = "edgefleet/v1/devices/dev-a/health"


def _limits(conf: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+) (\S+)$", conf, re.M) if m.group(1) in LIMITS}


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[Broker]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed: apt-get install mosquitto")
    port = free_port()
    text = (PACKAGING / "mosquitto" / "edgefleet.conf").read_text()
    text = text.replace("listener 1883 127.0.0.1\n", f"listener {port} 127.0.0.1\n")
    text = re.sub(r"^persistence true$", "persistence false", text, flags=re.M)
    assert f"listener {port}" in text
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    broker = Broker("127.0.0.1", port, None, conf)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_both_configs_carry_the_same_limits_and_the_fleet_s_message_bound() -> None:
    dev = _limits((PACKAGING / "mosquitto" / "edgefleet.conf").read_text())
    prod = _limits((PACKAGING / "mosquitto" / "edgefleet-production.conf").read_text())
    assert dev == prod and set(dev) == set(LIMITS)
    assert int(dev["message_size_limit"]) == messages.MAX_MESSAGE_BYTES


def test_an_oversized_message_is_dropped_alone_and_a_huge_packet_disconnects(shipped_broker: Broker) -> None:
    """MQTT 3.1.1: the broker acknowledges and drops the oversized message (the device goes on).
    (Mosquitto 2.0.11 refuses it to an MQTT 5 client with PUBACK 0x95, which paho takes for a
    protocol error and reconnects to resend; so the agent never sends one: agent.telemetry.)"""
    received: queue.Queue[int] = queue.Queue()
    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reader", protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, msg: received.put(len(msg.payload))
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(shipped_broker.host, shipped_broker.port)
    sub.subscribe(TOPIC, qos=1)
    sub.loop_start()

    gone = threading.Event()
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-a", protocol=mqtt.MQTTv311)
    dev.on_disconnect = lambda *a: gone.set()
    dev.connect(shipped_broker.host, shipped_broker.port)
    dev.loop_start()
    try:
        assert subscribed.wait(5)
        limit = messages.MAX_MESSAGE_BYTES
        dev.publish(TOPIC, b"x" * limit, qos=1).wait_for_publish(5)
        assert received.get(timeout=5) == limit
        dev.publish(TOPIC, b"y" * (limit + 1), qos=1).wait_for_publish(5)  # acknowledged, dropped
        dev.publish(TOPIC, b"z" * 10, qos=1).wait_for_publish(5)  # the device goes on
        assert received.get(timeout=5) == 10  # and the oversized one never arrived
        assert not gone.is_set()
        dev.publish(TOPIC, b"w" * 140_000, qos=1)
        assert gone.wait(5), "a packet over max_packet_size ends the connection"
        assert received.empty()
    finally:
        dev.loop_stop()
        sub.loop_stop()
        sub.disconnect()

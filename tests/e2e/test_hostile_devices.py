"""Rollout gates under hostile devices (issue 16), end to end: the real fleet app (uvicorn,
SQLite, controller, ingester), a real Mosquitto and real in-process agents serving live
traffic (and the same on the fleet's embedded broker), beside a hostile device that holds
only what enrollment gave it (the enrollment token, its own credential and broker account)
and publishes whatever it likes on its own topics with a plain MQTT client.

- a fake canary claiming a million healthy inferences of a faulty release (and plausible
  healthy windows, negative counts, NaN latencies and replays of its own reports) does not
  let the release pass: the canary fails on the real device's error rate and rolls back;
- a device flooding error reports does not roll back a release that the two real devices
  serve cleanly: it is set aside as the highest rate and the rollout succeeds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
import pytest

from fleet.demo.models import write_classifier
from shared.telemetry import messages, topics

from ..waiting import wait_for
from .rollout_rig import ENROLL, Rig, running_rig, serve_r1

CANARY, MAIN = "edge-01", "edge-02"
FAKE = "fake-canary"
TICK_S = 0.25


class HostileDevice:
    """An enrolled device that reports what it likes: every health message names the
    target release as committed, with the figures ``claims(tick)`` returns."""

    def __init__(self, rig: Rig, broker_url: str, device_id: str, labels: dict[str, str]) -> None:
        r = httpx.post(f"{rig.url}/api/v1/devices/enroll",
                       json={"device_id": device_id, "token": ENROLL, "labels": labels}, timeout=30)
        assert r.status_code == 201, r.text
        enrolled = r.json()
        self.device_id = device_id
        self.seq = 0
        self.sent = 0
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        url = urlsplit(broker_url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.username_pw_set(device_id, enrolled.get("broker_password") or enrolled["credential"])
        self.client.connect(url.hostname or "127.0.0.1", url.port or 1883)
        self.client.loop_start()
        status = messages.Status(v=1, device_id=device_id, online=True, ts=time.time())
        self.client.publish(topics.topic(device_id, "status"), messages.encode(status), qos=1, retain=True)

    def health(self, release: int, inferences: int, errors: int, *, p95_ms: float | None = 5.0) -> bytes:
        """One health message (MessagePack: it carries NaN where JSON could not)."""
        self.seq += 1
        model = messages.ModelHealth(
            name="clf", release=release, version=f"1.{release}", state="committed",
            inferences=inferences, errors=errors, total_inferences=inferences, total_errors=errors,
            latency_p50_ms=p95_ms, latency_p95_ms=p95_ms,
        )
        msg = messages.Health(v=1, device_id=self.device_id, seq=self.seq, ts=time.time(),
                              interval_s=TICK_S, models=[model], cpu_percent=1.0, mem_rss_mb=10.0,
                              mem_percent=1.0, disk_free_mb=1000.0)
        return messages.encode(msg, "msgpack")

    def publish(self, payload: bytes) -> None:
        self.client.publish(topics.topic(self.device_id, "health"), payload, qos=1).wait_for_publish(5)
        self.sent += 1

    def run(self, claims: Callable[[int], list[bytes]]) -> None:
        def loop() -> None:
            tick = 0
            while not self.stop_event.is_set():
                for payload in claims(tick):
                    self.publish(payload)
                tick += 1
                self.stop_event.wait(TICK_S)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(10)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(params=["mosquitto", "embedded"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Rig, str]]:
    """The rig on a real Mosquitto or on the fleet's embedded broker, and the broker's URL."""
    broker = request.getfixturevalue("mosquitto") if request.param == "mosquitto" else None
    labels = {CANARY: {"site": "lab", "ring": "canary"}, MAIN: {"site": "lab", "ring": "main"}}
    with running_rig(tmp_path, broker, traffic_pause_s=0.01, labels=labels) as r:  # ~100 requests/s
        serve_r1(r)
        yield r, r.app.state.ctx.mqtt_url


def _spec(bundle_id: int, stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "clf r2", "bundle_id": bundle_id, "selector": {"site": "lab"}, "stages": stages,
        "gates": {"max_error_rate": 0.05, "min_inferences": 40, "max_install_failures": 0},
        "silent_after_s": 30, "on_gate_failure": "rollback", "on_inconclusive": "fail",
    }


def _gate(status: dict[str, Any], name: str) -> dict[str, Any]:
    gate: dict[str, Any] = next(g for g in status["gates"] if g["gate"] == name)
    return gate


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_fake_canary_claiming_a_million_healthy_inferences_does_not_pass_a_faulty_release(
    world: tuple[Rig, str],
) -> None:
    rig, broker_url = world
    fake = HostileDevice(rig, broker_url, FAKE, {"site": "lab", "ring": "canary"})
    try:
        faulty = rig.upload(2, lambda p: write_classifier(p, faulty=True, seed=0))
        replay: list[bytes] = []

        def claims(tick: int) -> list[bytes]:
            out = [
                fake.health(2, 1_000_000, 0),  # a million healthy inferences every 0.25 s
                fake.health(2, 400, 0),  # plausible: 1,600 a second, none failing
                fake.health(2, 400, -1_000_000),  # negative errors: would make a pooled rate < 0
                fake.health(2, 400, 0, p95_ms=math.nan),
            ]
            replay[:] = replay or [out[1]]
            return [*out, *replay * 5]  # its own healthy report again and again

        fake.run(claims)
        status = rig.rollout(_spec(faulty, [
            {"name": "canary", "selector": {"ring": "canary"}, "bake_seconds": 3},
            {"name": "all", "percent": 100, "bake_seconds": 3},
        ]))
    finally:
        fake.close()
    assert fake.sent >= 18  # two ticks of claims at least
    assert status["state"] == "rolled_back", status.get("reason")
    assert "stage canary: error_rate" in status["reason"] and "gate max_error_rate" in status["reason"]
    assert {s["name"]: s["state"] for s in status["stages"]}["all"] == "pending"
    gate = _gate(status, "max_error_rate")
    per_device = gate["figures"]["per_device"]
    assert set(per_device) == {CANARY, FAKE}, per_device
    # the fake weighs no more than the real canary, whatever it claimed
    assert per_device[FAKE]["weight"] <= per_device[CANARY]["inferences"]
    assert per_device[FAKE]["rate"] == 0.0 and per_device[CANARY]["rate"] > 0.2
    assert gate["observed"] > 0.1
    # Whatever the ingester let through of the malformed and replayed claims (it may refuse
    # them first), the gate refused the rest, per device and reason.
    refused = gate["figures"]["refused"].get(FAKE, {})
    assert set(refused) <= {"implausible", "negative", "not_finite", "replayed", "unassigned"}, refused
    # the real canary ended back on a healthy release
    wait_for(lambda: (rig.active(CANARY)[0] or 0) > 2, timeout=30, what="the canary to be rolled back")


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_one_device_flooding_errors_does_not_roll_back_a_healthy_release(world: tuple[Rig, str]) -> None:
    rig, broker_url = world
    flood = HostileDevice(rig, broker_url, "flood-01", {"site": "lab", "ring": "main"})
    try:
        healthy = rig.upload(2, lambda p: write_classifier(p, seed=0))

        def claims(tick: int) -> list[bytes]:
            return [
                flood.health(2, 400, 400),  # every inference failing, 1,600 a second
                flood.health(2, 1_000_000, 1_000_000),  # a million failures
                flood.health(2, -5, 10**9),  # absurd
            ]

        flood.run(claims)
        status = rig.rollout(_spec(healthy, [{"name": "all", "percent": 100, "bake_seconds": 4}]))
    finally:
        flood.close()
    assert flood.sent >= 6
    assert status["state"] == "succeeded", status.get("reason")
    gate = _gate(status, "max_error_rate")
    assert gate["status"] == "pass" and gate["observed"] == 0.0, gate
    figures = gate["figures"]
    assert figures["set_aside_high"] == ["flood-01"], figures
    assert figures["per_device"]["flood-01"]["rate"] == 1.0
    assert {CANARY, MAIN} <= set(figures["per_device"])
    for device in (CANARY, MAIN):
        assert rig.active(device) == (2, "committed")

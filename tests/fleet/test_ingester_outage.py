"""Silence is judged with the ingestion path's own health: an ingester killed (SIGKILL) during a
rollout leaves its persistent shared-subscription session on the broker, which keeps taking its
share of the devices' telemetry until the session expires. The session expiry is held under a
rollout's silence deadline (fleet.ingest.ingester.MAX_SESSION_EXPIRY_S), so no device is counted
silent for it. Real Mosquitto, a real `edgefleet serve --role ingester` process, the real app,
SQLite and PostgreSQL.

Devices publish in a fixed order, so the broker's round robin sends each device's messages to the
same ingester: while the dead session lives, its devices are not heard at all (with the former
600 s expiry, they were counted silent after silent_after_s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from fleet_support import ADMIN, ENROLL, admin, enroll, free_port, make_bundle, upload
from litestar.testing import TestClient

from fleet.broker.client import parse_mqtt_url
from fleet.ingest.ingester import Ingester
from fleet.rollout.controller import RolloutController
from shared.telemetry import messages, topics

ROOT = Path(__file__).resolve().parents[2]
DEVICES = [f"d{i}" for i in range(4)]
SESSION_EXPIRY_S = 2  # the test's; the default is 60 s and at most 120 s
SILENT_AFTER_S = 4.0
PUBLISH_EVERY_S = 0.25


def _health(device: str, seq: int) -> bytes:
    model = messages.ModelHealth(name="detector", release=1, version="1.0.1", state="committed",
                                 inferences=10, errors=0, total_inferences=10 * seq, total_errors=0)
    return messages.encode(messages.Health(
        v=1, device_id=device, seq=seq, ts=time.time(), interval_s=PUBLISH_EVERY_S, models=[model],
        cpu_percent=1.0, mem_rss_mb=10.0, mem_percent=1.0, disk_free_mb=100.0, session="0000beef"))


def _metrics(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None


def _written(port: int) -> float:
    text = _metrics(port) or ""
    for line in text.splitlines():
        if line.startswith("edgefleet_ingest_written_total "):
            return float(line.split()[1])
    return 0.0


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.long
def test_killing_an_ingester_mid_rollout_marks_no_device_silent(
    client: TestClient[Any], keyring: Any, mosquitto: Any, tmp_path: Path
) -> None:
    ctx = client.app.state.ctx
    for d in DEVICES:
        enroll(client, d, site="lab")
    upload(client, make_bundle(tmp_path / "r1", keyring, release=1).path)
    r2 = upload(client, make_bundle(tmp_path / "r2", keyring, release=2).path).json()
    body = {"name": "r2", "bundle_id": r2["id"], "selector": {"site": "lab"},
            "stages": [{"name": "all", "percent": 100, "bake_seconds": 3600}],
            "gates": {"max_silent_devices": 0}, "silent_after_s": SILENT_AFTER_S,
            "on_gate_failure": "rollback"}
    r = client.post("/api/v1/rollouts", json=body, headers=admin())
    assert r.status_code == 201, r.text
    rid = int(r.json()["id"])
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=admin()).status_code == 200
    ctrl: RolloutController = ctx.controller

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEFLEET_MQTT_SESSION_EXPIRY_S": str(SESSION_EXPIRY_S)}
    cmd = [sys.executable, "-m", "fleet.cli.main", "serve", "--role", "ingester", "--port", str(port),
           "--database-url", ctx.settings.resolved_database_url(), "--mqtt-url", mosquitto.url,
           "--data-dir", str(tmp_path / "other"), "--keys", str(keyring.directory),
           "--admin-token", ADMIN, "--enrollment-token", ENROLL]
    with open(tmp_path / "ingester.log", "wb") as log:
        other = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    ours = Ingester(ctx.engine, parse_mqtt_url(mosquitto.url), shared_group="edgefleet-ingest",
                    session_expiry_s=SESSION_EXPIRY_S, flush_interval_s=0.05)
    ours.start(wait=10)
    stop = threading.Event()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devices")
    target = parse_mqtt_url(mosquitto.url)
    pub.connect(target.host, target.port)
    pub.loop_start()

    def publish() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            for d in DEVICES:  # a fixed order: each device keeps to one ingester
                pub.publish(topics.topic(d, "health"), _health(d, seq), qos=1)
            stop.wait(PUBLISH_EVERY_S)

    publisher = threading.Thread(target=publish, daemon=True)
    try:
        _wait(lambda: _metrics(port) is not None, 30, "the ingester process")
        assert other.poll() is None, (tmp_path / "ingester.log").read_text()
        publisher.start()
        _wait(lambda: _written(port) >= 4 and ours.stats.snapshot()["written"] >= 4, 30,
              "both ingesters to store health")
        ctrl.tick()
        os.kill(other.pid, signal.SIGKILL)  # no DISCONNECT: its session stays on the broker
        other.wait(10)
        killed = time.monotonic()
        seen_silent: list[dict[str, Any]] = []
        while time.monotonic() - killed < 2.5 * SILENT_AFTER_S:
            ctrl.tick()
            status = client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()
            seen_silent += [d for d in status["devices"] if d.get("progress") == "silent"]
            assert status["state"] == "running", status.get("reason")
            time.sleep(0.5)
        assert seen_silent == [], seen_silent
        devices = {d: client.get(f"/api/v1/devices/{d}", headers=admin()).json() for d in DEVICES}
        assert all(v["online"] for v in devices.values()), devices
    finally:
        stop.set()
        publisher.join(5) if publisher.is_alive() else None
        pub.loop_stop()
        pub.disconnect()
        ours.stop()
        if other.poll() is None:
            other.kill()
            other.wait(10)

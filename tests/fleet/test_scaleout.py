"""Scale-out: one active controller among several processes (PostgreSQL advisory lock,
or a file lock beside SQLite), and ingesters sharing the stream through MQTT 5 shared
subscriptions on Mosquitto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from fleet_support import ADMIN, ENROLL
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func
from sqlmodel import Session, select

from fleet.broker.client import parse_mqtt_url
from fleet.db.engine import make_engine, session_scope
from fleet.db.models import Device, HealthReport
from fleet.ingest.ingester import Ingester
from fleet.settings import Settings
from shared.bundle.keyring import Keyring
from shared.telemetry import messages, topics

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, name: str) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    return 0.0


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def controllers(
    db_url: str, mosquitto, keyring: Keyring, tmp_path: Path  # type: ignore[no-untyped-def]
) -> Iterator[list[tuple[subprocess.Popen[bytes], int]]]:
    make_engine(db_url).dispose()  # migrate once, before the processes race
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    env = {**os.environ, "EDGEFLEET_CONTROLLER_INTERVAL_S": "0.2", "PYTHONPATH": str(ROOT)}
    for i in range(2):
        port = _free_port()
        cmd = [
            sys.executable, "-m", "fleet.cli.main", "serve", "--role", "controller",
            "--port", str(port), "--database-url", db_url, "--mqtt-url", mosquitto.url,
            "--data-dir", str(tmp_path / f"d{i}"), "--keys", str(keyring.directory),
            "--admin-token", ADMIN, "--enrollment-token", ENROLL, "--log-format", "json",
        ]
        log = open(tmp_path / f"controller{i}.log", "wb")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), port))
    try:
        for _proc, port in procs:
            _wait(lambda p=port: _metric(p, "edgefleet_controller_active") is not None, 30, "a controller")
        yield procs
    finally:
        for proc, _port in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_one_controller_acts_and_another_takes_over(
    controllers: list[tuple[subprocess.Popen[bytes], int]], tmp_path: Path
) -> None:
    ports = [port for _proc, port in controllers]

    def active() -> list[int]:
        return [p for p in ports if _metric(p, "edgefleet_controller_active") == 1.0]

    _wait(lambda: len(active()) == 1, 20, "one active controller")
    leader = active()[0]
    standby = next(p for p in ports if p != leader)
    ticks = _metric(leader, "edgefleet_controller_ticks_total") or 0.0
    time.sleep(1.5)
    assert active() == [leader], "only one controller may act"
    assert (_metric(leader, "edgefleet_controller_ticks_total") or 0.0) > ticks
    assert _metric(standby, "edgefleet_controller_ticks_total") == 0.0

    proc = next(proc for proc, port in controllers if port == leader)
    os.kill(proc.pid, signal.SIGKILL)  # no goodbye: the lock must go with the process
    proc.wait(10)
    started = time.monotonic()
    _wait(lambda: _metric(standby, "edgefleet_controller_active") == 1.0, 20, "the standby to take over")
    took = time.monotonic() - started
    _wait(lambda: (_metric(standby, "edgefleet_controller_ticks_total") or 0.0) > 2, 10, "ticks")
    print(f"takeover after SIGKILL: {took:.2f} s")
    log = (tmp_path / "controller0.log").read_text() + (tmp_path / "controller1.log").read_text()
    assert "took the leader lock" in log and '"level": "info"' in log


def _health(device_id: str, seq: int) -> bytes:
    model = messages.ModelHealth(
        name="detector", release=1, version="1.0.0", state="committed", inferences=10, errors=0,
        total_inferences=10 * (seq + 1), total_errors=0, latency_p95_ms=5.0,
    )
    return messages.encode(
        messages.Health(
            v=messages.VERSION, device_id=device_id, seq=seq, ts=time.time(), interval_s=10.0,
            models=[model], cpu_percent=1.0, mem_rss_mb=10.0, mem_percent=1.0, disk_free_mb=100.0,
        )
    )


def test_two_ingesters_share_the_stream(db_url: str, mosquitto) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(db_url)
    devices = [f"dev-{i:02d}" for i in range(10)]
    with session_scope(engine) as session:
        for d in devices:
            session.add(Device(id=d, credential_hash="x" * 64))
    target = parse_mqtt_url(mosquitto.url)
    ingesters = [Ingester(engine, target, shared_group="edgefleet-ingest", flush_interval_s=0.05)
                 for _ in range(2)]
    for ing in ingesters:
        ing.start(wait=5.0)
    try:
        assert all(ing.shared for ing in ingesters), "Mosquitto offers shared subscriptions"
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-pub")
        pub.connect(target.host, target.port)
        pub.loop_start()
        sent = 0
        for seq in range(20):
            for d in devices:
                pub.publish(topics.topic(d, "health"), _health(d, seq), qos=1).wait_for_publish(5)
                sent += 1
        pub.loop_stop()
        pub.disconnect()

        def stored() -> int:
            with Session(engine) as session:
                return int(session.exec(select(func.count()).select_from(HealthReport)).one())

        _wait(lambda: stored() == sent, 20, f"{sent} reports stored")
        time.sleep(0.3)
        assert stored() == sent, "each message is stored once"
        written = [ing.stats.snapshot()["written"] for ing in ingesters]
        assert sum(written) == sent
        assert all(w > 0 for w in written), f"both ingesters take part: {written}"
    finally:
        for ing in ingesters:
            ing.stop()
        engine.dispose()


def test_shared_subscription_only_with_an_external_broker() -> None:
    assert Settings().shared_subscription() is False  # embedded amqtt: plain subscriptions
    assert Settings(mqtt_url="mqtt://broker:1883").shared_subscription() is True
    off = Settings(mqtt_url="mqtt://broker:1883", mqtt_shared_subscription=False)
    assert off.shared_subscription() is False
    ing = Ingester(make_engine("sqlite://"), parse_mqtt_url("mqtt://127.0.0.1:9"), shared_group="g")
    ing.shared = True
    assert ing.subscription("health") == "$share/g/edgefleet/v1/devices/+/health"
    assert ing.subscription("status") == "edgefleet/v1/devices/+/status"  # retained birth/will reach all

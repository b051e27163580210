"""The ingester takes both telemetry encodings without a setting: two real agent reporters,
one sending MessagePack (the default) and one JSON, through a real Mosquitto."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from sqlmodel import Session, select

from agent.runtime.host import ModelHost
from agent.telemetry.reporter import Reporter
from fleet.broker.client import parse_mqtt_url
from fleet.db.engine import make_engine
from fleet.db.models import Device, DeviceEvent, HealthReport
from fleet.ingest.ingester import Ingester
from shared.telemetry import messages, topics

from ..waiting import wait_for


def test_ingester_stores_msgpack_and_json_reporters(mosquitto: Any, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    with Session(engine) as s:
        for d in ("dev-mp", "dev-js"):
            s.add(Device(id=d, labels={}, credential_hash="x" * 64))
        s.commit()
    ingester = Ingester(engine, parse_mqtt_url(mosquitto.url), flush_interval_s=0.05)
    ingester.start(wait=10)
    raw: dict[str, bytes] = {}
    spy = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    spy.on_message = lambda c, u, m: raw.setdefault(m.topic, m.payload)
    spy.connect(mosquitto.host, mosquitto.port)
    spy.subscribe(topics.subscription("health"), qos=1)
    spy.loop_start()
    reporters = {
        enc: Reporter(device_id=dev, mqtt_url=mosquitto.url, state_dir=tmp_path / dev, host=ModelHost(),
                      health_interval_s=3600, encoding=enc)
        for dev, enc in (("dev-mp", "msgpack"), ("dev-js", "json"))
    }
    try:
        for r in reporters.values():
            r.start()
            assert r.connected.wait(10)
            r.publish_health()
            r.event("detector", "failed", 2, 1, "hash", "blob hash mismatch")
            assert r.flush(10)

        # A health message with a model, as the agent encodes it (this reporter has none loaded).
        with_model = messages.encode(messages.Health(
            v=1, device_id="dev-mp", seq=10**6, ts=time.time(), interval_s=60.0,
            models=[messages.ModelHealth(name="detector", release=1, version="1.0.0", state="committed",
                                         inferences=10, errors=1, total_inferences=10, total_errors=1,
                                         latency_p50_ms=1.5, latency_p95_ms=4.0,
                                         drift_inputs={"x": 0.1}, drift=0.1)],
            cpu_percent=12.0, mem_rss_mb=80.0, mem_percent=5.0, disk_free_mb=1000.0), "msgpack")
        spy.publish(topics.topic("dev-mp", "health"), with_model, qos=1).wait_for_publish(5)

        def stored() -> bool:
            with Session(engine) as s:
                return (len(s.exec(select(HealthReport)).all()) == 1
                        and len(s.exec(select(DeviceEvent)).all()) == 2
                        and all(s.get(Device, d).last_health for d in ("dev-mp", "dev-js")))  # type: ignore[union-attr]

        wait_for(stored)
        wait_for(lambda: len(raw) == 2)
        time.sleep(0.3)  # a duplicate would be written in the next flush (every 0.05 s)
    finally:
        for r in reporters.values():
            r.stop()
        spy.loop_stop()
        spy.disconnect()
        ingester.stop()
    # On the wire: a positional MessagePack array and a JSON object, as configured.
    assert messages.detect(raw[topics.topic("dev-mp", "health")]) == "msgpack"
    assert raw[topics.topic("dev-mp", "health")][0] == 0xDC  # array 16: Health has 17 fields
    assert raw[topics.topic("dev-js", "health")].startswith(b"{")
    assert ingester.stats.snapshot()["rejected"] == {}
    with Session(engine) as s:
        (report,) = s.exec(select(HealthReport)).all()
        got = (report.device_id, report.seq, report.p95_ms, report.cpu_percent)
        assert got == ("dev-mp", 10**6, 4.0, 12.0)
        events = {e.device_id: (e.kind, e.release, e.from_release, e.reason, e.message)
                  for e in s.exec(select(DeviceEvent)).all()}
        assert events == {d: ("failed", 2, 1, "hash", "blob hash mismatch") for d in ("dev-mp", "dev-js")}
        for d in ("dev-mp", "dev-js"):
            device = s.get(Device, d)
            assert device is not None and device.last_health is not None
            assert device.last_health["device_id"] == d
        assert s.get(Device, "dev-mp").models["detector"]["release"] == 1  # type: ignore[union-attr]
    engine.dispose()

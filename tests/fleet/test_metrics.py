"""Prometheus metrics at /metrics and JSON log lines."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet_support import admin, bearer, enroll
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fleet import metrics
from fleet.broker.client import parse_mqtt_url
from fleet.ingest.ingester import Ingester
from fleet.logs import JsonFormatter
from shared.telemetry import messages, topics

Client = TestClient[Any]


def samples(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(s: dict[Any, float], name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def test_http_requests_denials_and_fleet_gauges(client: Client) -> None:
    before = samples(client)
    client.get("/api/v1/bundles", headers=admin())
    client.get("/api/v1/bundles")  # 401
    enroll(client, "dev-m")
    after = samples(client)
    route = "/api/v1/bundles"
    assert value(after, "edgefleet_http_requests_total", method="GET", route=route, status="200") == (
        value(before, "edgefleet_http_requests_total", method="GET", route=route, status="200") + 1
    )
    assert value(after, "edgefleet_http_requests_total", method="GET", route=route, status="401") >= 1
    assert value(after, "edgefleet_http_request_duration_seconds_count", method="GET", route=route) >= 2
    assert value(after, "edgefleet_http_denied_total", status="401", reason="no_token") >= 1
    assert value(after, "edgefleet_devices") == 1
    assert value(after, "edgefleet_devices_online") == 0
    assert value(after, "edgefleet_rollouts", state="running") == 0


def test_gate_hook_and_ingest_metrics(client: Client, tmp_path: Path) -> None:
    metrics.record_gate("max_error_rate", "fail")
    cred = enroll(client, "dev-i")
    assert cred
    ingester = Ingester(client.app.state.ctx.engine, parse_mqtt_url("mqtt://127.0.0.1:9"))
    health = messages.Health(
        v=messages.VERSION, device_id="dev-i", ts=datetime.now(UTC).timestamp() - 2.0, seq=1,
        interval_s=10.0, models=[], cpu_percent=1.0, mem_rss_mb=10.0, mem_percent=1.0, disk_free_mb=100.0,
    )
    assert ingester.handle(topics.topic("dev-i", "health"), messages.encode(health))
    assert not ingester.handle("edgefleet/v1/devices/dev-i/nonsense", b"{}")
    ingester.write_batch([ingester.queue.get_nowait()])
    s = samples(client)
    assert value(s, "edgefleet_gate_evaluations_total", gate="max_error_rate", result="fail") >= 1
    assert value(s, "edgefleet_ingest_received_total", kind="health") >= 1
    assert value(s, "edgefleet_ingest_rejected_total", reason="topic") >= 1
    assert value(s, "edgefleet_ingest_written_total") >= 1
    assert value(s, "edgefleet_ingest_lag_seconds_count") >= 1
    assert value(s, "edgefleet_ingest_lag_seconds_sum") >= 1.5
    assert value(s, "edgefleet_devices_online") == 1
    assert client.get("/api/v1/devices/dev-i/desired", headers=bearer(cred)).status_code == 200


def test_json_log_lines() -> None:
    record = logging.LogRecord("fleet.x", logging.WARNING, __file__, 1, "rollout %s paused", (3,), None)
    record.rollout_id = 3
    line = json.loads(JsonFormatter(role="controller").format(record))
    assert line["message"] == "rollout 3 paused"
    assert (line["level"], line["logger"], line["role"], line["rollout_id"]) == (
        "warning", "fleet.x", "controller", 3,
    )
    assert line["ts"].endswith("Z")

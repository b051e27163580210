"""Fleet side of update windows and locks (issue 9): the rollout's activation window reaches
the devices' desired state, a device staged and waiting is neither failed nor silent, and the
releases a device holds are stored and shown."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleet_support import admin, bearer, enroll, make_bundle, upload
from litestar.testing import TestClient
from sqlmodel import Session

from fleet.broker.client import parse_mqtt_url
from fleet.db.models import Device
from fleet.ingest.ingester import Ingester
from fleet.rollout import engine as eng
from fleet.rollout.progress import Progress, device_progress
from fleet.rollout.reports import DeviceState
from shared.bundle.keyring import Keyring
from shared.telemetry import messages

Client = TestClient[Any]


def _spec(**over: Any) -> dict[str, Any]:
    return {"name": "r", "bundle_id": 1, "stages": [{"name": "all"}], **over}


def test_spec_activation_window_is_validated() -> None:
    assert eng.parse_spec(_spec(activation_window="22:00-04:00")).activation_window == "22:00-04:00"
    assert eng.parse_spec(_spec()).activation_window is None
    for bad in ("2:00-05:00", "02:00-02:00", "02:00", "25:00-01:00"):
        with pytest.raises(eng.SpecError) as err:
            eng.parse_spec(_spec(activation_window=bad))
        assert err.value.field == "activation_window"


def test_staged_and_waiting_is_neither_failed_nor_silent() -> None:
    now = 10_000.0
    waiting = "r2 staged, waiting for the activation window 02:00-05:00 local time (rollout)"
    dev = DeviceState("d1", 0, release=1, state="staged", online=True, last_seen=now - 5,
                      assigned_at=now - 7200, waiting=waiting)
    p = device_progress(dev, 2, [], now=now, silent_after_s=300)
    assert p.progress is Progress.STAGED and p.reason is None
    assert p.detail == "staged, waiting for the activation window 02:00-05:00 local time (rollout)"
    # Silence still counts: a waiting device that stops reporting is silent.
    gone = DeviceState("d1", 0, release=1, state="staged", last_seen=now - 400, assigned_at=now - 7200,
                       waiting=waiting)
    assert device_progress(gone, 2, [], now=now, silent_after_s=300).progress is Progress.SILENT


def test_desired_state_carries_the_rollout_window_and_device_shows_held_releases(
    client: Client, keyring: Keyring, tmp_path: Path
) -> None:
    cred = enroll(client, "d1", site="lab")
    r1 = upload(client, make_bundle(tmp_path / "1", keyring, release=1).path).json()
    body = {"name": "windowed", "bundle_id": r1["id"], "selector": {"site": "lab"},
            "stages": [{"name": "all", "percent": 100}], "activation_window": "02:00-05:00"}
    r = client.post("/api/v1/rollouts", json=body, headers=admin())
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=admin()).status_code == 200
    desired = client.get("/api/v1/devices/d1/desired", headers=bearer(cred)).json()
    assert [(m["release"], m.get("activation_window")) for m in desired["models"]] == [(1, "02:00-05:00")]
    bad = client.post("/api/v1/rollouts", json={**body, "activation_window": "2-5"}, headers=admin())
    assert bad.status_code == 400 and "activation_window" in bad.text

    # The device reports what it holds and waits for; the ingester stores it, the API shows it.
    ingester = Ingester(client.app.state.ctx.engine, parse_mqtt_url("mqtt://127.0.0.1:1"),
                        flush_interval_s=0.05)
    health = messages.Health(
        v=messages.VERSION, device_id="d1", seq=1, ts=datetime.now(UTC).timestamp(), interval_s=10,
        models=[messages.ModelHealth(
            name="detector", release=1, version="1", state="staged", inferences=0, errors=0,
            total_inferences=0, total_errors=0, held=[1, 2],
            waiting="r2 staged, waiting for the update lock held by 'camera-app' until 12:00:00 UTC")],
        cpu_percent=0, mem_rss_mb=0, mem_percent=0, disk_free_mb=0)
    assert ingester.handle("edgefleet/v1/devices/d1/health", msgspec.json.encode(health))
    assert ingester.write_batch(ingester._drain()) == 1
    with Session(client.app.state.ctx.engine) as s:
        device = s.get(Device, "d1")
        assert device is not None and device.models["detector"]["held"] == [1, 2]
    shown = client.get("/api/v1/devices/d1", headers=admin()).json()
    assert shown["held"] == {"detector": [1, 2]}
    assert "camera-app" in shown["waiting"]["detector"]

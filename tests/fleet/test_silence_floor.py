"""A rollout's silent_after_s must outlast an ingester's death: with shared subscriptions the
broker keeps handing a dead ingester's session its share of the telemetry until the session
expires, so a device can go unheard for the expiry plus one health interval. A shorter
silent_after_s would count healthy devices silent (and roll back) whenever an ingester dies,
so the fleet refuses it at create with 400, naming both figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from fleet_support import admin, enroll, make_bundle, upload
from litestar.testing import TestClient

from fleet.app import create_app
from fleet.rollout import engine as eng
from fleet.settings import Settings
from shared.bundle.keyring import Keyring


def _spec(silent_after_s: float) -> eng.RolloutSpec:
    return eng.parse_spec({"name": "r", "bundle_id": 1, "stages": [{"name": "all"}],
                           "silent_after_s": silent_after_s})


def test_the_floor_is_the_session_expiry_plus_a_health_interval() -> None:
    eng.check_silence_floor(_spec(120), session_expiry_s=60, health_interval_s=60)
    with pytest.raises(eng.SpecError) as err:
        eng.check_silence_floor(_spec(119), session_expiry_s=60, health_interval_s=60)
    assert err.value.field == "silent_after_s"
    assert str(err.value) == (
        "silent_after_s: 119 s is shorter than the ingesters' session expiry (60 s, mqtt_session_expiry_s) "
        "plus the devices' health interval (60 s, device_health_interval_s): devices would count as "
        "silent whenever an ingester dies; set at least 120"
    )


def _create(client: TestClient[Any], bundle_id: int, silent_after_s: float) -> Any:
    body = {"name": "r", "bundle_id": bundle_id, "stages": [{"name": "all"}],
            "silent_after_s": silent_after_s}
    return client.post("/api/v1/rollouts", json=body, headers=admin())


def test_a_fleet_sharing_its_subscription_refuses_a_short_silence_at_create(
    settings: Settings, keyring: Keyring, tmp_path: Path
) -> None:
    shared = dataclasses.replace(settings, mqtt_shared_subscription=True, mqtt_session_expiry_s=300)
    with TestClient(create_app(shared)) as client:
        enroll(client, "d1", site="lab")
        bundle = upload(client, make_bundle(tmp_path, keyring, release=1).path).json()
        r = _create(client, bundle["id"], 30)
        assert r.status_code == 400, r.text
        # the expiry is capped at the ingester's own bound (120 s)
        detail = r.json()["detail"]
        assert "silent_after_s: 30 s is shorter than the ingesters' session expiry (120 s" in detail
        assert "health interval (60 s" in detail
        assert client.get("/api/v1/rollouts", headers=admin()).json() == []
        assert _create(client, bundle["id"], 180).status_code == 201


def test_a_fleet_without_shared_subscriptions_takes_a_short_silence(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    """One ingester (or the embedded broker): no session outlives it, so no floor."""
    enroll(client, "d1", site="lab")
    bundle = upload(client, make_bundle(tmp_path, keyring, release=1).path).json()
    assert _create(client, bundle["id"], 5).status_code == 201

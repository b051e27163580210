"""Shadow stages in the controller and the device endpoints, on SQLite and PostgreSQL: the
desired state carries the candidate, the device may fetch it, the ingester stores the shadow
figures, the gate decides, and stopping the rollout takes the candidate back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleet_support import admin, bearer, enroll, make_bundle, upload
from litestar.testing import TestClient
from sqlmodel import Session

from fleet.broker.client import parse_mqtt_url
from fleet.db.engine import session_scope
from fleet.db.models import Device
from fleet.ingest.ingester import Ingester
from fleet.rollout.assignments import set_assignment
from fleet.rollout.controller import RolloutController
from shared.bundle.keyring import Keyring
from shared.telemetry import messages, topics

Client = TestClient[Any]
MODEL = "detector"
SHADOW = {"name": "shadow", "mode": "shadow", "bake_seconds": 30, "shadow_sample_rate": 0.3}
ALL = {"name": "all", "percent": 100}
GATES = {"min_agreement": 0.95, "min_shadow_samples": 50, "min_devices": 2}


class Rig:
    def __init__(self, client: Client, keyring: Keyring, tmp: Path) -> None:
        self.client, self.keyring, self.tmp = client, keyring, tmp
        self.t0 = datetime.now(UTC).replace(microsecond=0)
        self.creds: dict[str, str] = {}
        self.seq = 0
        self.bundles: dict[int, Any] = {}
        engine = client.app.state.ctx.engine
        self.engine = engine
        # the real write path of the ingester, without a broker connection
        self.ingester = Ingester(engine, parse_mqtt_url("mqtt://127.0.0.1:1"))

    @property
    def ctrl(self) -> RolloutController:
        return self.client.app.state.ctx.controller  # type: ignore[no-any-return]

    def at(self, s: float) -> datetime:
        return self.t0 + timedelta(seconds=s)

    def bundle(self, release: int) -> int:
        b = make_bundle(self.tmp / f"r{release}", self.keyring, name=MODEL, release=release)
        r = upload(self.client, b.path)
        assert r.status_code == 201, r.text
        self.bundles[release] = b
        return int(r.json()["id"])

    def health(self, device: str, at: float, shadow: messages.ShadowHealth | None) -> None:
        self.seq += 1
        msg = messages.Health(
            v=1, device_id=device, seq=self.seq, ts=self.at(at).timestamp(), interval_s=1.0,
            models=[messages.ModelHealth(name=MODEL, release=1, version="1.0.0", state="committed",
                                         inferences=10, errors=0, total_inferences=10, total_errors=0,
                                         latency_p95_ms=2.0, shadow=shadow)],
            cpu_percent=1.0, mem_rss_mb=10.0, mem_percent=1.0, disk_free_mb=100.0,
        )
        for encoding in ("json", "msgpack"):  # both encodings carry the shadow figures
            if encoding == "msgpack":  # the fleet stores a (device, session, seq) once: a next seq
                self.seq += 1
                msg = msgspec.structs.replace(msg, seq=self.seq)
            assert self.ingester.handle(topics.topic(device, "health"), messages.encode(msg, encoding),
                                        received_at=self.at(at))
        items = []
        while not self.ingester.queue.empty():
            items.append(self.ingester.queue.get_nowait())
        assert self.ingester.write_batch(items) == len(items)

    def desired(self, device: str) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/devices/{device}/desired", headers=bearer(self.creds[device]))
        assert r.status_code == 200, r.text
        return {m["name"]: m for m in r.json()["models"]}

    def status(self, rid: int) -> Any:
        return self.client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()


@pytest.fixture
def rig(client: Client, keyring: Keyring, tmp_path: Path) -> Rig:
    r = Rig(client, keyring, tmp_path)
    for d in ("d1", "d2"):
        r.creds[d] = enroll(client, d, site="lab")
    r.creds["x1"] = enroll(client, "x1", site="elsewhere")
    serving = r.bundle(1)
    with session_scope(r.engine) as session:
        for d in ("d1", "d2", "x1"):
            set_assignment(session, d, MODEL, serving, None)
    for d in ("d1", "d2"):
        r.health(d, 0, None)
    return r


def fig(samples: int, agreed: int) -> messages.ShadowHealth:
    return messages.ShadowHealth(release=2, version="1.0.0", samples=samples, agreed=agreed,
                                 agreement=agreed / samples if samples else None, max_abs_error=0.01,
                                 cosine_min=0.99, candidate_p95_ms=2.5, current_p95_ms=2.0)


def start(rig: Rig, **over: Any) -> int:
    candidate = rig.bundle(2)
    body = {"name": "r2 shadow", "bundle_id": candidate, "selector": {"site": "lab"},
            "stages": [SHADOW, ALL], "gates": GATES, **over}
    r = rig.client.post("/api/v1/rollouts", json=body, headers=admin())
    assert r.status_code == 201, r.text
    rid = int(r.json()["id"])
    rig.ctrl.start(rid, now=rig.at(1))
    return rid


def test_desired_state_carries_the_candidate_and_the_device_may_fetch_it(rig: Rig) -> None:
    start(rig)
    entry = rig.desired("d1")[MODEL]
    assert entry["release"] == 1  # still serving r1
    sh = entry["shadow"]
    assert (sh["release"], sh["sample_rate"], sh["max_busy_fraction"]) == (2, 0.3, 0.25)
    assert "shadow" not in rig.desired("x1")[MODEL]
    b2 = rig.bundles[2]
    blob = next(iter(b2.blobs))
    for device, code in (("d1", 200), ("x1", 403)):
        h = bearer(rig.creds[device])
        assert rig.client.get(f"/api/v1/bundles/{sh['bundle_id']}/envelope", headers=h).status_code == code
        assert rig.client.get(f"/api/v1/blobs/{blob}", headers=h).status_code == code


def test_shadow_figures_are_ingested_and_a_disagreeing_candidate_is_stopped(rig: Rig) -> None:
    rid = start(rig)
    d = rig.ctrl.tick(rig.at(2))[rid]
    assert d.message == "stage shadow: 0 of 2 devices report r2 in shadow (2 assigned)"
    rig.health("d1", 3, fig(40, 10))
    rig.health("d2", 3, fig(40, 12))
    with Session(rig.engine) as s:
        dev = s.get(Device, "d1")
        assert dev is not None and dev.models[MODEL]["shadow"]["samples"] == 40
    d = rig.ctrl.tick(rig.at(4))[rid]
    assert d.verdict.value == "fail"
    status = rig.status(rid)
    assert status["state"] == "rolled_back"
    assert status["reason"].startswith(
        "stage shadow: shadow agreement 0.28 < 0.95 over 80 samples on 2 devices "
        "(r2 vs the serving release; 99% upper bound 0.403, effective sample 80, device spread 0.05) at ")
    assert status["reason"].endswith("(gate min_agreement)")
    assert {m["status"] for m in status["devices"]} == {"pending"}
    assert next(m for m in status["devices"] if m["device_id"] == "d1")["shadow"]["agreed"] == 10
    # nobody switched, and the candidate left the desired state
    for device in ("d1", "d2"):
        entry = rig.desired(device)[MODEL]
        assert entry["release"] == 1 and "shadow" not in entry


def test_pause_takes_the_candidate_back_and_resume_restarts_the_shadow(rig: Rig) -> None:
    rid = start(rig)
    assert "shadow" in rig.desired("d1")[MODEL]
    r = rig.client.post(f"/api/v1/rollouts/{rid}/pause", headers=admin())
    assert r.status_code == 200, r.text
    assert "shadow" not in rig.desired("d1")[MODEL]
    r = rig.client.post(f"/api/v1/rollouts/{rid}/resume", headers=admin())
    assert r.status_code == 200, r.text
    rig.ctrl.tick(rig.at(5))
    assert rig.desired("d2")[MODEL]["shadow"]["release"] == 2
    r = rig.client.post(f"/api/v1/rollouts/{rid}/abort", headers=admin())
    assert r.status_code == 200, r.text
    assert "shadow" not in rig.desired("d2")[MODEL]


def test_an_agreeing_candidate_passes_then_the_next_stage_switches(rig: Rig) -> None:
    rid = start(rig)
    # 2 x 60 agreeing samples: the 99 % Wilson lower bound (0.957) clears 0.95 (2 x 40 would not)
    rig.health("d1", 3, fig(60, 60))
    rig.health("d2", 3, fig(60, 60))
    d = rig.ctrl.tick(rig.at(10))[rid]
    assert d.verdict.value == "wait" and d.message == "stage shadow: bake 9 s of 30 s"
    d = rig.ctrl.tick(rig.at(40))[rid]
    assert d.verdict.value == "advance", d.message
    status = rig.status(rid)
    assert status["current_stage_name"] == "all"
    assert {m["status"] for m in status["devices"]} == {"assigned"}
    for device in ("d1", "d2"):
        entry = rig.desired(device)[MODEL]
        assert entry["release"] == 2 and "shadow" not in entry


def test_too_few_samples_is_inconclusive_and_pauses(rig: Rig) -> None:
    rid = start(rig)
    rig.health("d1", 3, fig(10, 10))
    rig.health("d2", 3, fig(5, 5))
    d = rig.ctrl.tick(rig.at(40))[rid]
    assert d.verdict.value == "inconclusive"
    status = rig.status(rid)
    assert status["state"] == "paused"
    # d1's 10 samples weigh no more than the largest other device's 5 (rollout gate policy)
    assert status["reason"].startswith("stage shadow: inconclusive: gate min_agreement has 10 of 50 samples")
    assert "shadow" not in rig.desired("d1")[MODEL]


def test_create_warns_when_a_shadow_stage_cannot_catch_the_slice_its_gate_implies(rig: Rig) -> None:
    """d1 and d2 reported 20 inferences in the last hour (10 in each encoding): at 0.3 of
    their requests over a 30 s bake the stage gathers a fraction of a sample, far from the
    103 that 0.95 needs."""
    candidate = rig.bundle(2)
    body = {"name": "r2 shadow", "bundle_id": candidate, "selector": {"site": "lab"},
            "stages": [SHADOW, ALL], "gates": GATES}
    r = rig.client.post("/api/v1/rollouts", json=body, headers=admin())
    assert r.status_code == 201, r.text
    (warning,) = r.json()["warnings"]
    assert warning.startswith("stage 'shadow': min_agreement 0.95 implies catching a 5% slice, but 2 of 2 "
                              "devices weighed x 0.00556 requests/s x sample rate 0.3 x bake 30 s = about "
                              "0 samples catch no disagreement at all"), warning
    assert "the stage needs about 103 (raise bake_seconds, shadow_sample_rate or devices)" in warning
    # a rollout without a shadow stage has nothing to warn about; GET carries no warnings
    r = rig.client.post("/api/v1/rollouts", json={**body, "name": "switch", "stages": [ALL],
                                                  "gates": {"max_error_rate": 0.1}}, headers=admin())
    assert r.status_code == 201 and r.json()["warnings"] == [], r.text
    assert "warnings" not in rig.status(int(r.json()["id"]))

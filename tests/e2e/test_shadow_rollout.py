"""Shadow evaluation end to end: the real fleet app (uvicorn, SQLite, controller, ingester),
a real Mosquitto broker and real in-process agents serving live traffic.

A candidate whose golden vectors pass but whose top class differs on field traffic is
stopped in shadow, with no device ever switching to it; a candidate that agrees passes the
shadow stage and the next stage activates it for real.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from agent.config import parse_config
from agent.errors import UnknownModelError
from agent.main import Agent
from fleet.app import create_app
from fleet.bundles.build import build_bundle
from fleet.db.engine import session_scope
from fleet.demo.models import field_traffic, golden_inputs, write_classifier
from fleet.demo.shadow_models import write_divergent_classifier
from fleet.rollout.controller import set_assignment
from fleet.settings import Settings
from shared.bundle.keyring import Keyring, init_keyring

from ..waiting import wait_for

ADMIN = "admin-" + "s" * 20
ENROLL = "enroll-" + "t" * 20
DEVICES = ("edge-01", "edge-02")
TERMINAL = {"succeeded", "rolled_back", "aborted", "paused"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Rig:
    url: str
    http: httpx.Client
    app: Any
    keyring: Keyring
    work: Path
    agents: dict[str, Agent]

    def upload(self, release: int, write: Callable[[Path], None]) -> int:
        model = self.work / f"clf-r{release}.onnx"
        write(model)
        out = self.work / f"clf-r{release}.bundle"
        build_bundle(model, name="clf", version=f"1.{release}", release=release, keyring=self.keyring,
                     out=out, golden_inputs=golden_inputs())
        r = self.http.post("/api/v1/bundles", content=out.read_bytes(),
                           headers={"Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 201), r.text
        return int(r.json()["id"])

    def rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        r = self.http.post(f"/api/v1/rollouts/{rid}/start")
        assert r.status_code == 200, r.text

        def finished() -> dict[str, Any] | None:
            status = self.http.get(f"/api/v1/rollouts/{rid}").json()
            return status if status["state"] in TERMINAL else None

        status: dict[str, Any] = wait_for(finished, timeout=120, what=f"rollout {rid} to finish")
        for e in status["events"]:  # shown on failure, and with -s
            print(f"{e['ts']} {e['kind']}: {e['message']}")
        return status

    def active(self, device: str) -> tuple[int | None, str]:
        rec = self.agents[device].store.load("clf")
        return (rec.active.release if rec and rec.active else None), str(rec.state if rec else "-")


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Any) -> Iterator[Rig]:
    keyring = init_keyring(tmp_path / "keys")
    settings = Settings(
        data_dir=tmp_path / "fleet", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keyring.directory, admin_token=ADMIN, enrollment_token=ENROLL,
        mqtt_url=mosquitto.url, controller_interval_s=0.25,
    )
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=20, what="uvicorn")
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {ADMIN}"})
    agents: dict[str, Agent] = {}
    stop = threading.Event()
    traffic: list[threading.Thread] = []
    try:
        for i, device in enumerate(DEVICES):
            cfg = parse_config({
                "device_id": device,
                "state_dir": str(tmp_path / device),
                "trust_root": str(keyring.root_path),
                "api": {"listen": "127.0.0.1:0"},
                "fleet": {"url": url, "enrollment_token": ENROLL, "labels": {"site": "lab"},
                          "poll_interval_s": 0.3},
                "mqtt": {"url": mosquitto.url, "health_interval_s": 0.5},
                "update": {"trial_seconds": 0.5},
            })
            agent = Agent(cfg)
            agent.start()
            agents[device] = agent
            t = threading.Thread(target=_traffic, args=(agent, stop, i), daemon=True)
            t.start()
            traffic.append(t)
        r = Rig(url, http, app, keyring, tmp_path, agents)
        wait_for(lambda: len(http.get("/api/v1/devices").json()) == len(DEVICES), timeout=30,
                 what="the agents to enroll")
        yield r
    finally:
        stop.set()
        for t in traffic:
            t.join(10)
        for agent in agents.values():
            agent.stop()
        http.close()
        server.should_exit = True
        thread.join(15)


def _traffic(agent: Agent, stop: threading.Event, seed: int) -> None:
    """A local application: field traffic (values up to 2.2), about 200 requests a second."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        try:
            agent.host.predict("clf", {"x": field_traffic(rng)})
        except UnknownModelError:
            stop.wait(0.05)
        stop.wait(0.005)


def _serve_r1(rig: Rig) -> None:
    bundle_id = rig.upload(1, lambda p: write_classifier(p, seed=0))
    with session_scope(rig.app.state.ctx.engine) as session:
        for device in DEVICES:
            set_assignment(session, device, "clf", bundle_id, None)
    for device in DEVICES:
        wait_for(lambda d=device: rig.active(d) == (1, "committed"), what=f"{device} to commit r1")


def _spec(bundle_id: int) -> dict[str, Any]:
    return {
        "name": "clf r2 in shadow first",
        "bundle_id": bundle_id,
        "selector": {"site": "lab"},
        "stages": [
            {"name": "shadow", "mode": "shadow", "bake_seconds": 2, "shadow_sample_rate": 0.5,
             "shadow_max_busy_fraction": 0.5},
            {"name": "all", "percent": 100},
        ],
        "gates": {"min_agreement": 0.95, "max_abs_error": 0.2, "min_shadow_samples": 100,
                  "max_candidate_p95_ratio": 50, "min_devices": 2},
        "on_inconclusive": "extend", "extend_seconds": 2, "max_extensions": 20,
    }


def _activated(rig: Rig, release: int) -> list[str]:
    """Devices that ever reported activating ``release`` (from the fleet's event table)."""
    from sqlmodel import Session, select

    from fleet.db.models import DeviceEvent

    with Session(rig.app.state.ctx.engine) as session:
        rows = session.exec(select(DeviceEvent).where(DeviceEvent.kind == "activated",
                                                      DeviceEvent.release == release)).all()
        return sorted({e.device_id for e in rows})


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_candidate_that_differs_on_live_traffic_is_stopped_in_shadow(rig: Rig) -> None:
    _serve_r1(rig)
    candidate = rig.upload(2, lambda p: write_divergent_classifier(p, seed=0))
    status = rig.rollout(_spec(candidate))

    assert status["state"] == "rolled_back", status["reason"]
    reason = status["reason"]
    assert reason.startswith("stage shadow: shadow agreement "), reason
    assert "< 0.95 over" in reason and "on 2 devices (r2 vs the serving release)" in reason, reason
    assert "(gate min_agreement)" in reason
    # No device switched: none was assigned r2, none activated it, all still serve r1.
    assert {d["status"] for d in status["devices"]} == {"pending"}, status["devices"]
    assert _activated(rig, 2) == []
    for device in DEVICES:
        assert rig.active(device) == (1, "committed")
        assert rig.agents[device].host.get("clf").release == 1  # type: ignore[union-attr]
    gate = next(g for g in status["gate_history"] if g["gate"] == "min_agreement" and g["status"] == "fail")
    assert gate["sample"] >= 100 and gate["observed"] < 0.95
    assert any("devices stopped shadowing, none switched" in e["message"] for e in status["events"])
    # the devices drop the candidate once the rollout stopped
    for device in DEVICES:
        wait_for(lambda d=device: rig.agents[d].host.shadow("clf") is None,
                 what=f"{device} to stop shadowing")


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_candidate_that_agrees_passes_shadow_and_is_then_activated(rig: Rig) -> None:
    _serve_r1(rig)
    candidate = rig.upload(2, lambda p: write_classifier(p, seed=0))  # same behaviour, new release
    status = rig.rollout(_spec(candidate))

    assert status["state"] == "succeeded", (status["reason"], status["last_evaluation"])
    passed = next(e["message"] for e in status["events"] if e["kind"] == "stage_passed")
    assert passed.startswith("stage shadow: passed in shadow (shadow agreement 1.00 >= 0.95 over "), passed
    assert passed.endswith("devices switch to r2"), passed
    for device in DEVICES:
        wait_for(lambda d=device: rig.active(d) == (2, "committed"), what=f"{device} to commit r2")
        assert rig.agents[device].host.shadow("clf") is None
    wait_for(lambda: _activated(rig, 2) == list(DEVICES), what="the fleet to store both activations")
    shadow = next(d["shadow"] for d in status["devices"] if d["device_id"] == DEVICES[0])
    assert shadow is None or shadow["release"] == 2

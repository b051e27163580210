"""Update locks end to end (issue #9): the real fleet app (uvicorn, SQLite, controller,
ingester), a real Mosquitto broker and real in-process agents serving live traffic.

An application on one device takes an update lock through the agent's local API. A rollout
to both devices commits on the other one at once; on the locked device the release is
downloaded and staged but not activated, the agent (local API, ``edgefleet-agent status``)
and the fleet (device API, rollout status) say it waits for that lock, and the rollout
neither fails, nor rolls back, nor counts the device as failed or silent, for longer than
its silent deadline and bake time. When the application releases the lock the device
activates the release at once, commits it, and the rollout completes.
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
from sqlmodel import Session, col, select

from agent.cli import cmd_status
from agent.client import AgentClient
from agent.config import parse_config
from agent.errors import UnknownModelError
from agent.main import Agent
from fleet.app import create_app
from fleet.bundles.build import build_bundle
from fleet.db.engine import session_scope
from fleet.db.models import DeviceEvent
from fleet.demo.models import field_traffic, golden_inputs, write_classifier
from fleet.rollout.controller import set_assignment
from fleet.settings import Settings
from shared.bundle.keyring import Keyring, init_keyring
from shared.timeutil import parse_ts

from ..waiting import wait_for

ADMIN = "admin-" + "s" * 20
ENROLL = "enroll-" + "t" * 20
LOCKED, FREE = "edge-01", "edge-02"
DEVICES = (LOCKED, FREE)
HOLDER = "camera-app"
TERMINAL = {"succeeded", "rolled_back", "aborted", "paused"}
# Short enough to trip inside the test if a waiting device were counted as silent (or, with
# the bake time, if the stage could pass without it), long enough for a loaded CI machine:
# the agents report health every 0.5 s.
SILENT_AFTER_S = 5.0
BAKE_S = 3.0
LOCK_WAIT = f"waiting for the update lock held by '{HOLDER}' until "


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

    def status(self, rid: int) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/rollouts/{rid}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def device(self, device_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def active(self, device: str) -> tuple[int | None, str]:
        rec = self.agents[device].store.load("clf")
        return (rec.active.release if rec and rec.active else None), str(rec.state if rec else "-")

    def local_api(self, device: str) -> AgentClient:
        api = self.agents[device].api
        assert api is not None and api.tcp_address is not None
        host, port = api.tcp_address
        return AgentClient(url=f"http://{host}:{port}", timeout=30)


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
    """The devices' own applications: field traffic, about 100 requests a second."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        try:
            agent.host.predict("clf", {"x": field_traffic(rng)})
        except UnknownModelError:
            stop.wait(0.05)
        stop.wait(0.01)


def _serve_r1(rig: Rig) -> None:
    bundle_id = rig.upload(1, lambda p: write_classifier(p, seed=0))
    with session_scope(rig.app.state.ctx.engine) as session:
        for device in DEVICES:
            set_assignment(session, device, "clf", bundle_id, None)
    for device in DEVICES:
        wait_for(lambda d=device: rig.active(d) == (1, "committed"), what=f"{device} to commit r1")


def _spec(bundle_id: int) -> dict[str, Any]:
    return {
        "name": "clf r2 to every device",
        "bundle_id": bundle_id,
        "selector": {"site": "lab"},
        "stages": [{"name": "all", "percent": 100, "bake_seconds": BAKE_S}],
        # Every count of bad news fails at once: a device counted as failed, rolled back or
        # silent would roll the rollout back; a stage short of its sample after the bake fails.
        "gates": {"max_install_failures": 0, "max_local_rollbacks": 0, "max_silent_devices": 0,
                  "max_error_rate": 0.05, "min_inferences": 20},
        "silent_after_s": SILENT_AFTER_S,
        "on_gate_failure": "rollback",
        "on_inconclusive": "fail",
    }


def _events(rig: Rig, device: str, release: int) -> list[str]:
    """The update events the fleet stored for ``device`` about ``release``, in order."""
    with Session(rig.app.state.ctx.engine) as session:
        rows = session.exec(select(DeviceEvent).where(DeviceEvent.device_id == device,
                                                      DeviceEvent.release == release)
                            .order_by(col(DeviceEvent.received_at), col(DeviceEvent.id))).all()
        return [e.kind for e in rows]


def _row(status: dict[str, Any], device: str) -> dict[str, Any]:
    row: dict[str, Any] = next(d for d in status["devices"] if d["device_id"] == device)
    return row


def _staged_waiting(rig: Rig) -> bool:
    """The locked device serves r1, its r2 staged and noted as waiting for the lock."""
    rec = rig.agents[LOCKED].store.load("clf")
    return bool(rec and rec.active and rec.active.release == 1 and str(rec.state) == "staged"
                and rec.target and rec.target.release == 2
                and rec.message.startswith(f"r2 staged, {LOCK_WAIT}"))


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_release_waits_for_an_update_lock_and_activates_when_it_is_released(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    _serve_r1(rig)
    app = rig.local_api(LOCKED)
    try:
        lease = app.acquire_lock(HOLDER, 120, reason="recording")
        assert lease["holder"] == HOLDER and lease["lease_s"] == 120

        candidate = rig.upload(2, lambda p: write_classifier(p, seed=1))
        r = rig.http.post("/api/v1/rollouts", json=_spec(candidate))
        assert r.status_code == 201, r.text
        rid = int(r.json()["id"])
        r = rig.http.post(f"/api/v1/rollouts/{rid}/start")
        assert r.status_code == 200, r.text

        # The free device takes r2; the locked one downloads and stages it, and waits.
        wait_for(lambda: rig.active(FREE) == (2, "committed"), what=f"{FREE} to commit r2")
        wait_for(lambda: _staged_waiting(rig), what=f"{LOCKED} to stage r2 and wait for the lock")
        assert rig.agents[LOCKED].host.get("clf").release == 1  # type: ignore[union-attr]

        # The agent says so: its local API ...
        locks = app.locks()
        assert [x["holder"] for x in locks["locks"]] == [HOLDER]
        waiting = locks["waiting"]
        assert list(waiting) == ["clf"] and waiting["clf"].startswith(f"r2 staged, {LOCK_WAIT}"), waiting
        assert waiting["clf"].endswith(" UTC"), waiting
        # ... and `edgefleet-agent status` (same state dir, read while the agent runs).
        capsys.readouterr()
        assert cmd_status(rig.agents[LOCKED].config, as_json=False) == 0
        out = capsys.readouterr().out
        assert "clf: state staged, active r1 (1.1), previous none, last target r2" in out, out
        assert f"  r2 staged, {LOCK_WAIT}" in out, out

        # The fleet sees it from the device's health reports: device API ...
        def fleet_sees_waiting() -> dict[str, Any] | None:
            doc = rig.device(LOCKED)
            w = doc["waiting"].get("clf") or ""
            return doc if w.startswith(f"r2 staged, {LOCK_WAIT}") else None

        device = wait_for(fleet_sees_waiting, timeout=30, what="the fleet to see the device waiting")
        assert device["models"]["clf"]["release"] == 1 and device["models"]["clf"]["state"] == "staged"
        assert device["held"]["clf"] == [1, 2], device["held"]
        assert rig.device(FREE)["waiting"] == {}

        # ... and the rollout: staged, waiting; neither failed nor silent.
        def rollout_sees_waiting() -> dict[str, Any] | None:
            status = rig.status(rid)
            if _row(status, FREE)["progress"] != "committed":  # the fleet hears it a little later
                return None
            return status if _row(status, LOCKED)["detail"].startswith(f"staged, {LOCK_WAIT}") else None

        status = wait_for(rollout_sees_waiting, timeout=30, what="the rollout to show the device waiting")
        locked = _row(status, LOCKED)
        assert (locked["status"], locked["progress"]) == ("assigned", "staged"), locked
        assert locked["reason"] is None, locked

        # Hold the lock past the silent deadline and the bake time, as the fleet's controller
        # counts them (its last evaluation minus the stage's start): all along, the rollout
        # runs and waits for the locked device, which stays staged and waiting, on r1.
        seen: list[dict[str, Any]] = []

        def outlasted_deadlines() -> bool:
            s = rig.status(rid)
            seen.append(s)
            row = _row(s, LOCKED)
            assert s["state"] == "running", (s["state"], s["reason"])
            assert (row["progress"], row["reason"]) == ("staged", None), row
            assert row["detail"].startswith(f"staged, {LOCK_WAIT}"), row
            assert s["progress"] == {"committed": 1, "staged": 1}, s["progress"]
            assert s["last_evaluation"] == "stage all: 1 of 2 devices report r2 committed (1 staged)", \
                s["last_evaluation"]
            assert _staged_waiting(rig)
            elapsed = (parse_ts(s["updated"]) - parse_ts(s["stage_started_at"])).total_seconds()
            return elapsed > SILENT_AFTER_S + BAKE_S + 1

        wait_for(outlasted_deadlines, timeout=60, interval=0.2,
                 what="the controller to evaluate past the silent deadline and the bake time")
        assert len(seen) > 1
        assert not {"failed", "rolled_back", "activated", "committed"} & set(_events(rig, LOCKED, 2))
        assert "staged" in _events(rig, LOCKED, 2)
        kinds = {e["kind"] for e in rig.status(rid)["events"]}
        settled = {"gate_failed", "inconclusive", "extended", "paused", "rolled_back", "reissued",
                   "stage_passed", "succeeded"}
        assert not kinds & settled, kinds

        # The application is done: it releases the lock and the device activates r2 at once.
        app.release_lock(HOLDER)
        assert app.locks()["locks"] == []
        wait_for(lambda: rig.active(LOCKED) == (2, "committed"), timeout=30, what=f"{LOCKED} to commit r2")

        def finished() -> dict[str, Any] | None:
            s = rig.status(rid)
            return s if s["state"] in TERMINAL else None

        status = wait_for(finished, timeout=60, what="the rollout to finish")
        for e in status["events"]:  # shown on failure, and with -s
            print(f"{e['ts']} {e['kind']}: {e['message']}")
        assert status["state"] == "succeeded", (status["reason"], status["last_evaluation"])
        assert {_row(status, d)["progress"] for d in DEVICES} == {"committed"}, status["devices"]
        assert status["progress"] == {"committed": 2}
        for d in DEVICES:
            assert rig.active(d) == (2, "committed")
            assert rig.agents[d].host.get("clf").release == 2  # type: ignore[union-attr]
        # the fleet stores the device's events (MQTT, batched) a little after its health state
        def commit_stored() -> list[str] | None:
            kinds = _events(rig, LOCKED, 2)
            return kinds if "committed" in kinds else None

        kinds_locked = wait_for(commit_stored, timeout=30, what=f"the fleet to store {LOCKED}'s commit of r2")
        assert kinds_locked.index("staged") < kinds_locked.index("activated"), kinds_locked
        assert "failed" not in kinds_locked and "rolled_back" not in kinds_locked, kinds_locked
        # nothing waits any more, on the device nor in the fleet
        assert app.locks()["waiting"] == {}
        wait_for(lambda: rig.device(LOCKED)["waiting"] == {}, timeout=30,
                 what="the fleet to drop the device's waiting note")
    finally:
        app.close()

"""The end-to-end rig of the rollout tests: the real fleet app (uvicorn, SQLite, controller,
ingester), a real Mosquitto broker and real in-process agents serving live traffic."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from agent.client import AgentClient
from agent.config import parse_config
from agent.errors import InferenceError, UnknownModelError
from agent.main import Agent
from fleet.app import create_app
from fleet.bundles.build import build_bundle
from fleet.db.engine import session_scope
from fleet.demo.models import field_traffic, golden_inputs, write_classifier
from fleet.rollout.assignments import set_assignment
from fleet.settings import Settings
from shared.bundle.keyring import Keyring, init_keyring

from ..waiting import wait_for

ADMIN = "admin-" + "s" * 20
ENROLL = "enroll-" + "t" * 20
DEVICES = ("edge-01", "edge-02")
TERMINAL = {"succeeded", "rolled_back", "aborted", "paused"}


def free_port() -> int:
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

    def local_api(self, device: str) -> AgentClient:
        api = self.agents[device].api
        assert api is not None and api.tcp_address is not None
        host, port = api.tcp_address
        return AgentClient(url=f"http://{host}:{port}", timeout=30)

    def active(self, device: str) -> tuple[int | None, str]:
        rec = self.agents[device].store.load("clf")
        return (rec.active.release if rec and rec.active else None), str(rec.state if rec else "-")


@contextmanager
def running_rig(
    tmp_path: Path, mosquitto: Any, *, traffic_pause_s: float,
    labels: dict[str, dict[str, str]] | None = None,
) -> Iterator[Rig]:
    """The fleet under uvicorn (SQLite, its controller and ingester) on ``mosquitto`` (None:
    the fleet's embedded broker), and an in-process agent per device in DEVICES with a local
    application sending it traffic (``labels``: a device's labels instead of ``{"site": "lab"}``)."""
    keyring = init_keyring(tmp_path / "keys")
    embedded_port = free_port()
    broker_url = mosquitto.url if mosquitto is not None else f"mqtt://127.0.0.1:{embedded_port}"
    settings = Settings(
        data_dir=tmp_path / "fleet", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keyring.directory, admin_token=ADMIN, enrollment_token=ENROLL,
        mqtt_url=mosquitto.url if mosquitto is not None else None, embedded_mqtt_port=embedded_port,
        controller_interval_s=0.25,
        # the agents' health interval below and a short ingester session, so rollouts may use a
        # silent_after_s of seconds (the fleet refuses one under their sum)
        mqtt_session_expiry_s=2, device_health_interval_s=0.5,
    )
    app = create_app(settings)
    port = free_port()
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
                "fleet": {"url": url, "enrollment_token": ENROLL,
                          "labels": (labels or {}).get(device, {"site": "lab"}),
                          "poll_interval_s": 0.3},
                "mqtt": {"url": broker_url, "health_interval_s": 0.5},
                "update": {"trial_seconds": 0.5},
            })
            agent = Agent(cfg)
            agent.start()
            agents[device] = agent
            t = threading.Thread(target=_traffic, args=(agent, stop, i, traffic_pause_s), daemon=True)
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


def _traffic(agent: Agent, stop: threading.Event, seed: int, pause_s: float) -> None:
    """A local application: field traffic (values up to 2.2), one request per ``pause_s``."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        try:
            agent.host.predict("clf", {"x": field_traffic(rng)})
        except UnknownModelError:
            stop.wait(0.05)
        except InferenceError:
            pass  # a faulty release: the agent counts the error, the application goes on
        stop.wait(pause_s)


def serve_r1(rig: Rig) -> None:
    bundle_id = rig.upload(1, lambda p: write_classifier(p, seed=0))
    with session_scope(rig.app.state.ctx.engine) as session:
        for device in DEVICES:
            set_assignment(session, device, "clf", bundle_id, None)
    for device in DEVICES:
        wait_for(lambda d=device: rig.active(d) == (1, "committed"), what=f"{device} to commit r1")

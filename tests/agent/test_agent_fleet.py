"""The assembled Agent against a small real HTTP server speaking the fleet's device API
(docs/architecture.md): enrollment, desired state, envelopes, blobs."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.config import AgentConfig
from agent.main import Agent
from agent.update.lifecycle import UpdateState
from shared.bundle.keyring import Keyring

from ..waiting import wait_for
from .conftest import Bundles, read_bundle

S = UpdateState


class StubFleet:
    """Serves bundles by id and a desired state per device; counts requests."""

    def __init__(self) -> None:
        self.token = "enroll-me"
        self.credentials: dict[str, str] = {}
        self.envelopes: dict[int, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.desired: list[dict[str, Any]] = []
        self.generation = 1
        self.requests: list[str] = []
        self.tamper_blob: str | None = None
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authed(self, device: str) -> bool:
                return self.headers.get("Authorization") == f"Bearer {fleet.credentials.get(device)}"

            def do_POST(self) -> None:
                fleet.requests.append(f"POST {self.path}")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/api/v1/devices/enroll" or body["token"] != fleet.token:
                    return self._reply(401, b'{"status_code": 401, "detail": "bad token"}')
                cred = f"cred-{len(fleet.credentials)}-{time.monotonic_ns()}"
                fleet.credentials[body["device_id"]] = cred
                self._reply(201, json.dumps({"device_id": body["device_id"], "credential": cred,
                                             "mqtt_url": None}).encode())

            def do_GET(self) -> None:
                fleet.requests.append(f"GET {self.path}")
                parts = self.path.split("/")
                if self.path.endswith("/desired"):
                    device = parts[4]
                    if not self._authed(device):
                        return self._reply(401, b"{}")
                    doc = {"device_id": device, "generation": fleet.generation, "server_time": time.time(),
                           "models": fleet.desired}
                    return self._reply(200, json.dumps(doc).encode())
                if not any(self._authed(d) for d in fleet.credentials):
                    return self._reply(401, b"{}")
                if self.path.startswith("/api/v1/bundles/"):
                    return self._reply(200, fleet.envelopes[int(parts[4])], "application/json")
                if self.path.startswith("/api/v1/blobs/"):
                    data = fleet.blobs[parts[4]]
                    if parts[4] == fleet.tamper_blob:
                        data = data + b"more bytes than the manifest allows"
                    return self._reply(200, data, "application/octet-stream")
                self._reply(404, b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def publish(self, bundle_id: int, bundle: Path, keyring: Keyring) -> dict[str, Any]:
        env, blobs = read_bundle(bundle)
        vm = keyring.trust_root().verify_manifest(env)
        self.envelopes[bundle_id] = env
        self.blobs.update(blobs)
        return {"name": vm.manifest.name, "release": vm.manifest.release, "digest": vm.digest,
                "bundle_id": bundle_id, "envelope_url": f"/api/v1/bundles/{bundle_id}/envelope",
                "blob_url": "/api/v1/blobs/{sha256}"}


@pytest.fixture
def fleet() -> Iterator[StubFleet]:
    f = StubFleet()
    t = threading.Thread(target=f.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f
    f.server.shutdown()
    f.server.server_close()


@pytest.fixture
def agent_factory(
    make_config: Callable[..., AgentConfig], fleet: StubFleet
) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(**update: Any) -> Agent:
        cfg = make_config(
            device_id="dev-1",
            fleet={"url": fleet.url, "enrollment_token": fleet.token, "labels": {"ring": "canary"},
                   "poll_interval_s": 0.2},
            update={"trial_seconds": 0.6, "trial_max_error_rate": 0.2, **update},
        )
        agent = Agent(cfg)
        agent.start()
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        a.stop()


def _record(agent: Agent) -> Any:
    return agent.store.load("clf")


def test_enroll_install_trial_commit_then_trial_errors_roll_back(
    fleet: StubFleet, agent_factory: Callable[..., Agent], bundles: Bundles, keyring: Keyring
) -> None:
    fleet.desired = [fleet.publish(1, bundles.build(1), keyring)]
    agent = agent_factory()
    rec = wait_for(lambda: (r := _record(agent)) and r.state == S.COMMITTED and r, what="r1 committed")
    assert rec.active.release == 1
    cred = agent.config.state_dir / "device.json"
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert "POST /api/v1/devices/enroll" in fleet.requests
    # Envelope first, then blobs.
    gets = [r for r in fleet.requests if "/bundles/" in r or "/blobs/" in r]
    assert "/bundles/1/envelope" in gets[0] and all("/blobs/" in g for g in gets[1:])

    host, port = agent.api.tcp_address  # type: ignore[union-attr, misc]
    api = httpx.Client(base_url=f"http://{host}:{port}", timeout=5)
    assert api.post("/v1/models/clf/predict", json={"inputs": {"x": [[0.1] * 4]}}).json()["release"] == 1

    # The faulty release passes its smoke test, then fails on field traffic during trial.
    fleet.desired = [fleet.publish(2, bundles.build(2, variant="faulty"), keyring)]
    agent.request_sync()
    wait_for(lambda: _record(agent).state == S.TRIAL, what="r2 on trial")
    for _ in range(10):
        api.post("/v1/models/clf/predict", json={"inputs": {"x": [[2.5] * 4]}})
    rec = wait_for(lambda: (r := _record(agent)) and r.state == S.ROLLED_BACK and r, what="rollback")
    assert rec.reason == "trial_errors" and rec.active.release == 1
    assert api.post("/v1/models/clf/predict", json={"inputs": {"x": [[2.5] * 4]}}).json()["release"] == 1
    # Still desired, but failed here: not retried.
    n = len(fleet.requests)
    time.sleep(0.5)
    assert not any("/bundles/2/" in r for r in fleet.requests[n:])

    # The fleet's answer: re-issue the healthy model as a higher release.
    fleet.desired = [fleet.publish(3, bundles.build(3, seed=0), keyring)]
    agent.request_sync()
    rec = wait_for(lambda: (r := _record(agent)) and r.state == S.COMMITTED and r.active.release == 3 and r,
                   what="r3 committed")
    api.close()


def test_restart_reuses_credential_and_reenrolls_on_401(
    fleet: StubFleet, agent_factory: Callable[..., Agent], bundles: Bundles, keyring: Keyring
) -> None:
    fleet.desired = [fleet.publish(1, bundles.build(1), keyring)]
    agent = agent_factory()
    wait_for(lambda: (r := _record(agent)) and r.state == S.COMMITTED, what="committed")
    agent.stop()
    enrolls = fleet.requests.count("POST /api/v1/devices/enroll")
    second = agent_factory()
    assert second.host.get("clf").release == 1  # type: ignore[union-attr]
    time.sleep(0.5)
    assert fleet.requests.count("POST /api/v1/devices/enroll") == enrolls
    fleet.credentials["dev-1"] = "rotated-elsewhere"
    wait_for(lambda: fleet.requests.count("POST /api/v1/devices/enroll") == enrolls + 1, what="re-enroll")


def test_oversized_blob_is_refused_and_nothing_changes(
    fleet: StubFleet, agent_factory: Callable[..., Agent], bundles: Bundles, keyring: Keyring
) -> None:
    fleet.desired = [fleet.publish(1, bundles.build(1), keyring)]
    agent = agent_factory()
    wait_for(lambda: (r := _record(agent)) and r.state == S.COMMITTED, what="committed")
    entry = fleet.publish(2, bundles.build(2, seed=1), keyring)
    _env, blobs = read_bundle(bundles.build(2, seed=1))
    fleet.tamper_blob = max(blobs, key=lambda k: len(blobs[k]))
    fleet.desired = [entry]
    agent.request_sync()
    rec = wait_for(lambda: (r := _record(agent)) and r.state == S.FAILED and r, what="failed")
    assert rec.reason == "length" and rec.active.release == 1
    assert agent.host.get("clf").release == 1  # type: ignore[union-attr]
    assert not (agent.config.state_dir / "blobs" / "sha256" / fleet.tamper_blob).exists()
    _ = np  # numpy is used by the fixtures' bundles

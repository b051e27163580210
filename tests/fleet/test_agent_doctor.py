"""``edgefleet-agent doctor`` against the real fleet and the shipped Mosquitto configuration:
every check ok once enrolled (the broker login really tried); a revoked device fails the
token and broker checks with their fixes; a running agent's connection is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from agent.fleet_client import FleetClient
from shared.bundle.keyring import Keyring

from . import test_device_identity_broker as shipped
from .fleet_support import ENROLL, admin, serve_fleet

REPO = Path(__file__).resolve().parents[2]
broker = shipped.broker  # the shipped Mosquitto configuration, as a fixture here too


def _doctor(cfg: Path) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    r = subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), "doctor"], cwd=REPO,
                       env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout.splitlines()


def _line(lines: list[str], name: str) -> str:
    found = [line for line in lines if line[6:].startswith(name + " ")]
    assert found, f"no {name} check in {lines}"
    return found[0]


def test_doctor_on_a_real_fleet_and_broker(broker: shipped.ShippedBroker, tmp_path: Path,
                                           keyring: Keyring) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    with serve_fleet(shipped.fleet_settings(tmp_path, keyring, broker)) as url, \
            httpx.Client(base_url=url) as http:
        cfg.write_text(f'device_id = "cam-doc"\nstate_dir = "{state}"\ntrust_root = "{keyring.root_path}"\n'
                       f'[fleet]\nurl = "{url}"\nenrollment_token = "{ENROLL}"\n'
                       f'[mqtt]\nca_file = "{broker.ca_file}"\n')
        state.mkdir()
        code, lines = _doctor(cfg)  # before enrollment: the agent enrolls on start
        assert code == 0, lines
        assert "not enrolled yet" in _line(lines, "enrolled")

        with httpx.Client() as client:
            FleetClient(url=url, device_id="cam-doc", enrollment_token=ENROLL, labels={},
                        state_dir=state, client=client).enroll()
        code, lines = _doctor(cfg)
        assert code == 0, lines
        for name in ("config", "trust", "state", "disk", "spool", "fleet", "clock", "token", "broker",
                     "login"):
            assert _line(lines, name).startswith("ok  "), lines
        assert "CONNACK 0" in _line(lines, "login") and "TLS verified" in _line(lines, "broker")
        assert lines[-1] == "all checks passed"

        assert http.post("/api/v1/devices/cam-doc/revoke", headers=admin()).status_code == 200
        code, lines = _doctor(cfg)
        assert code == 1 and lines[-1] == "2 check(s) failed", lines
        token = lines.index(_line(lines, "token"))
        assert lines[token].startswith("FAIL") and "HTTP 401" in lines[token]
        assert lines[token + 1].startswith("      fix: ") and "approve cam-doc" in lines[token + 1]
        assert _line(lines, "login").startswith("FAIL")


def test_doctor_leaves_a_running_agent_s_connection_alone(tmp_path: Path, keyring: Keyring,
                                                          mosquitto: Any) -> None:
    from agent.update.store import StateStore

    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "cam-doc"\nstate_dir = "{state}"\ntrust_root = "{keyring.root_path}"\n'
                   f'[mqtt]\nurl = "{mosquitto.url}"\n')
    code, lines = _doctor(cfg)  # the agent stopped: the login is tried
    assert code == 0 and "CONNACK 0" in _line(lines, "login"), lines
    store = StateStore(state)
    store.acquire()  # what the running agent holds
    try:
        code, lines = _doctor(cfg)
    finally:
        store.release()
    assert code == 0 and "not tried: the running agent holds" in _line(lines, "login"), lines
    mosquitto.stop()
    code, lines = _doctor(cfg)
    assert code == 1 and "unreachable" in _line(lines, "broker"), lines
    assert "fix: check the broker is running" in "\n".join(lines)

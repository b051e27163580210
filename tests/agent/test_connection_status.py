"""The agent's `status` (CLI, text and --json) and the local API's GET /v1/status show the
enrollment and the state of the fleet and broker links, as a real agent lives them: enrolled
at a fleet (a real HTTP server), connected to a real Mosquitto, then each one gone."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.cli import main
from agent.config import AgentConfig
from agent.connection_state import CONNECTION_FILE, ConnectionState, status_document, status_lines
from agent.main import Agent
from shared.bundle.keyring import Keyring

from ..conftest import Broker
from ..waiting import wait_for
from .test_agent_fleet import StubFleet


@pytest.fixture
def fleet() -> Iterator[StubFleet]:
    f = StubFleet()
    t = threading.Thread(target=f.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f
    f.server.shutdown()
    f.server.server_close()


def _cli_status(cfg: Path, capsys: pytest.CaptureFixture[str], *json_flag: str) -> str:
    capsys.readouterr()
    assert main(["--config", str(cfg), "status", *json_flag]) == 0
    return capsys.readouterr().out


def test_status_follows_the_fleet_and_the_broker(
    make_config: Callable[..., AgentConfig], fleet: StubFleet, mosquitto: Broker, tmp_path: Path,
    keyring: Keyring, capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_config(device_id="dev-1", mqtt={"url": mosquitto.url},
                         fleet={"url": fleet.url, "enrollment_token": fleet.token, "poll_interval_s": 0.2})
    cfg = tmp_path / "agent.toml"  # what an operator's `status` reads: the same state_dir
    cfg.write_text(f'state_dir = "{config.state_dir}"\ntrust_root = "{keyring.root_path}"\n')
    agent = Agent(config)
    agent.start()
    try:
        assert agent.api is not None and agent.api.tcp_address is not None
        host, port = agent.api.tcp_address
        api = f"http://{host}:{port}/v1/status"

        def api_status() -> dict[str, Any]:
            return httpx.get(api).json()  # type: ignore[no-any-return]

        doc = wait_for(lambda: (d := api_status())["fleet"]["reachable"] and d["broker"]["connected"]
                       and d, 30, "the fleet reached and the broker connected")
        assert doc["enrollment"]["enrolled"] and doc["enrollment"]["device_id"] == "dev-1"
        assert doc["fleet"]["url"] == fleet.url and doc["fleet"]["last_contact"] is not None
        assert doc["broker"]["url"] == mosquitto.url and doc["broker"]["since"] is not None
        assert "credential" not in json.dumps(doc["enrollment"]).replace('"enrolled"', "")
        out = _cli_status(cfg, capsys)
        assert f"fleet {fleet.url}: reachable, last contact 20" in out
        assert f"broker {mosquitto.url}: connected since 20" in out
        assert "enrollment: device dev-1 enrolled at" in out

        fleet.server.shutdown()
        fleet.server.server_close()
        mosquitto.stop()
        doc = wait_for(lambda: (d := api_status())["fleet"]["reachable"] is False
                       and not d["broker"]["connected"] and d["broker"]["last_error"] and d,
                       30, "the fleet unreachable and the broker disconnected")
        assert fleet.url.split("//")[1] in doc["fleet"]["last_error"]
        cli = json.loads(_cli_status(cfg, capsys, "--json"))
        assert cli["agent_running"] and cli["fleet"]["reachable"] is False and cli["models"] == []
        out = _cli_status(cfg, capsys)
        assert f"fleet {fleet.url}: unreachable, last contact 20" in out and "  last error 20" in out
        assert f"broker {mosquitto.url}: disconnected since 20" in out
    finally:
        agent.stop()


def test_a_stopped_agents_last_view_is_named_so(tmp_path: Path) -> None:
    state = ConnectionState(tmp_path, fleet_url="https://fleet.example.com", clock=lambda: 1_700_000_000.0)
    state.fleet_failed("GET https://fleet.example.com/api/v1/devices/dev-1/desired failed: refused")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    view = json.loads((tmp_path / CONNECTION_FILE).read_text())
    view["pid"] = int(dead.stdout)  # a process that has exited
    (tmp_path / CONNECTION_FILE).write_text(json.dumps(view))
    doc = status_document(tmp_path)
    assert doc["agent_running"] is False and doc["enrollment"]["enrolled"] is False
    lines = status_lines(doc, now=1_700_000_060.0)
    assert lines[1] == "agent: not running; its last view, as of 2023-11-14T22:13:20Z (60 s ago):"
    assert lines[2].startswith("fleet https://fleet.example.com: unreachable, last contact never")
    assert lines[3].endswith("desired failed: refused")
    assert lines[4].startswith("broker: no session")
    assert status_lines(status_document(tmp_path / "never"))[1].startswith("agent: has not run")

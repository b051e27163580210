"""``--log-format json``: every line a real fleet process and a real agent process write
(uvicorn's, alembic's, the embedded broker's, a refused request, an enrollment, telemetry)
is one JSON object; nothing else reaches their output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from ..conftest import free_port
from ..waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
ADMIN, ENROLL = "a" * 32, "e" * 32


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = path.read_text().splitlines()
    assert lines, f"{path.name} is empty"
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path.name} line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_every_line_of_a_fleet_and_an_agent_run_is_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(PYTHONPATH=str(REPO), EDGEFLEET_LOG_FORMAT="json")
    port, mqtt_port = free_port(), free_port()
    data = tmp_path / "fleet"
    fleet_log, agent_log = tmp_path / "fleet.log", tmp_path / "agent.log"
    with open(fleet_log, "wb") as out:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli.main", "serve", "--port", str(port), "--mqtt-port",
             str(mqtt_port), "--data-dir", str(data), "--admin-token", ADMIN, "--enrollment-token", ENROLL],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    agent = None
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, f"the fleet; log: {fleet_log.read_text()[-2000:]}")
        assert httpx.get(f"{url}/api/v1/devices", timeout=5).status_code == 401  # a refusal logs too
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            f'device_id = "cam-json"\nstate_dir = "{tmp_path / "state"}"\n'
            f'trust_root = "{data / "keys" / "root.json"}"\n'
            f'[fleet]\nurl = "{url}"\nenrollment_token = "{ENROLL}"\npoll_interval_s = 0.5\n'
            '[mqtt]\nhealth_interval_s = 0.3\n[api]\nlisten = "127.0.0.1:0"\n')
        with open(agent_log, "wb") as out:
            agent = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"],
                                     cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

        def reporting() -> bool:
            r = httpx.get(f"{url}/api/v1/devices/cam-json", headers={"Authorization": f"Bearer {ADMIN}"},
                          timeout=5)
            return r.status_code == 200 and bool(r.json().get("last_seen"))

        wait_for(reporting, 60, f"the agent's telemetry; log: {agent_log.read_text()[-2000:]}")
    finally:
        if agent is not None:
            _stop(agent)
        _stop(fleet)
    fleet_entries, agent_entries = _json_lines(fleet_log), _json_lines(agent_log)
    fleet_loggers = {str(e["logger"]) for e in fleet_entries}
    assert {"uvicorn.error", "fleet.db.migrations", "fleet.broker.embedded"} <= fleet_loggers, fleet_loggers
    assert not any(name.startswith("alembic") for name in fleet_loggers), "alembic start-up noise"
    assert any("created signing keys" in str(e["message"]) for e in fleet_entries)
    assert all(e.get("role") == "agent" for e in agent_entries)
    assert any(str(e["logger"]).startswith("agent") for e in agent_entries)

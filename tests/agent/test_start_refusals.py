"""The agent refuses to start in one line naming the key, path or address at fault: the
shipped config's placeholders, a misspelt required key, a Unix socket in a missing
directory, an API address in use. Real ``edgefleet-agent run`` processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from shared.bundle.keyring import Keyring

REPO = Path(__file__).resolve().parents[2]


def _run(cfg: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=REPO,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)


def _one_line_error(r: subprocess.CompletedProcess[str], fragment: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("edgefleet-agent: error: ")]
    assert len(errors) == 1 and fragment in errors[0], r.stderr
    return errors[0]


def test_the_shipped_config_is_refused_until_its_placeholders_are_replaced(tmp_path: Path) -> None:
    shipped = (REPO / "packaging/config/agent.toml").read_text()
    line = _one_line_error(_run(REPO / "packaging/config/agent.toml"), "device_id = 'CHANGE-ME'")
    assert "placeholder" in line
    cfg = tmp_path / "agent.toml"
    cfg.write_text(shipped.replace('device_id = "CHANGE-ME"', 'device_id = "cam-1"'))
    _one_line_error(_run(cfg), "fleet.url = 'https://fleet.example.com' is the placeholder")
    cfg.write_text(shipped.replace('device_id = "CHANGE-ME"', 'device_id = "cam-1"')
                   .replace("https://fleet.example.com", "https://fleet.internal"))
    _one_line_error(_run(cfg), "fleet.enrollment_token = 'CHANGE-ME' is the placeholder")


@pytest.mark.parametrize(("doc", "named"), [
    ({"stat_dir": "/s", "trust_root": "/r.json"}, "unknown key stat_dir = '/s' (did you mean state_dir?)"),
    ({"state_dir": "/s", "trust_roots": "/r.json"},
     "unknown key trust_roots = '/r.json' (did you mean trust_root?)"),
    ({"state_dir": "/s", "trust_root": "/r.json", "device_id": "d", "fleet": {"ulr": "http://f"}},
     "unknown key fleet.ulr = 'http://f' (did you mean fleet.url?)"),
    ({"state_dir": "/s", "trust_root": "/r.json", "api": {"unix_sockt": "/a"}},
     "unknown key api.unix_sockt = '/a' (did you mean api.unix_socket?)"),
])
def test_a_misspelt_key_is_named_like_any_unknown_key(doc: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert str(err.value) == named


def test_unix_socket_in_a_missing_directory_names_it(tmp_path: Path, keyring: Keyring) -> None:
    cfg = tmp_path / "agent.toml"
    sock = tmp_path / "no-such-dir" / "agent.sock"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\ntrust_root = "{keyring.root_path}"\n'
                   f'[api]\nlisten = ""\nunix_socket = "{sock}"\n')
    line = _one_line_error(_run(cfg), f"api.unix_socket = '{sock}': directory {sock.parent} does not exist")
    assert "Errno" not in line


def test_api_address_in_use_names_it(tmp_path: Path, keyring: Keyring) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'state_dir = "{tmp_path / "state"}"\ntrust_root = "{keyring.root_path}"\n'
                       f'[api]\nlisten = "127.0.0.1:{port}"\n')
        line = _one_line_error(_run(cfg), f"api.listen = 127.0.0.1:{port}: the address is already in use")
    assert "Errno" not in line

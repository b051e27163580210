"""SIGHUP (``systemctl reload``) on a real agent process: it keeps running, pulls the desired
state, and names the config sections a restart would change (the config is read at start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from shared.bundle.keyring import Keyring

from ..waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def test_sighup_keeps_running_and_names_what_changed(tmp_path: Path, keyring: Keyring) -> None:
    cfg = tmp_path / "agent.toml"
    base = (f'state_dir = "{tmp_path / "state"}"\ntrust_root = "{keyring.root_path}"\n'
            '[api]\nlisten = "127.0.0.1:0"\n')
    cfg.write_text(base)
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=REPO,
                                env={**env, "PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "started" in log.read_text(), 30, "the agent to start")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "unchanged" in log.read_text(), 10, "the SIGHUP answer")
        assert f"SIGHUP: pulling the desired state now; {cfg} unchanged" in log.read_text()
        cfg.write_text(base + "[runtime]\nmax_batch_size = 2\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "changed (runtime)" in log.read_text(), 10, "the changed config named")
        cfg.write_text(base + "bogus = 1\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "is not valid" in log.read_text(), 10, "the invalid config named")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "restart the agent (systemctl restart edgefleet-agent)" in text and "unknown key api.bogus" in text
    assert "Traceback" not in text

"""``make demo DEMO_ARGS=--keep-running``: the real demo process says where the dashboard,
the admin token's file and the broker are (each checked to work), and SIGTERM stops every
child: fleet, embedded broker and agents."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ..waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def _processes_under(workdir: Path) -> list[int]:
    """Pids whose command line names ``workdir`` (the demo's children all do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(workdir) in cmdline and int(proc.name) != os.getpid():
                found.append(int(proc.name))
    return found


@pytest.mark.long
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_keep_running_prints_where_things_are_and_sigterm_stops_every_child(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    proc = subprocess.Popen([sys.executable, "-m", "fleet.demo", "--agents", "2", "--keep-running",
                             "--workdir", str(workdir)], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        wait_for(lambda: any("broker: " in line for line in lines), 200,
                 "the demo to reach --keep-running")
        text = "".join(lines)
        dashboard = re.search(r"dashboard: (\S+)", text).group(1)  # type: ignore[union-attr]
        token_file = Path(re.search(r"admin token file: (\S+)", text).group(1))  # type: ignore[union-attr]
        port = int(re.search(r"broker: mqtt://127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        assert token_file.stat().st_mode & 0o077 == 0
        token = token_file.read_text().strip()
        assert httpx.get(dashboard, timeout=10).status_code == 200
        fleet = dashboard.removesuffix("/dashboard")
        devices = httpx.get(f"{fleet}/api/v1/devices", headers={"Authorization": f"Bearer {token}"},
                            timeout=10)
        assert devices.status_code == 200 and len(devices.json()) == 2
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        children = [pid for pid in _processes_under(workdir) if pid != proc.pid]
        assert len(children) >= 3, children  # the fleet and two agents

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines)[-3000:]
        print(f"stopped in {time.monotonic() - started:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _processes_under(workdir) == [], "children left running"
    assert "stopping the agents and the fleet" in "".join(lines)

"""The systemd units: `systemd-analyze verify` on copies whose ExecStart binary exists,
the agent's hardening settings, and its exposure score at or below the one recorded in
docs/install.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .conftest import PACKAGING, REPO, tool

UNITS = PACKAGING / "systemd"
INSTALL_MD = REPO / "docs" / "install.md"


def _copy_with_existing_exec(unit: Path, out_dir: Path, name: str | None = None) -> Path:
    """The unit with its /opt/edgefleet(-fleet) binary replaced by /bin/true, which exists here."""
    text = re.sub(r"^ExecStart=/opt/edgefleet(?:-fleet)?/bin/\S+", "ExecStart=/bin/true", unit.read_text(),
                  flags=re.M)
    out = out_dir / (name or unit.name)
    out.write_text(text)
    return out


def _directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit, name", [
    ("edgefleet-agent.service", None),
    ("edgefleet-fleet.service", None),
    ("edgefleet-fleet@.service", "edgefleet-fleet@api.service"),
])
def test_verify(unit: str, name: str | None, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    copy = _copy_with_existing_exec(UNITS / unit, tmp_path, name)
    assert "ExecStart=/bin/true" in copy.read_text()
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_agent_unit_settings() -> None:
    d = _directives(UNITS / "edgefleet-agent.service")
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and int(one["WatchdogSec"]) > 0
    assert one["Restart"] == "on-failure"
    assert int(one["StartLimitBurst"]) > 0 and int(one["StartLimitIntervalSec"]) > 0
    assert one["User"] == "edgefleet" and one["ProtectSystem"] == "strict"
    assert one["ReadWritePaths"] == "/var/lib/edgefleet" and one["StateDirectory"] == "edgefleet"
    assert one["CapabilityBoundingSet"] == "" and one["NoNewPrivileges"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert "--config /etc/edgefleet/agent.toml run" in one["ExecStart"]
    assert one["ExecStart"].startswith("/opt/edgefleet/bin/edgefleet-agent ")


def _recorded_score() -> float:
    m = re.search(r"exposure level[^\n]*?\*\*(\d+\.\d)\*\*", INSTALL_MD.read_text())
    assert m, "docs/install.md does not record the agent's systemd-analyze security score"
    return float(m[1])


def test_agent_security_score_is_the_recorded_one_or_better(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    copy = _copy_with_existing_exec(UNITS / "edgefleet-agent.service", tmp_path)
    r = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(copy)],
                       capture_output=True, text=True, timeout=60)
    if "--offline" in r.stderr and r.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline (systemd 252 or newer): {r.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= _recorded_score(), r.stdout


def test_fleet_units_run_the_roles() -> None:
    one = _directives(UNITS / "edgefleet-fleet.service")
    assert "--role all" in one["ExecStart"][0]
    tmpl = _directives(UNITS / "edgefleet-fleet@.service")
    assert "--role %i" in tmpl["ExecStart"][0]

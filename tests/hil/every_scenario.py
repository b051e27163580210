"""Every bundled HIL scenario for real, on emulated devices in network namespaces: ``make hil-ci``,
which CI runs after ``make test``. Not collected by ``make test`` (the file's name is not
``test_*.py``): the scenarios take some two minutes together. A scenario passes only when its
verdict does, and its verdict needs every fault to have fired where the scenario says
(hil/evidence.py), so a power cut that landed in another state fails here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hil.lab import Capabilities, probe
from hil.runner import HilRun
from hil.scenario import load_scenario, parse_scenario, resolve_devices

SCENARIOS = Path(__file__).resolve().parents[2] / "hil" / "scenarios"


@pytest.fixture(scope="module")
def caps() -> Capabilities:
    if shutil.which("mosquitto") is None and not os.access("/usr/sbin/mosquitto", os.X_OK):
        pytest.skip("mosquitto is not installed: apt-get install mosquitto (Debian package 'mosquitto')")
    found = probe()
    if not found.netns:
        pytest.skip(f"the HIL scenarios need network namespaces (run as root): {found.reasons.get('netns')}")
    if not (found.netem or found.nft):
        pytest.skip("packet loss needs tc netem or nftables: apt-get install nftables (Debian package "
                    f"'nftables'); make deps-system installs it ({found.reasons.get('nft')})")
    if not found.tmpfs:
        pytest.skip(f"the full disk needs a tmpfs mount: {found.reasons.get('tmpfs')}")
    return found


def _run(scenario_path: Path | None, report_dir: Path, caps: Capabilities, data: dict | None = None) -> dict:
    sc = load_scenario(scenario_path) if scenario_path else parse_scenario(data or {})
    lines: list[str] = []
    report = HilRun(sc, report_dir, narrate=lines.append, caps=caps).run()
    report["narration"] = "\n".join(lines)
    return report


@pytest.mark.e2e
@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
def test_scenario(path: Path, tmp_path: Path, caps: Capabilities) -> None:
    sc = load_scenario(path)
    report = _run(path, tmp_path / "report", caps)
    why = json.dumps(report["checks"], indent=1) + "\n" + report["narration"]
    assert report["mode"] == "netns" and report["skipped"] == [], why
    assert report["verdict"] == "pass", why
    assert report["rollout"]["state"] in sc.expect.rollout
    # one "fault fired" check per fault and device the scenario names, every one with its figures
    asked = sum(1 if f.action.startswith("broker") else len(resolve_devices(f.devices, sc.device_ids(),
                                                                            sc.canary))
                for f in sc.faults)
    fired = [c for c in report["checks"] if c["check"].startswith("fault fired")]
    assert len(fired) == asked and all(c["ok"] and c["detail"] for c in fired), why
    assert (tmp_path / "report" / "report.md").read_text().startswith(f"# HIL: {sc.name} — PASS")


@pytest.mark.e2e
def test_a_fault_that_does_not_fire_fails_the_scenario(tmp_path: Path, caps: Capabilities) -> None:
    """A 0% loss applies a rule that drops nothing: the rollout succeeds, every device serves the
    new release, and yet the scenario fails, because its fault never happened."""
    report = _run(None, tmp_path / "report", caps, {
        "name": "a loss that drops nothing", "devices": 2, "release": "healthy", "timeout_s": 60,
        "rollout": {"stages": [{"name": "all", "percent": 100, "bake_seconds": 1}],
                    "gates": {"max_error_rate": 0.05, "min_inferences": 5, "max_install_failures": 0},
                    "on_inconclusive": "extend", "extend_seconds": 5, "max_extensions": 8},
        "faults": [{"action": "loss", "devices": "all", "value": 0}],
        "expect": {"rollout": ["succeeded"], "serving": "new"},
    })
    checks = {c["check"]: c for c in report["checks"]}
    why = json.dumps(report["checks"], indent=1) + "\n" + report["narration"]
    assert checks["rollout state"]["ok"] and checks["serving new"]["ok"], why
    for device in ("dev-01", "dev-02"):
        missed = checks[f"fault fired: loss {device}"]
        assert not missed["ok"] and "packets dropped: the loss never applied" in missed["detail"], why
    assert report["verdict"] == "fail"
    assert "| fault fired: loss dev-01 | **no** |" in (tmp_path / "report" / "report.md").read_text()

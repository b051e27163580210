"""The demo scenario end to end: real fleet process, real agent processes, a real broker.

A faulty release whose golden vectors pass is staged canary -> 50% -> 100%; the fleet
must stop it at the canary on the error-rate gate, roll back by re-issuing the healthy
release under a higher number, and every device must end up serving it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.demo.scenario import DemoConfig, run_demo


def _assert_rolled_back_at_canary(result, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
    first, second = result.first_rollout, result.second_rollout
    assert first["state"] == "succeeded", first
    assert second["state"] == "rolled_back", second
    reason = second.get("reason") or ""
    assert "canary" in reason and "error_rate" in reason, reason
    # The healthy model came back as a re-issue newer than the faulty release (anti-rollback
    # holds on the canary); devices that never left r1 keep it.
    v1, v2 = result.bundles["v1"]["release"], result.bundles["v2"]["release"]
    reissued = result.healthy_releases - {v1}
    assert reissued and min(reissued) > v2, result.healthy_releases
    assert set(result.serving.values()) <= result.healthy_releases, result.serving
    canary = [d["device_id"] for d in second["devices"] if d["stage"] == 0]
    assert canary and all(result.serving[d] in reissued for d in canary), (canary, result.serving)
    # The faulty release never went past the canary stage.
    states = {s["name"]: s["state"] for s in second["stages"]}
    assert states["half"] == "pending" and states["all"] == "pending", states
    assert any("rolled back" in line or "rollback" in line for line in lines)


@pytest.mark.long
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_demo_against_mosquitto(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    lines: list[str] = []
    cfg = DemoConfig(workdir=tmp_path, agents=4, mqtt_url=mosquitto.url, narrate=lines.append)
    result = run_demo(cfg)
    _assert_rolled_back_at_canary(result, lines)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_demo_on_embedded_broker(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = DemoConfig(workdir=tmp_path, agents=3, narrate=lines.append)
    result = run_demo(cfg)
    _assert_rolled_back_at_canary(result, lines)

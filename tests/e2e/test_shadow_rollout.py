"""Shadow evaluation end to end: the real fleet app (uvicorn, SQLite, controller, ingester),
a real Mosquitto broker and real in-process agents serving live traffic.

A candidate whose golden vectors pass but whose top class differs on field traffic is
stopped in shadow, with no device ever switching to it; a candidate that agrees passes the
shadow stage and the next stage activates it for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.demo.models import write_classifier
from fleet.demo.shadow_models import write_divergent_classifier

from ..waiting import wait_for
from .rollout_rig import DEVICES, Rig, running_rig, serve_r1


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Any) -> Iterator[Rig]:
    with running_rig(tmp_path, mosquitto, traffic_pause_s=0.005) as r:  # ~200 requests/s
        yield r


def _spec(bundle_id: int) -> dict[str, Any]:
    return {
        "name": "clf r2 in shadow first",
        "bundle_id": bundle_id,
        "selector": {"site": "lab"},
        "stages": [
            {"name": "shadow", "mode": "shadow", "bake_seconds": 2, "shadow_sample_rate": 0.5,
             "shadow_max_busy_fraction": 0.5},
            {"name": "all", "percent": 100},
        ],
        "gates": {"min_agreement": 0.95, "max_abs_error": 0.2, "min_shadow_samples": 100,
                  "max_candidate_p95_ratio": 50, "min_devices": 2},
        "on_inconclusive": "extend", "extend_seconds": 2, "max_extensions": 20,
    }


def _activated(rig: Rig, release: int) -> list[str]:
    """Devices that ever reported activating ``release`` (from the fleet's event table)."""
    from sqlmodel import Session, select

    from fleet.db.models import DeviceEvent

    with Session(rig.app.state.ctx.engine) as session:
        rows = session.exec(select(DeviceEvent).where(DeviceEvent.kind == "activated",
                                                      DeviceEvent.release == release)).all()
        return sorted({e.device_id for e in rows})


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_candidate_that_differs_on_live_traffic_is_stopped_in_shadow(rig: Rig) -> None:
    serve_r1(rig)
    candidate = rig.upload(2, lambda p: write_divergent_classifier(p, seed=0))
    status = rig.rollout(_spec(candidate))

    assert status["state"] == "rolled_back", status["reason"]
    reason = status["reason"]
    assert reason.startswith("stage shadow: shadow agreement "), reason
    assert "< 0.95 over" in reason and "on 2 devices (r2 vs the serving release;" in reason, reason
    assert "(gate min_agreement)" in reason
    # No device switched: none was assigned r2, none activated it, all still serve r1.
    assert {d["status"] for d in status["devices"]} == {"pending"}, status["devices"]
    assert _activated(rig, 2) == []
    for device in DEVICES:
        assert rig.active(device) == (1, "committed")
        assert rig.agents[device].host.get("clf").release == 1  # type: ignore[union-attr]
    gate = next(g for g in status["gate_history"] if g["gate"] == "min_agreement" and g["status"] == "fail")
    assert gate["sample"] >= 100 and gate["observed"] < 0.95
    assert any("devices stopped shadowing, none switched" in e["message"] for e in status["events"])
    # the devices drop the candidate once the rollout stopped
    for device in DEVICES:
        wait_for(lambda d=device: rig.agents[d].host.shadow("clf") is None,
                 what=f"{device} to stop shadowing")


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_candidate_that_agrees_passes_shadow_and_is_then_activated(rig: Rig) -> None:
    serve_r1(rig)
    candidate = rig.upload(2, lambda p: write_classifier(p, seed=0))  # same behaviour, new release
    status = rig.rollout(_spec(candidate))

    assert status["state"] == "succeeded", (status["reason"], status["last_evaluation"])
    passed = next(e["message"] for e in status["events"] if e["kind"] == "stage_passed")
    assert passed.startswith("stage shadow: passed in shadow (shadow agreement 1.00 >= 0.95 over "), passed
    assert passed.endswith("devices switch to r2"), passed
    for device in DEVICES:
        wait_for(lambda d=device: rig.active(d) == (2, "committed"), what=f"{device} to commit r2")
        assert rig.agents[device].host.shadow("clf") is None
    wait_for(lambda: _activated(rig, 2) == list(DEVICES), what="the fleet to store both activations")
    shadow = next(d["shadow"] for d in status["devices"] if d["device_id"] == DEVICES[0])
    assert shadow is None or shadow["release"] == 2

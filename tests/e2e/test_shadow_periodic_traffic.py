"""Shadow sampling on periodic traffic, end to end: the real fleet (uvicorn, SQLite,
controller, ingester), real Mosquitto, real in-process agents, and on each device an
application that cycles through five cameras, one of them bright.

The candidate reverses its top class on bright frames only (a 20 % slice of the traffic).
A sampler taking exactly every 10th request would only ever see one camera (the issue's
"agreement 1.00 over ~220 samples"); the device's sampler takes one request at a random
position of each block of ten, so every device sees every camera and the stage fails on
its agreement's 99 % upper bound.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import InferenceError, UnknownModelError
from fleet.demo.shadow_models import write_divergent_classifier

from .rollout_rig import DEVICES, Rig, running_rig, serve_r1

PERIOD = 5


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Any) -> Iterator[Rig]:
    # the rig's own random traffic is all but off (one request an hour): ours is periodic
    with running_rig(tmp_path, mosquitto, traffic_pause_s=3600) as r:
        yield r


def _cameras(rig: Rig, device: str, stop: threading.Event) -> None:
    """Camera i % 5 == 0 is bright (values >= 1, where the candidate differs); the others
    are dim (values in [0, 0.9)); about 200 requests a second."""
    rng = np.random.default_rng(abs(hash(device)) % 2**32)
    agent = rig.agents[device]
    i = 0
    while not stop.is_set():
        bright = i % PERIOD == 0
        x = (rng.random((1, 4)) * 0.9 + (1.2 if bright else 0.0)).astype(np.float32)
        try:
            agent.host.predict("clf", {"x": x})
            i += 1
        except UnknownModelError:
            stop.wait(0.05)
        except InferenceError:
            pass
        stop.wait(0.005)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_candidate_differing_on_one_camera_of_five_is_stopped_in_shadow(rig: Rig) -> None:
    serve_r1(rig)
    stop = threading.Event()
    apps = [threading.Thread(target=_cameras, args=(rig, d, stop), daemon=True) for d in DEVICES]
    for t in apps:
        t.start()
    try:
        candidate = rig.upload(2, lambda p: write_divergent_classifier(p, seed=0))
        status = rig.rollout({
            "name": "r2 in shadow on periodic traffic",
            "bundle_id": candidate,
            "selector": {"site": "lab"},
            # the default sample rate (0.1): exactly the rate whose strict stride aligned
            "stages": [{"name": "shadow", "mode": "shadow", "bake_seconds": 2,
                        "shadow_max_busy_fraction": 0.5},
                       {"name": "all", "percent": 100}],
            "gates": {"min_agreement": 0.95, "min_shadow_samples": 60, "min_devices": 2},
            "on_inconclusive": "extend", "extend_seconds": 2, "max_extensions": 20,
        })
    finally:
        stop.set()
        for t in apps:
            t.join(10)

    assert status["state"] == "rolled_back", status["reason"]
    reason = status["reason"]
    assert reason.startswith("stage shadow: shadow agreement 0."), reason
    assert "< 0.95 over" in reason and "99% upper bound" in reason, reason
    gate = next(g for g in status["gate_history"] if g["gate"] == "min_agreement" and g["status"] == "fail")
    per_device = gate["figures"]["per_device"]
    # every device saw the bright camera: none agrees on everything, none on nothing
    assert set(per_device) == set(DEVICES), per_device
    assert all(0.6 <= a <= 0.95 for a in per_device.values()), per_device
    assert gate["figures"]["upper_bound"] < 0.95
    for device in DEVICES:
        assert rig.active(device) == (1, "committed")

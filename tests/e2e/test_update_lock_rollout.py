"""Update locks end to end (issue #9): the real fleet app (uvicorn, SQLite, controller,
ingester), a real Mosquitto broker and real in-process agents serving live traffic.

An application on one device takes an update lock through the agent's local API. A rollout
to both devices commits on the other one at once; on the locked device the release is
downloaded and staged but not activated, the agent (local API, ``edgefleet-agent status``)
and the fleet (device API, rollout status) say it waits for that lock, and the rollout
neither fails, nor rolls back, nor counts the device as failed or silent, for longer than
its silent deadline and bake time. When the application releases the lock the device
activates the release at once, commits it, and the rollout completes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from agent.cli import cmd_status
from fleet.db.models import DeviceEvent
from fleet.demo.models import write_classifier
from shared.timeutil import parse_ts

from ..waiting import wait_for
from .rollout_rig import DEVICES, TERMINAL, Rig, running_rig, serve_r1

LOCKED, FREE = DEVICES
HOLDER = "camera-app"
# Short enough to trip inside the test if a waiting device were counted as silent (or, with
# the bake time, if the stage could pass without it), long enough for a loaded CI machine:
# the agents report health every 0.5 s.
SILENT_AFTER_S = 5.0
BAKE_S = 3.0
LOCK_WAIT = f"waiting for the update lock held by '{HOLDER}' until "


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Any) -> Iterator[Rig]:
    with running_rig(tmp_path, mosquitto, traffic_pause_s=0.01) as r:  # ~100 requests/s
        yield r


def _spec(bundle_id: int) -> dict[str, Any]:
    return {
        "name": "clf r2 to every device",
        "bundle_id": bundle_id,
        "selector": {"site": "lab"},
        "stages": [{"name": "all", "percent": 100, "bake_seconds": BAKE_S}],
        # Every count of bad news fails at once: a device counted as failed, rolled back or
        # silent would roll the rollout back; a stage short of its sample after the bake fails.
        "gates": {"max_install_failures": 0, "max_local_rollbacks": 0, "max_silent_devices": 0,
                  "max_error_rate": 0.05, "min_inferences": 20},
        "silent_after_s": SILENT_AFTER_S,
        "on_gate_failure": "rollback",
        "on_inconclusive": "fail",
    }


def _events(rig: Rig, device: str, release: int) -> list[str]:
    """The update events the fleet stored for ``device`` about ``release``, in order."""
    with Session(rig.app.state.ctx.engine) as session:
        rows = session.exec(select(DeviceEvent).where(DeviceEvent.device_id == device,
                                                      DeviceEvent.release == release)
                            .order_by(col(DeviceEvent.received_at), col(DeviceEvent.id))).all()
        return [e.kind for e in rows]


def _row(status: dict[str, Any], device: str) -> dict[str, Any]:
    row: dict[str, Any] = next(d for d in status["devices"] if d["device_id"] == device)
    return row


def _staged_waiting(rig: Rig) -> bool:
    """The locked device serves r1, its r2 staged and noted as waiting for the lock."""
    rec = rig.agents[LOCKED].store.load("clf")
    return bool(rec and rec.active and rec.active.release == 1 and str(rec.state) == "staged"
                and rec.target and rec.target.release == 2
                and rec.message.startswith(f"r2 staged, {LOCK_WAIT}"))


@pytest.mark.long
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_release_waits_for_an_update_lock_and_activates_when_it_is_released(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_r1(rig)
    app = rig.local_api(LOCKED)
    try:
        lease = app.acquire_lock(HOLDER, 120, reason="recording")
        assert lease["holder"] == HOLDER and lease["lease_s"] == 120

        candidate = rig.upload(2, lambda p: write_classifier(p, seed=1))
        r = rig.http.post("/api/v1/rollouts", json=_spec(candidate))
        assert r.status_code == 201, r.text
        rid = int(r.json()["id"])
        r = rig.http.post(f"/api/v1/rollouts/{rid}/start")
        assert r.status_code == 200, r.text

        # The free device takes r2; the locked one downloads and stages it, and waits.
        wait_for(lambda: rig.active(FREE) == (2, "committed"), what=f"{FREE} to commit r2")
        wait_for(lambda: _staged_waiting(rig), what=f"{LOCKED} to stage r2 and wait for the lock")
        assert rig.agents[LOCKED].host.get("clf").release == 1  # type: ignore[union-attr]

        # The agent says so: its local API ...
        locks = app.locks()
        assert [x["holder"] for x in locks["locks"]] == [HOLDER]
        waiting = locks["waiting"]
        assert list(waiting) == ["clf"] and waiting["clf"].startswith(f"r2 staged, {LOCK_WAIT}"), waiting
        assert waiting["clf"].endswith(" UTC"), waiting
        # ... and `edgefleet-agent status` (same state dir, read while the agent runs).
        capsys.readouterr()
        assert cmd_status(rig.agents[LOCKED].config, as_json=False) == 0
        out = capsys.readouterr().out
        assert "clf: state staged, active r1 (1.1), previous none, last target r2" in out, out
        assert f"  r2 staged, {LOCK_WAIT}" in out, out

        # The fleet sees it from the device's health reports: device API ...
        def fleet_sees_waiting() -> dict[str, Any] | None:
            doc = rig.device(LOCKED)
            w = doc["waiting"].get("clf") or ""
            return doc if w.startswith(f"r2 staged, {LOCK_WAIT}") else None

        device = wait_for(fleet_sees_waiting, timeout=30, what="the fleet to see the device waiting")
        assert device["models"]["clf"]["release"] == 1 and device["models"]["clf"]["state"] == "staged"
        assert device["held"]["clf"] == [1, 2], device["held"]
        assert rig.device(FREE)["waiting"] == {}

        # ... and the rollout: staged, waiting; neither failed nor silent.
        def rollout_sees_waiting() -> dict[str, Any] | None:
            status = rig.status(rid)
            if _row(status, FREE)["progress"] != "committed":  # the fleet hears it a little later
                return None
            return status if _row(status, LOCKED)["detail"].startswith(f"staged, {LOCK_WAIT}") else None

        status = wait_for(rollout_sees_waiting, timeout=30, what="the rollout to show the device waiting")
        locked = _row(status, LOCKED)
        assert (locked["status"], locked["progress"]) == ("assigned", "staged"), locked
        assert locked["reason"] is None, locked

        # Hold the lock past the silent deadline and the bake time, as the fleet's controller
        # counts them (its last evaluation minus the stage's start): all along, the rollout
        # runs and waits for the locked device, which stays staged and waiting, on r1.
        seen: list[dict[str, Any]] = []

        def outlasted_deadlines() -> bool:
            s = rig.status(rid)
            seen.append(s)
            row = _row(s, LOCKED)
            assert s["state"] == "running", (s["state"], s["reason"])
            assert (row["progress"], row["reason"]) == ("staged", None), row
            assert row["detail"].startswith(f"staged, {LOCK_WAIT}"), row
            assert s["progress"] == {"committed": 1, "staged": 1}, s["progress"]
            assert s["last_evaluation"] == "stage all: 1 of 2 devices report r2 committed (1 staged)", \
                s["last_evaluation"]
            assert _staged_waiting(rig)
            elapsed = (parse_ts(s["updated"]) - parse_ts(s["stage_started_at"])).total_seconds()
            return elapsed > SILENT_AFTER_S + BAKE_S + 1

        wait_for(outlasted_deadlines, timeout=60, interval=0.2,
                 what="the controller to evaluate past the silent deadline and the bake time")
        assert len(seen) > 1
        assert not {"failed", "rolled_back", "activated", "committed"} & set(_events(rig, LOCKED, 2))
        assert "staged" in _events(rig, LOCKED, 2)
        kinds = {e["kind"] for e in rig.status(rid)["events"]}
        settled = {"gate_failed", "inconclusive", "extended", "paused", "rolled_back", "reissued",
                   "stage_passed", "succeeded"}
        assert not kinds & settled, kinds

        # The application is done: it releases the lock and the device activates r2 at once.
        app.release_lock(HOLDER)
        assert app.locks()["locks"] == []
        wait_for(lambda: rig.active(LOCKED) == (2, "committed"), timeout=30, what=f"{LOCKED} to commit r2")

        def finished() -> dict[str, Any] | None:
            s = rig.status(rid)
            return s if s["state"] in TERMINAL else None

        status = wait_for(finished, timeout=60, what="the rollout to finish")
        for e in status["events"]:  # shown on failure, and with -s
            print(f"{e['ts']} {e['kind']}: {e['message']}")
        assert status["state"] == "succeeded", (status["reason"], status["last_evaluation"])
        assert {_row(status, d)["progress"] for d in DEVICES} == {"committed"}, status["devices"]
        assert status["progress"] == {"committed": 2}
        for d in DEVICES:
            assert rig.active(d) == (2, "committed")
            assert rig.agents[d].host.get("clf").release == 2  # type: ignore[union-attr]
        # the fleet stores the device's events (MQTT, batched) a little after its health state
        def commit_stored() -> list[str] | None:
            kinds = _events(rig, LOCKED, 2)
            return kinds if "committed" in kinds else None

        kinds_locked = wait_for(commit_stored, timeout=30, what=f"the fleet to store {LOCKED}'s commit of r2")
        assert kinds_locked.index("staged") < kinds_locked.index("activated"), kinds_locked
        assert "failed" not in kinds_locked and "rolled_back" not in kinds_locked, kinds_locked
        # nothing waits any more, on the device nor in the fleet
        assert app.locks()["waiting"] == {}
        wait_for(lambda: rig.device(LOCKED)["waiting"] == {}, timeout=30,
                 what="the fleet to drop the device's waiting note")
    finally:
        app.close()

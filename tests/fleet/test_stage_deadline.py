"""Every stage ends by its deadline: a device that keeps reporting progress short of the target
(a hostile or broken device "downloading" forever) is heard from, so it is neither silent nor
stuck, and formerly held its stage in "wait" for good. Pure decisions, then the real controller
over the real app and database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fleet_support import make_bundle, upload
from litestar.testing import TestClient
from sqlmodel import Session
from test_fleet_controller import ctrl, rollout, setup_fleet, status

from fleet.db.models import Device
from fleet.rollout import engine as eng
from fleet.rollout.gate_spec import SpecError
from fleet.rollout.stalls import DEADLINE_GATE, judge_stall
from shared.bundle.keyring import Keyring

T0 = 1_000_000.0


def _spec(**stage: Any) -> eng.RolloutSpec:
    return eng.parse_spec({"name": "r", "bundle_id": 1, "silent_after_s": 300,
                           "stages": [{"name": "all", "bake_seconds": 60, **stage}]})


def _judge(spec: eng.RolloutSpec, devices: list[eng.DeviceState], now: float) -> eng.Decision:
    decision = eng.evaluate_stage(spec, 0, 12, devices, [], [], now=now, stage_started_at=T0)
    return judge_stall(spec, 0, decision, now=now, stage_started_at=T0) or decision


def _downloading_forever(now: float) -> list[eng.DeviceState]:
    return [
        eng.DeviceState("d1", 0, release=12, state="committed", last_seen=now - 5, assigned_at=T0),
        eng.DeviceState("d2", 0, release=9, state="downloading", last_seen=now - 5, assigned_at=T0),
    ]


def test_the_default_deadline_is_the_bake_time_plus_three_silences() -> None:
    assert _spec().stage_deadline(0) == 60 + 3 * 300
    assert _spec(deadline_seconds=120).stage_deadline(0) == 120


def test_a_device_downloading_forever_fails_its_stage_at_the_deadline_and_is_named() -> None:
    spec = _spec()
    before = _judge(spec, _downloading_forever(T0 + 959), T0 + 959)
    assert before.verdict is eng.Verdict.WAIT  # heard from 5 s ago: not silent, may still finish
    after = _judge(spec, _downloading_forever(T0 + 960), T0 + 960)
    assert after.verdict is eng.Verdict.FAIL and after.gate == DEADLINE_GATE
    assert after.message == (
        "stage all: 1 of 2 devices did not report the target committed at its deadline "
        "(960 s of 960 s), counted as failed: d2 downloading"
    )
    assert after.figures["unfinished"] == {"d2": "downloading"} and after.figures["deadline_s"] == 960


def test_a_device_waiting_for_its_window_gets_a_day_more() -> None:
    """A device staged and waiting for its activation window (or an update lock) keeps its
    stage up to a day past the default deadline; then it is named like any other."""
    spec = _spec()
    now = T0 + 960 + 3600

    def waiting(at: float) -> list[eng.DeviceState]:
        return [eng.DeviceState("d1", 0, release=9, state="staged", last_seen=at - 5, assigned_at=T0,
                                waiting="staged, waiting for the activation window 02:00-05:00")]

    assert _judge(spec, waiting(now), now).verdict is eng.Verdict.WAIT
    assert spec.stage_deadline(0, window_wait=True) == 960 + 86_400
    late = _judge(spec, waiting(T0 + 960 + 86_400), T0 + 960 + 86_400)
    assert late.verdict is eng.Verdict.FAIL and late.gate == DEADLINE_GATE
    assert "d1 staged, waiting for the activation window 02:00-05:00" in late.message


def test_a_stage_short_of_its_min_devices_fails_at_the_deadline() -> None:
    spec = _spec(min_devices=3, deadline_seconds=100)
    devices = _downloading_forever(T0 + 100)[:1]
    assert _judge(spec, devices, T0 + 99).verdict is eng.Verdict.WAIT
    late = _judge(spec, devices, T0 + 100)
    assert late.verdict is eng.Verdict.FAIL and late.gate == DEADLINE_GATE
    assert late.message == "stage all: 1 of at least 3 devices at its deadline (100 s of 100 s)"


def test_a_stage_that_only_bakes_is_not_cut_short() -> None:
    """The deadline is for devices; an extended bake time ends by itself."""
    spec = _spec(deadline_seconds=60)
    devices = [eng.DeviceState("d1", 0, release=12, state="committed", last_seen=T0 + 55, assigned_at=T0)]
    decision = eng.evaluate_stage(spec, 0, 12, devices, [], [], now=T0 + 61, stage_started_at=T0,
                                  extensions=1)
    assert decision.verdict is eng.Verdict.WAIT and "bake" in decision.message
    assert judge_stall(spec, 0, decision, now=T0 + 61, stage_started_at=T0) is None


@pytest.mark.parametrize("deadline", [0, -1, 59])
def test_a_deadline_shorter_than_the_bake_time_is_refused(deadline: float) -> None:
    with pytest.raises(SpecError) as err:
        _spec(deadline_seconds=deadline)
    assert err.value.field == "stages[0].deadline_seconds"
    assert "at least the stage's bake_seconds (60)" in str(err.value)


def test_the_controller_pauses_a_rollout_held_by_a_device_reporting_downloading(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    setup_fleet(client)
    r1 = upload(client, make_bundle(tmp_path, keyring, release=1).path).json()
    rid = rollout(client, r1["id"], [{"name": "all", "percent": 100, "deadline_seconds": 30}],
                  gates={}, on_gate_failure="pause")
    engine = client.app.state.ctx.engine
    start = datetime.now(UTC)

    def heard(at: datetime) -> None:  # what the ingester writes for each device's status
        with Session(engine) as s:
            for d in ("c1", "m1", "m2"):
                device = s.get(Device, d)
                assert device is not None
                state = {"release": 1, "version": "x", "state": "committed"} if d != "m2" else {
                    "release": None, "version": None, "state": "downloading"}
                device.models = {"detector": state}
                device.last_seen = at
                s.add(device)
            s.commit()

    heard(start + timedelta(seconds=29))
    assert ctrl(client).tick(start + timedelta(seconds=29))[rid].verdict is eng.Verdict.WAIT
    assert status(client, rid)["state"] == "running"
    heard(start + timedelta(seconds=31))
    decision = ctrl(client).tick(start + timedelta(seconds=31))[rid]
    assert decision.verdict is eng.Verdict.FAIL and decision.gate == DEADLINE_GATE
    s = status(client, rid)
    assert s["state"] == "paused"
    assert "1 of 3 devices did not report the target committed at its deadline" in s["reason"]
    assert "m2 downloading" in s["reason"] and "(gate stage_deadline)" in s["reason"]

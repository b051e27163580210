"""Stages that cannot progress (fleet.rollout.stalls): pure decisions over engine output."""

from __future__ import annotations

from typing import Any

from fleet.rollout import engine as eng
from fleet.rollout.stalls import REFUSED_GATE, STALLED_GATE, Refusal, judge_stall, with_refusal_texts

T0 = 1_000_000.0


def _spec(**over: Any) -> eng.RolloutSpec:
    data: dict[str, Any] = {"name": "r", "bundle_id": 1, "stages": [{"name": "all", "bake_seconds": 60}],
                            "silent_after_s": 300, **over}
    return eng.parse_spec(data)


def _decide(spec: eng.RolloutSpec, devices: list[eng.DeviceState], events: list[eng.InstallEvent],
            now: float) -> eng.Decision:
    return eng.evaluate_stage(spec, 0, 12, devices, [], events, now=now, stage_started_at=T0)


def _devices() -> list[eng.DeviceState]:
    return [
        eng.DeviceState("d1", 0, release=12, state="committed", last_seen=T0 + 5, assigned_at=T0),
        eng.DeviceState("d2", 0, release=9, state="failed", last_seen=T0 + 5, assigned_at=T0),
    ]


def test_a_refusal_fails_the_stage_at_once_with_the_devices_words() -> None:
    spec = _spec()
    events = [eng.InstallEvent("d2", 12, "failed", "rollback")]
    decision = _decide(spec, _devices(), events, now=T0 + 10)
    assert decision.verdict is eng.Verdict.WAIT  # the engine alone would wait forever
    text = "release 12 is older than release 15 already accepted on this device"
    devices = with_refusal_texts(decision.devices, {"d2": Refusal("rollback", text)}, "r12 (1.2.0)")
    d2 = next(p for p in devices if p.device_id == "d2")
    assert d2.detail == f"refused r12 (1.2.0): rollback: {text}"
    stalled = judge_stall(spec, 0, eng.Decision(decision.verdict, decision.message, devices=devices,
                                                figures=decision.figures), now=T0 + 10, stage_started_at=T0)
    assert stalled is not None and stalled.verdict is eng.Verdict.FAIL
    assert stalled.gate == REFUSED_GATE
    assert stalled.message == (
        f"stage all: 1 of 2 devices refused the release (rollback): d2 refused r12 (1.2.0): rollback: {text}"
    )
    assert stalled.figures["refused"] == {"d2": "rollback"}


def test_a_refusal_counted_by_a_gate_does_not_end_the_stage() -> None:
    spec = _spec(gates={"max_install_failures": 1})
    events = [eng.InstallEvent("d2", 12, "failed", "rollback")]
    decision = _decide(spec, _devices(), events, now=T0 + 10)
    assert judge_stall(spec, 0, decision, now=T0 + 10, stage_started_at=T0) is None


def test_a_transient_failure_ends_the_stage_only_at_its_deadline() -> None:
    spec = _spec()
    events = [eng.InstallEvent("d2", 12, "failed", "download")]
    early = _decide(spec, _devices(), events, now=T0 + 299)
    assert judge_stall(spec, 0, early, now=T0 + 299, stage_started_at=T0) is None  # it may retry
    late = _decide(spec, _devices(), events, now=T0 + 301)
    stalled = judge_stall(spec, 0, late, now=T0 + 301, stage_started_at=T0)
    assert stalled is not None and stalled.gate == STALLED_GATE
    assert "cannot progress after 301 s (deadline 300 s): 1 of 2 devices will not reach the target" in (
        stalled.message
    )
    assert stalled.figures["stalled"] == {"d2": "failed"}


def test_a_device_still_moving_is_waited_for() -> None:
    spec = _spec()
    devices = [
        eng.DeviceState("d1", 0, release=12, state="committed", last_seen=T0 + 400, assigned_at=T0),
        eng.DeviceState("d2", 0, release=9, state="downloading", last_seen=T0 + 400, assigned_at=T0),
    ]
    decision = _decide(spec, devices, [], now=T0 + 401)
    assert decision.verdict is eng.Verdict.WAIT
    assert judge_stall(spec, 0, decision, now=T0 + 401, stage_started_at=T0) is None

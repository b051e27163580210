"""The pure rollout engine: spec validation, stage assignment, gate decisions, lifecycle."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.rollout.engine import (
    DeviceState,
    HealthWindow,
    InstallEvent,
    RolloutState,
    SpecError,
    TransitionError,
    Verdict,
    assign_stages,
    device_hash,
    evaluate_stage,
    parse_spec,
    transition,
)


def spec_dict(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "detector r12 to lab",
        "bundle_id": 3,
        "selector": {"site": "lab"},
        "stages": [
            {"name": "canary", "selector": {"ring": "canary"}, "min_devices": 1, "bake_seconds": 60},
            {"name": "half", "percent": 50, "bake_seconds": 120},
            {"name": "all", "percent": 100, "bake_seconds": 0},
        ],
        "gates": {"max_error_rate": 0.05, "min_inferences": 100, "max_install_failures": 0},
        "on_gate_failure": "rollback",
    }
    base.update(over)
    return base


def test_documented_spec_parses() -> None:
    spec = parse_spec(spec_dict())
    assert [s.name for s in spec.stages] == ["canary", "half", "all"]
    assert spec.gates.max_error_rate == 0.05
    assert spec.on_gate_failure == "rollback"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stages": []}, "stages"),
        ({"stages": [{"name": "a", "percent": 0}]}, "stages[0].percent"),
        ({"stages": [{"name": "a", "percent": 101}]}, "stages[0].percent"),
        ({"stages": [{"name": "a", "percent": "50"}]}, "stages[0].percent"),
        ({"stages": [{"name": "a", "bake_seconds": -1}]}, "stages[0].bake_seconds"),
        ({"stages": [{"name": "a", "min_devices": -2}]}, "stages[0].min_devices"),
        ({"stages": [{"name": "a"}, {"name": "a"}]}, "stages[1].name"),
        ({"stages": [{"name": "a", "colour": "red"}]}, "stages[0].colour"),
        ({"gates": {"max_error_rate": 1.5}}, "gates.max_error_rate"),
        ({"gates": {"max_error_rate": -0.1}}, "gates.max_error_rate"),
        ({"gates": {"min_inferences": -1}}, "gates.min_inferences"),
        ({"gates": {"max_install_failures": -1}}, "gates.max_install_failures"),
        ({"on_gate_failure": "explode"}, "on_gate_failure"),
        ({"selector": {"site": 3}}, "selector"),
        ({"stages": [{"name": "a", "selector": {"ring": True}}]}, "stages[0].selector"),
        ({"bundle_id": "3"}, "bundle_id"),
        ({"bundle_id": 0}, "bundle_id"),
        ({"name": " "}, "name"),
    ],
)
def test_spec_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_dict(**change))
    assert info.value.field.startswith(field), (info.value.field, str(info.value))
    assert str(info.value).startswith(info.value.field)


def test_missing_field_is_named() -> None:
    data = spec_dict()
    del data["bundle_id"]
    with pytest.raises(SpecError, match="bundle_id"):
        parse_spec(data)
    with pytest.raises(SpecError):
        parse_spec(["not", "an", "object"])


def fleet(n: int, **labels: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"dev-{i:04d}", {"site": "lab", "ring": "canary" if i < 3 else "main", **labels}) for i in range(n)
    ]


def test_assignment_is_cumulative_deterministic_and_selective() -> None:
    spec = parse_spec(spec_dict())
    devices = [*fleet(400), ("elsewhere", {"site": "home", "ring": "canary"})]
    a = assign_stages(7, spec, devices)
    assert a == assign_stages(7, spec, list(reversed(devices)))
    assert "elsewhere" not in a
    assert {a[f"dev-{i:04d}"] for i in range(3)} == {0}
    assert all(a[d] in (1, 2) for d, _ in devices[3:400])
    half = sum(1 for v in a.values() if v == 1)
    assert 150 < half < 250  # ~50% of 397 by hash
    assert len(a) == 400  # the last stage is 100%: everyone in the selector
    # another rollout id shuffles the halves
    assert assign_stages(8, spec, devices) != a


def test_assignment_is_stable_when_devices_join_or_leave() -> None:
    spec = parse_spec(spec_dict())
    devices = fleet(200)
    before = assign_stages(5, spec, devices)
    after = assign_stages(5, spec, devices[::2] + fleet(300)[200:])
    for device_id, stage in after.items():
        if device_id in before:
            assert before[device_id] == stage


def test_device_outside_every_stage_is_left_out() -> None:
    spec = parse_spec(spec_dict(stages=[{"name": "only-canary", "selector": {"ring": "canary"}}]))
    a = assign_stages(1, spec, fleet(10))
    assert set(a) == {"dev-0000", "dev-0001", "dev-0002"}


def test_device_hash_range() -> None:
    values = [device_hash(1, f"d{i}") for i in range(1000)]
    assert all(0 <= v < 1 for v in values)
    assert device_hash(1, "d1") == device_hash(1, "d1")


SPEC = parse_spec(spec_dict())
T0 = 1_000_000.0


def devs(*releases: int | None, stage: int = 0) -> list[DeviceState]:
    return [DeviceState(f"d{i}", stage, r, "committed") for i, r in enumerate(releases)]


def evaluate(
    devices: list[DeviceState],
    health: list[HealthWindow] = (),  # type: ignore[assignment]
    events: list[InstallEvent] = (),
    *,
    elapsed: float = 1000,
    stage: int = 0,  # type: ignore[assignment]
    spec: Any = SPEC,
) -> Any:
    return evaluate_stage(spec, stage, 12, devices, health, events, now=T0 + elapsed, stage_started_at=T0)


def good_health(n: int = 3, inferences: int = 200, errors: int = 1) -> list[HealthWindow]:
    return [HealthWindow(f"d{i}", 12, inferences, errors) for i in range(n)]


def test_waits_until_every_device_reports_the_release() -> None:
    d = evaluate(devs(12, 12, 11), good_health())
    assert d.verdict is Verdict.WAIT
    assert "2 of 3 devices report r12" in d.message


def test_waits_for_min_devices() -> None:
    d = evaluate([], [])
    assert d.verdict is Verdict.WAIT
    assert "0 of at least 1 devices" in d.message


def test_waits_for_bake_time() -> None:
    d = evaluate(devs(12, 12, 12), good_health(), elapsed=12)
    assert d.verdict is Verdict.WAIT
    assert "bake 12 s of 60 s" in d.message


def test_waits_for_min_inferences() -> None:
    d = evaluate(devs(12, 12, 12), good_health(inferences=20, errors=0), elapsed=30)
    assert d.verdict is Verdict.WAIT  # still baking
    # bake time over without the sample: inconclusive (default: pause), never a pass
    d = evaluate(devs(12, 12, 12), good_health(inferences=20, errors=0))
    assert d.verdict is Verdict.INCONCLUSIVE
    assert "inconclusive: gate max_error_rate has 60 of 100 inferences" in d.message
    assert "error_rate needs 100 inferences, has 60" in d.gates[0].message


def test_advances_when_all_holds() -> None:
    d = evaluate(devs(12, 12, 12), good_health())
    assert d.verdict is Verdict.ADVANCE, d.message
    assert {g.gate: g.status.value for g in d.gates} == {
        "max_error_rate": "pass",
        "max_install_failures": "pass",
        "max_local_rollbacks": "pass",  # on by default (0)
        "max_silent_devices": "pass",  # on by default (0)
    }


def test_last_stage_completes() -> None:
    d = evaluate(devs(12, 12, 12, stage=2), good_health(), stage=2)
    assert d.verdict is Verdict.COMPLETE


def test_error_rate_gate_fails_with_figures_even_before_bake() -> None:
    health = [HealthWindow("d0", 12, 200, 80), HealthWindow("d1", 12, 200, 40), HealthWindow("d2", 12, 12, 8)]
    d = evaluate(devs(12, 12, 11), health, elapsed=5)
    assert d.verdict is Verdict.FAIL
    assert d.gate == "max_error_rate"
    # per-device rates 0.4, 0.2, 0.67: the highest and the lowest are set aside
    assert d.message == (
        "stage canary: error_rate 0.40 > 0.05 over 412 inferences on 3 devices "
        "(set aside: 1 highest, 1 lowest)"
    )
    assert d.figures["errors"] == 128 and d.figures["inferences"] == 412


def test_error_rate_ignores_other_releases_and_later_stage_devices() -> None:
    devices = [*devs(12, 12, 12), DeviceState("late", 1, 12)]
    health = [*good_health(), HealthWindow("d0", 11, 1000, 1000), HealthWindow("late", 12, 1000, 1000)]
    assert evaluate(devices, health).verdict is Verdict.ADVANCE


def test_error_rate_below_min_inferences_does_not_fail() -> None:
    d = evaluate(devs(12), [HealthWindow("d0", 12, 10, 10)])
    assert d.verdict is Verdict.INCONCLUSIVE  # bake over, sample short: not a failure, not a pass


def test_install_failures_gate() -> None:
    events = [InstallEvent("d1", 12, "failed", "hash"), InstallEvent("d1", 12, "committed")]
    d = evaluate(devs(12, 11, 12), good_health(), events)
    assert d.verdict is Verdict.FAIL
    assert d.gate == "max_install_failures"
    assert "install_failures 1 > 0 on 1 device (hash)" in d.message
    # failures of another release or of devices outside the stage do not count
    other = [InstallEvent("d1", 11, "failed", "hash"), InstallEvent("zz", 12, "rolled_back")]
    assert evaluate(devs(12, 12, 12), good_health(), other).verdict is Verdict.ADVANCE


def test_install_failures_within_allowance() -> None:
    spec = parse_spec(spec_dict(gates={"max_install_failures": 1, "max_local_rollbacks": 1}))
    events = [InstallEvent("d1", 12, "rolled_back", "smoke_test")]
    assert evaluate(devs(12, 12, 12), [], events, spec=spec).verdict is Verdict.ADVANCE
    events = [InstallEvent("d1", 12, "failed", "hash")]
    assert evaluate(devs(12, 11, 12), [], events, spec=spec).verdict is Verdict.ADVANCE


def test_no_gates_advances_on_release_and_bake() -> None:
    spec = parse_spec(spec_dict(gates={}))
    assert evaluate(devs(12), [], spec=spec).verdict is Verdict.ADVANCE


def test_lifecycle_transitions() -> None:
    assert transition("created", "start") is RolloutState.RUNNING
    assert transition("running", "pause") is RolloutState.PAUSED
    assert transition("paused", "resume") is RolloutState.RUNNING
    assert transition("succeeded", "rollback") is RolloutState.ROLLED_BACK
    with pytest.raises(TransitionError, match="cannot start a rollout that is running"):
        transition("running", "start")
    with pytest.raises(TransitionError):
        transition("aborted", "resume")
    with pytest.raises(TransitionError):
        transition("bogus", "start")

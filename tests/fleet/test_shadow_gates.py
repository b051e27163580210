"""Shadow stages in the pure engine: spec rules, device progress, the shadow gates and their
inconclusive handling."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.rollout.engine import (
    DeviceState,
    GateStatus,
    InstallEvent,
    Progress,
    ShadowFigures,
    SpecError,
    Verdict,
    evaluate_stage,
    parse_spec,
)

T0 = 1_000_000.0
TARGET = 12
GATES = {"min_agreement": 0.98, "max_abs_error": 0.05, "max_candidate_p95_ratio": 2.0,
         "min_shadow_samples": 100, "min_devices": 2}


def spec(gates: dict[str, Any] | None = None, stages: list[dict[str, Any]] | None = None,
         **over: Any) -> Any:
    data: dict[str, Any] = {
        "name": "r12 in shadow",
        "bundle_id": 3,
        "stages": stages or [
            {"name": "shadow", "mode": "shadow", "bake_seconds": 60, "shadow_sample_rate": 0.2},
            {"name": "all", "percent": 100},
        ],
        "gates": GATES if gates is None else gates,
        **over,
    }
    return parse_spec(data)


def serving(n: int = 2) -> list[DeviceState]:
    """Devices serving r11 (they shadow r12), seen recently."""
    return [DeviceState(f"d{i}", 0, 11, "committed", online=True, last_seen=T0 + 50, assigned_at=T0)
            for i in range(n)]


def fig(device: str, samples: int = 200, agreed: int | None = None, **kw: Any) -> ShadowFigures:
    base: dict[str, Any] = {"max_abs_error": 0.01, "cosine_min": 0.999, "candidate_p95_ms": 1.2,
                            "current_p95_ms": 1.0}
    return ShadowFigures(device, TARGET, samples, samples if agreed is None else agreed, **{**base, **kw})


def run(s: Any, devices: Any, shadow: Any, events: Any = (), *, elapsed: float = 100, **kw: Any) -> Any:
    return evaluate_stage(s, 0, TARGET, devices, (), events, now=T0 + elapsed, stage_started_at=T0,
                          shadow=shadow, **kw)


def gate(decision: Any, name: str) -> Any:
    return next(g for g in decision.gates if g.gate == name)


@pytest.mark.parametrize(
    ("stages", "gates", "field", "text"),
    [
        ([{"name": "a", "mode": "shadow"}], None, "stages[0].mode", "last stage must be a switch stage"),
        ([{"name": "a"}, {"name": "b", "mode": "shadow"}, {"name": "c"}], None, "stages[1].mode",
         "must come before every switch stage"),
        (None, {"max_error_rate": 0.1}, "gates", "set min_agreement, max_abs_error or min_cosine"),
        ([{"name": "a", "mode": "shadow", "shadow_sample_rate": 0}, {"name": "b"}], None,
         "stages[0].shadow_sample_rate", "(0, 1]"),
        ([{"name": "a", "mode": "shadow", "shadow_max_busy_fraction": 1.5}, {"name": "b"}], None,
         "stages[0].shadow_max_busy_fraction", "(0, 1]"),
        (None, {**GATES, "min_agreement": 1.2}, "gates.min_agreement", "[0, 1]"),
        (None, {**GATES, "max_candidate_p95_ratio": 0}, "gates.max_candidate_p95_ratio", "> 0"),
        (None, {**GATES, "min_shadow_samples": -1}, "gates.min_shadow_samples", ">= 0"),
    ],
)
def test_shadow_spec_errors_name_the_field(stages: Any, gates: Any, field: str, text: str) -> None:
    with pytest.raises(SpecError) as info:
        spec(gates=gates, stages=stages)
    assert info.value.field == field, str(info.value)
    assert text in str(info.value)


def test_shadow_spec_defaults() -> None:
    s = spec(stages=[{"name": "shadow", "mode": "shadow"}, {"name": "all"}])
    assert (s.stages[0].shadow_sample_rate, s.stages[0].shadow_max_busy_fraction) == (0.1, 0.25)


def test_waits_until_every_device_reports_the_candidate_in_shadow() -> None:
    d = run(spec(), serving(), [fig("d0")])
    assert d.verdict is Verdict.WAIT
    assert d.message == "stage shadow: 1 of 2 devices report r12 in shadow (1 assigned)"
    assert {p.device_id: p.progress for p in d.devices} == {"d0": Progress.SHADOW, "d1": Progress.ASSIGNED}


def test_low_agreement_fails_with_its_figures() -> None:
    d = run(spec(), serving(), [fig("d0", 300, 120), fig("d1", 200, 80)], elapsed=10)
    assert d.verdict is Verdict.FAIL and d.gate == "min_agreement"
    # each device weighs its samples capped at the largest other device's: 200 + 200
    assert d.message == ("stage shadow: shadow agreement 0.40 < 0.98 over 400 samples on 2 devices "
                         "(r12 vs the serving release; 99% upper bound 0.458, effective sample 400, "
                         "device spread 0.00)")
    g = gate(d, "min_agreement")
    assert (g.observed, g.threshold, g.sample, g.min_sample, g.unit) == (0.4, 0.98, 400, 100, "samples")
    assert g.figures["per_device"] == {"d0": 0.4, "d1": 0.4}


def test_bad_news_needs_its_sample_too() -> None:
    d = run(spec(), serving(), [fig("d0", 30, 0), fig("d1", 20, 0)], elapsed=10)
    assert d.verdict is Verdict.WAIT
    assert gate(d, "min_agreement").status is GateStatus.WAIT


def test_abs_error_and_candidate_latency_gates() -> None:
    d = run(spec(), serving(), [fig("d0"), fig("d1", max_abs_error=0.3)])
    assert d.verdict is Verdict.FAIL and d.gate == "max_abs_error"
    assert "shadow max_abs_error 0.3 > 0.05 over 400 samples on 2 devices, worst on d1" in d.message
    d = run(spec(), serving(), [fig("d0", candidate_p95_ms=5.0), fig("d1", candidate_p95_ms=3.0)])
    assert d.verdict is Verdict.FAIL and d.gate == "max_candidate_p95_ratio"
    assert "candidate p95 ratio 4.00 > 2.0 (p95 4.00 ms vs 1.00 ms" in d.message


def test_cosine_gate_names_the_worst_device() -> None:
    gates = {"min_agreement": 0.5, "min_cosine": 0.99, "min_shadow_samples": 100, "min_devices": 2}
    d = run(spec(gates), serving(), [fig("d0"), fig("d1", cosine_min=0.9)])
    assert d.verdict is Verdict.FAIL and d.gate == "min_cosine"
    assert "shadow cosine 0.9000 < 0.99 over 400 samples on 2 devices, worst on d1" in d.message
    g = gate(d, "min_cosine")
    assert (g.observed, g.threshold, g.figures["device"]) == (0.9, 0.99, "d1")
    d = run(spec(gates), serving(), [fig("d0"), fig("d1")])
    assert gate(d, "min_cosine").status is GateStatus.PASS
    assert "shadow cosine 0.9990 >= 0.99" in gate(d, "min_cosine").message


def test_inconclusive_when_the_bake_time_ends_without_enough_samples() -> None:
    d = run(spec(), serving(), [fig("d0", 30), fig("d1", 20)])
    assert d.verdict is Verdict.INCONCLUSIVE
    # 30 samples weigh 20, as much as the other device's
    assert d.message.startswith("stage shadow: inconclusive: gate min_agreement has 40 of 100 samples")
    d = run(spec(on_inconclusive="extend"), serving(), [fig("d0", 30), fig("d1", 20)])
    assert d.verdict is Verdict.EXTEND


def test_passes_in_shadow_then_the_next_stage_switches() -> None:
    d = run(spec(), serving(), [fig("d0"), fig("d1", agreed=199)])
    assert d.verdict is Verdict.ADVANCE, d.message
    assert d.message.startswith(
        "stage shadow: passed in shadow (shadow agreement 1.00 >= 0.98 over 400 samples")
    assert d.message.endswith("devices switch to r12")
    # before the bake time is over it waits
    assert run(spec(), serving(), [fig("d0"), fig("d1")], elapsed=30).verdict is Verdict.WAIT


def test_old_figures_of_another_release_do_not_count() -> None:
    stale = ShadowFigures("d0", 10, 500, 500)
    d = run(spec(), serving(), [stale, fig("d1")])
    assert d.verdict is Verdict.WAIT and "1 of 2 devices report r12 in shadow" in d.message


def test_a_refused_candidate_is_an_install_failure() -> None:
    events = [InstallEvent("d1", TARGET, "failed", "signature", 11)]
    d = run(spec({**GATES, "max_install_failures": 0}), serving(), [fig("d0")], events)
    assert d.verdict is Verdict.FAIL and d.gate == "max_install_failures"
    assert "install_failures 1 > 0 on 1 device (signature)" in d.message


def test_switch_stages_ignore_the_shadow_gates() -> None:
    s = spec(stages=[{"name": "shadow", "mode": "shadow"}, {"name": "all", "bake_seconds": 0}])
    devices = [DeviceState(f"d{i}", 0, TARGET, "committed", online=True, last_seen=T0 + 50, assigned_at=T0)
               for i in range(2)]
    d = evaluate_stage(s, 1, TARGET, devices, (), (), now=T0 + 100, stage_started_at=T0)
    assert d.verdict is Verdict.COMPLETE, d.message
    assert not any(g.gate.startswith(("min_agreement", "max_abs")) for g in d.gates)

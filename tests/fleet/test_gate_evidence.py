"""Gates under hostile devices (issue 16): what one device's claims can and cannot decide.
The pure engine, no database: fleet.rollout.evidence and the gates that use it."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fleet.rollout.engine import (
    DeviceState,
    GateStatus,
    HealthWindow,
    ShadowFigures,
    SpecError,
    Verdict,
    evaluate_stage,
    parse_spec,
)
from fleet.rollout.evidence import WINDOW_SLACK_S, capped_weights, trim_count, trimmed_mean

T0 = 1_000_000.0
TARGET = 12
ELAPSED = 100.0
GATES = {"max_error_rate": 0.05, "min_inferences": 400}


def spec(**gates: Any) -> Any:
    return parse_spec({
        "name": "r12", "bundle_id": 3,
        "stages": [{"name": "canary", "bake_seconds": 60}, {"name": "all"}],
        "gates": {**GATES, **gates},
    })


def device(name: str, *, assigned_at: float | None = T0) -> DeviceState:
    return DeviceState(name, 0, TARGET, "committed", assigned_at=assigned_at)


def real(n: int, inferences: int = 300, errors: int = 0, prefix: str = "real") -> list[HealthWindow]:
    """Each real device: three windows (seq 1..3) received during the stage."""
    out = []
    for i in range(n):
        for seq in range(1, 4):
            out.append(HealthWindow(f"{prefix}{i}", TARGET, inferences // 3, errors // 3, p95_ms=10.0,
                                    seq=seq, ts=T0 + seq, received_at=T0 + seq))
    return out


def claim(name: str, inferences: int, errors: int = 0, *, seq: int = 1, **kw: Any) -> HealthWindow:
    return HealthWindow(name, TARGET, inferences, errors, seq=seq, ts=T0 + seq, received_at=T0 + seq, **kw)


def run(s: Any, names: list[str], health: list[HealthWindow], *, elapsed: float = ELAPSED) -> Any:
    devices = [device(n) for n in names]
    return evaluate_stage(s, 0, TARGET, devices, health, [], now=T0 + elapsed, stage_started_at=T0)


def names(n: int, prefix: str = "real") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def error_gate(decision: Any) -> Any:
    return next(g for g in decision.gates if g.gate == "max_error_rate")


# -- weights and trimming ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "weights"),
    [
        ({}, {}),
        ({"a": 5}, {"a": 5}),  # a lone device keeps its own
        ({"a": 10**6, "b": 10}, {"a": 10, "b": 10}),
        ({"a": 10**6, "b": 300, "c": 20}, {"a": 300, "b": 300, "c": 20}),
        ({"a": 50, "b": 50, "c": 1}, {"a": 50, "b": 50, "c": 1}),  # a tie at the top keeps both
        ({"a": 0, "b": 0}, {"a": 0, "b": 0}),
    ],
)
def test_no_device_weighs_more_than_the_largest_other(
    counts: dict[str, int], weights: dict[str, int]
) -> None:
    assert capped_weights(counts) == weights


@pytest.mark.parametrize(("devices", "trim", "k"), [
    (0, 1, 0), (1, 1, 0), (2, 1, 0), (3, 1, 1), (4, 1, 1), (5, 1, 1), (100, 1, 1),
    (4, 2, 1), (5, 2, 2), (9, 3, 3), (7, 0, 0),
])
def test_devices_set_aside_leave_at_least_one(devices: int, trim: int, k: int) -> None:
    assert trim_count(devices, trim) == k


def test_trimmed_mean_sets_aside_both_ends_and_weighs_the_rest() -> None:
    t = trimmed_mean({"a": 0.0, "b": 0.1, "c": 0.3, "d": 1.0}, {"a": 9, "b": 1, "c": 3, "d": 9}, 1)
    assert (t.low, t.kept, t.high) == (("a",), ("b", "c"), ("d",))
    assert t.value == pytest.approx((0.1 * 1 + 0.3 * 3) / 4)
    assert trimmed_mean({}, {}, 1).value == 0.0


# -- a fake device claiming healthy inferences -----------------------------------------


@pytest.mark.parametrize("reals", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("fake_inferences", [10**6, 10**12, 200_000, 300])
def test_a_fake_healthy_device_does_not_let_a_faulty_release_pass(reals: int, fake_inferences: int) -> None:
    """Every real device fails 30 % of its inferences; a fake canary claims healthy ones
    (absurd, plausible-but-huge, or ordinary amounts): the stage fails, whatever the claim."""
    health = [*real(reals, inferences=600, errors=180), claim("fake", fake_inferences)]
    d = run(spec(), [*names(reals), "fake"], health)
    assert d.verdict is Verdict.FAIL and d.gate == "max_error_rate", d.message
    assert error_gate(d).observed >= 0.15  # at worst halved, with one real device beside it


def test_a_fake_device_alone_cannot_make_up_the_sample() -> None:
    """One real device with 20 inferences: short of 400, so the stage is inconclusive; a fake
    million beside it weighs 20, not 400, and leaves it inconclusive instead of passing."""
    health = [claim("real0", 20, 10), claim("fake", 10**6), claim("fake", 150_000, seq=2)]
    d = run(spec(), ["real0", "fake"], health)
    g = error_gate(d)
    assert g.status is GateStatus.FAIL or d.verdict is Verdict.INCONCLUSIVE
    assert g.sample == 40 and g.figures["per_device"]["fake"]["weight"] == 20
    assert g.figures["refused"] == {"fake": {"implausible": 1}}


def test_a_million_inferences_in_100_s_are_refused_as_implausible() -> None:
    ceiling = int(2000 * (ELAPSED + WINDOW_SLACK_S))
    health = [*real(3), claim("fake", 10**6), claim("fake", ceiling, seq=2), claim("fake", 1, seq=3)]
    d = run(spec(), [*names(3), "fake"], health)
    g = error_gate(d)
    # the million is refused; the ceiling itself is taken; one more past it is refused too
    assert g.figures["refused"] == {"fake": {"implausible": 2}}
    assert g.figures["inferences"] == 3 * 300 + ceiling
    assert g.figures["per_device"]["fake"]["weight"] == 300


def test_the_ceiling_follows_the_rate_a_device_could_serve() -> None:
    s = spec(max_device_rate=1.0)  # one inference a second: 220 in 100 s with the slack
    d = run(s, ["real0"], [claim("real0", 200), claim("real0", 21, seq=2)])
    assert error_gate(d).figures["inferences"] == 200
    assert error_gate(d).figures["refused"] == {"real0": {"implausible": 1}}


def test_windows_from_before_the_device_was_assigned_do_not_count() -> None:
    late = DeviceState("late", 0, TARGET, "committed", assigned_at=T0 + 50)
    early = HealthWindow("late", TARGET, 5000, 0, seq=1, ts=T0 + 10, received_at=T0 + 10)
    d = evaluate_stage(spec(), 0, TARGET, [device("real0"), late], [*real(1, 600, 180), early], [],
                       now=T0 + ELAPSED, stage_started_at=T0)
    assert error_gate(d).figures["refused"] == {"late": {"unassigned": 1}}
    assert d.verdict is Verdict.FAIL


# -- one device flooding errors ---------------------------------------------------------


@pytest.mark.parametrize("clean", [2, 3, 5, 10])
@pytest.mark.parametrize("flood", [(10**6, 10**6), (200_000, 200_000), (300, 300), (50, 50)])
def test_one_device_flooding_errors_does_not_fail_a_clean_stage(clean: int, flood: tuple[int, int]) -> None:
    health = [*real(clean), claim("flood", *flood)]
    d = run(spec(), [*names(clean), "flood"], health)
    assert d.verdict is Verdict.ADVANCE, d.message
    g = error_gate(d)
    assert g.status is GateStatus.PASS and g.observed == 0.0
    # set aside as the highest rate, or refused outright when it claims more than it could serve
    assert g.figures["set_aside_high"] == ["flood"] or g.figures["refused"] == {"flood": {"implausible": 1}}


def test_with_two_devices_a_flood_counts_for_its_own_half() -> None:
    """The cost of judging small stages: with two devices nothing is set aside, so a device
    whose every inference fails fails the stage (its rate counts for its half)."""
    flood = [claim("flood", 10**6, 10**6), claim("flood", 300, 300, seq=2)]
    d = run(spec(), ["real0", "flood"], [*real(1), *flood])
    assert d.verdict is Verdict.FAIL
    assert error_gate(d).observed == pytest.approx(0.5)


def test_two_hostile_devices_need_trim_devices_two() -> None:
    health = [*real(4), claim("flood0", 300, 300), claim("flood1", 300, 300)]
    members = [*names(4), "flood0", "flood1"]
    assert run(spec(), members, health).verdict is Verdict.FAIL  # 1 set aside: 1 of 5 still floods
    assert run(spec(trim_devices=2), members, health).verdict is Verdict.ADVANCE


def test_a_problem_on_one_device_of_three_is_left_to_the_count_gates() -> None:
    """The other cost: one real device failing alone among three is set aside by the rate
    gate (it is indistinguishable from a liar); its local rollback still fails the stage."""
    health = [*real(2), *real(1, errors=300, prefix="sick")]
    d = run(spec(), [*names(2), "sick0"], health)
    assert error_gate(d).status is GateStatus.PASS
    two_sick = [*real(1), *real(2, errors=300, prefix="sick")]
    assert run(spec(), ["real0", "sick0", "sick1"], two_sick).verdict is Verdict.FAIL


# -- malformed and replayed reports change no gate --------------------------------------


BAD = [
    ("negative", claim("real0", -10**6, 0, seq=90)),
    ("negative", claim("real0", 100, -50, seq=91)),
    ("errors_above_inferences", claim("real0", 10, 10**6, seq=92)),
    ("not_finite", claim("real0", 100, 0, seq=93, p95_ms=math.nan)),
    ("not_finite", claim("real0", 100, 0, seq=94, drift=math.inf)),
    ("negative", claim("real0", 100, 0, seq=95, p95_ms=-1.0)),
]


@pytest.mark.parametrize(("reason", "window"), BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
def test_a_malformed_window_is_refused_and_counted(reason: str, window: HealthWindow) -> None:
    s = spec(max_drift=0.3, max_latency_ratio=1.5)
    clean = [*real(3, errors=3)]
    before = run(s, names(3), clean)
    after = run(s, names(3), [*clean, window])
    assert [(g.gate, g.status, g.observed, g.sample) for g in after.gates] == [
        (g.gate, g.status, g.observed, g.sample) for g in before.gates
    ]
    assert error_gate(after).figures["refused"] == {"real0": {reason: 1}}


def test_replayed_windows_change_no_gate() -> None:
    health = [*real(2, errors=0), *real(1, errors=90, prefix="sick")]
    before = run(spec(), [*names(2), "sick0"], health)
    replayed = [*health, *[h for h in health if h.device_id == "real0"] * 1000]
    after = run(spec(), [*names(2), "sick0"], replayed)
    assert error_gate(after).observed == error_gate(before).observed
    assert error_gate(after).sample == error_gate(before).sample
    assert error_gate(after).figures["refused"] == {"real0": {"replayed": 3000}}


def test_a_drift_claim_of_one_device_does_not_decide() -> None:
    s = spec(max_drift=0.3, min_devices=2)
    health = [*[claim(f"real{i}", 300, drift=0.05) for i in range(3)], claim("liar", 300, drift=50.0)]
    d = run(s, [*names(3), "liar"], health)
    g = next(g for g in d.gates if g.gate == "max_drift")
    assert g.status is GateStatus.PASS and g.figures["set_aside_high"] == ["liar"]


@pytest.mark.parametrize(("gates", "name", "text"), [
    ({"max_device_rate": 0}, "gates.max_device_rate", "> 0"),
    ({"max_device_rate": math.inf}, "gates.max_device_rate", "> 0"),
    ({"trim_devices": -1}, "gates.trim_devices", ">= 0"),
])
def test_claim_settings_are_validated(gates: dict[str, Any], name: str, text: str) -> None:
    with pytest.raises(SpecError) as exc:
        spec(**gates)
    assert exc.value.field == name and text in str(exc.value)


def test_defaults() -> None:
    g = spec().gates
    assert (g.max_device_rate, g.trim_devices) == (2000.0, 1)


# -- shadow stages ----------------------------------------------------------------------

SHADOW_GATES = {"min_agreement": 0.98, "max_abs_error": 0.05, "min_shadow_samples": 100, "min_devices": 1}


def shadow_run(figures: list[ShadowFigures], n: int) -> Any:
    s = parse_spec({
        "name": "r12 in shadow", "bundle_id": 3,
        "stages": [{"name": "shadow", "mode": "shadow", "bake_seconds": 60}, {"name": "all"}],
        "gates": SHADOW_GATES,
    })
    devices = [DeviceState(f"d{i}", 0, 11, "committed", online=True, last_seen=T0 + 50, assigned_at=T0)
               for i in range(n)]
    return evaluate_stage(s, 0, TARGET, devices, (), [], now=T0 + ELAPSED, stage_started_at=T0,
                          shadow=figures)


def shadow(device: str, samples: int = 200, agreed: int | None = None, **kw: Any) -> ShadowFigures:
    return ShadowFigures(device, TARGET, samples, samples if agreed is None else agreed,
                         **{"max_abs_error": 0.01, **kw})


def test_a_fake_shadow_device_does_not_outvote_real_disagreement() -> None:
    """Real devices agree on 50 %; a fake claims a perfect agreement on a billion samples."""
    figures = [shadow("d0", 200, 100), shadow("d1", 10**9)]
    d = shadow_run(figures, 2)
    assert d.verdict is Verdict.FAIL and d.gate == "min_agreement"
    g = next(g for g in d.gates if g.gate == "min_agreement")
    assert g.figures["refused"] == {"d1": {"implausible": 1}} and g.observed == 0.5
    # plausible but huge: weighs as much as the real device, and the stage still fails
    d = shadow_run([shadow("d0", 200, 100), shadow("d1", 100_000)], 2)
    assert d.verdict is Verdict.FAIL and next(g for g in d.gates if g.gate == "min_agreement").sample == 400


def test_one_shadow_device_cannot_fail_three() -> None:
    # 400 samples each: after d2 and one agreeing device are set aside, the one device kept
    # must carry enough evidence alone (99 % Wilson lower bound 0.987 >= 0.98)
    figures = [shadow("d0", 400), shadow("d1", 400), shadow("d2", 400, 0, max_abs_error=9.0)]
    d = shadow_run(figures, 3)
    assert d.verdict is Verdict.ADVANCE, d.message
    # two devices with the problem still fail it
    figures = [shadow("d0"), shadow("d1", 200, 0, max_abs_error=9.0), shadow("d2", 200, 0, max_abs_error=9.0)]
    assert shadow_run(figures, 3).verdict is Verdict.FAIL


@pytest.mark.parametrize("bad", [
    {"agreed": -5}, {"samples": 10, "agreed": 11}, {"max_abs_error": math.nan}, {"cosine_min": 7.0},
    {"candidate_p95_ms": -1.0},
])
def test_malformed_shadow_figures_are_refused(bad: dict[str, Any]) -> None:
    good = [shadow("d0"), shadow("d1")]
    before = shadow_run(good, 3)
    kw = {"samples": 200, **bad}
    samples = kw.pop("samples")
    after = shadow_run([*good, shadow("d2", samples, **kw)], 3)
    g = next(g for g in after.gates if g.gate == "min_agreement")
    assert set(g.figures["refused"]) == {"d2"}
    assert g.observed == next(g for g in before.gates if g.gate == "min_agreement").observed


# -- the device that reports first ------------------------------------------------------


def progressing(name: str) -> DeviceState:
    """A real device still downloading the release: nothing reported yet."""
    return DeviceState(name, 0, 11, "downloading", assigned_at=T0, last_seen=T0 + 1)


def test_a_flood_that_reports_before_the_real_devices_does_not_decide() -> None:
    """A hostile device needs no download: its errors arrive before any real device reports.
    The rate gate waits for 3 devices (2 x trim_devices + 1), so it neither fails nor passes."""
    devices = [progressing("real0"), progressing("real1"), device("flood")]
    d = evaluate_stage(spec(), 0, TARGET, devices, [claim("flood", 1000, 1000)], [],
                       now=T0 + 5, stage_started_at=T0)
    g = error_gate(d)
    assert d.verdict is Verdict.WAIT and g.status is GateStatus.WAIT
    assert g.message == "error_rate needs 3 devices, has 1 reporting"


def test_a_fake_canary_reporting_first_does_not_pass_the_stage() -> None:
    devices = [progressing("real0"), device("fake")]
    d = evaluate_stage(spec(), 0, TARGET, devices, [claim("fake", 100_000)], [],
                       now=T0 + 100, stage_started_at=T0)
    assert d.verdict is Verdict.WAIT and error_gate(d).status is GateStatus.WAIT


def test_a_device_whose_every_report_is_refused_does_not_hold_the_stage() -> None:
    """Only absurd claims: no evidence, and no reason to wait for it either."""
    health = [*real(1, 600, 180), claim("fake", 10**9), claim("fake", -1, seq=2)]
    d = run(spec(), ["real0", "fake"], health)
    assert d.verdict is Verdict.FAIL and d.gate == "max_error_rate"


def test_idle_devices_count_as_reporting_and_silent_ones_are_not_waited_for() -> None:
    # two devices without traffic report windows of 0 inferences: the busy one decides
    health = [*real(1, 600, 180), claim("idle0", 0), claim("idle1", 0)]
    assert run(spec(), ["real0", "idle0", "idle1"], health).verdict is Verdict.FAIL
    # a device silent past the deadline is not expected to report (max_silent_devices judges it)
    silent = DeviceState("gone", 0, 11, "downloading", assigned_at=T0, last_seen=T0)
    d = evaluate_stage(spec(max_silent_devices=None), 0, TARGET, [device("real0"), silent],
                       real(1, 600, 180), [], now=T0 + 1000, stage_started_at=T0)
    assert d.verdict is Verdict.FAIL and d.gate == "max_error_rate"


def test_the_error_rate_states_its_evidence() -> None:
    """Beside the rate: its 99 % Wilson bounds on the effective sample of the devices kept,
    and the devices' spread (fleet.rollout.bounds)."""
    health = real(2, 300, 0) + real(1, 300, 30, prefix="bad")
    g = error_gate(run(spec(), [*names(2), "bad0"], health))
    f = g.figures
    # one device kept of three (trim 1): its 300 inferences without an error
    assert (f["effective_inferences"], f["lower_bound"], f["confidence"]) == (300.0, 0.0, 0.99)
    assert f["upper_bound"] == pytest.approx(5.4119 / (300 + 5.4119), abs=1e-4)
    assert f["device_spread"] == pytest.approx(0.1)

"""The device's trial judgement (agent.update.gating.judge_trial): pure, table-driven."""

from __future__ import annotations

import random

import pytest

from agent.update.gating import TrialFigures, TrialLimits, judge_trial, quantile_bounds
from shared.telemetry.vocabulary import ReasonCode


def latencies(ms: float, n: int, seed: int, jitter: float = 0.2) -> list[float]:
    """``n`` latencies around ``ms`` milliseconds (seconds), +-``jitter`` of it, seeded."""
    rng = random.Random(seed)
    return [ms / 1000 * (1 + rng.uniform(-jitter, jitter)) for _ in range(n)]


LIMITS = TrialLimits()


@pytest.mark.parametrize("seed", range(20))
def test_a_release_three_times_slower_rolls_back_with_trial_latency(seed: int) -> None:
    f = TrialFigures(200, 0, latencies(6.0, 200, seed), latencies(2.0, 200, seed + 100))
    j = judge_trial(f, LIMITS)
    assert j.reason is ReasonCode.TRIAL_LATENCY, j.message
    assert j.message.startswith("p95 ") and "vs " in j.message and "bound x2" in j.message


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("slower", [1.0, 1.3, 1.6])
def test_a_release_within_the_bound_commits(seed: int, slower: float) -> None:
    f = TrialFigures(200, 0, latencies(2.0 * slower, 200, seed), latencies(2.0, 200, seed + 100))
    j = judge_trial(f, LIMITS)
    assert j.reason is None, j.message
    assert "p95" in j.message and "error rate 0.000 (0/200 inferences)" in j.message


def test_errors_are_judged_first() -> None:
    f = TrialFigures(10, 6, latencies(6.0, 10, 1), latencies(2.0, 100, 2))
    j = judge_trial(f, LIMITS)
    assert (j.reason, j.message) == (ReasonCode.TRIAL_ERRORS, "error rate 0.600 (6/10 inferences), bound 0.5")


@pytest.mark.parametrize(("new", "old", "why"), [
    (100, 0, "100 trial and 0 previous samples, needs 20 each"),  # first install, restart in trial
    (5, 300, "5 trial and 300 previous samples, needs 20 each"),  # too little traffic in trial
])
def test_latency_is_not_judged_without_its_samples(new: int, old: int, why: str) -> None:
    j = judge_trial(TrialFigures(new, 0, latencies(50.0, new, 1), latencies(1.0, old, 2)), LIMITS)
    assert j.reason is None and why in j.message


def test_latency_off_judges_errors_only() -> None:
    f = TrialFigures(100, 0, latencies(50.0, 100, 1), latencies(1.0, 100, 2))
    j = judge_trial(f, TrialLimits(max_latency_ratio=None))
    assert j.reason is None and "p95" not in j.message


def test_a_few_slow_outliers_on_a_small_sample_are_not_enough() -> None:
    """20 trial samples of which 2 are slow: the p95's lower bound is a fast one."""
    new = [0.002] * 18 + [0.050, 0.060]
    j = judge_trial(TrialFigures(20, 0, new, [0.002] * 20), LIMITS)
    assert j.reason is None, j.message


def test_a_fast_model_on_a_busy_cpu_is_not_judged_slower() -> None:
    """0.05 ms to 0.5 ms: ten times slower, but by less than min_latency_delta_ms (2 ms)."""
    f = TrialFigures(200, 0, latencies(0.5, 200, 1), latencies(0.05, 200, 2))
    assert judge_trial(f, LIMITS).reason is None
    assert judge_trial(f, TrialLimits(min_latency_delta_ms=0.1)).reason is ReasonCode.TRIAL_LATENCY


def test_quantile_bounds_bracket_the_quantile() -> None:
    for n in (1, 5, 20, 100, 1000):
        values = [i / n for i in range(n)]
        lo, hi = quantile_bounds(values)
        p95 = values[min(n - 1, int(0.95 * n))]
        assert lo <= p95 <= hi
    # ranks 950 -+ 2.326 x sqrt(1000 x 0.95 x 0.05) = 933.97 and 966.03: the 933rd and 967th values
    assert quantile_bounds([float(i) for i in range(1000)]) == (932.0, 966.0)

"""The gates' confidence bounds (fleet.rollout.bounds): pure and exhaustive."""

from __future__ import annotations

import math

import pytest

from fleet.rollout.bounds import (
    CONFIDENCE,
    MAX_NEEDED,
    samples_to_decide,
    share_evidence,
    wilson_interval,
    z_of,
)


@pytest.mark.parametrize(("p", "n", "lower", "upper"), [
    # two-sided 95 % Wilson intervals (one-sided 97.5 % each way), textbook values
    (0.5, 100, 0.4038, 0.5962),
    (0.0, 10, 0.0, 0.2775),
    (1.0, 10, 0.7225, 1.0),
    (0.2, 50, 0.1124, 0.3304),
])
def test_wilson_matches_published_intervals(p: float, n: int, lower: float, upper: float) -> None:
    lo, hi = wilson_interval(p, n, 0.975)
    assert (round(lo, 4), round(hi, 4)) == (lower, upper)


def test_no_sample_bounds_nothing() -> None:
    assert wilson_interval(0.7, 0) == (0.0, 1.0)
    assert z_of() == pytest.approx(2.3263, abs=1e-4) and CONFIDENCE == 0.99


def _pmf(k: int, n: int, p: float) -> float:
    return math.comb(n, k) * p**k * (1 - p) ** (n - k)


@pytest.mark.parametrize("n", [20, 50, 100, 200, 500])
def test_each_bound_holds_at_its_confidence_over_a_grid_of_true_shares(n: int) -> None:
    """Exact binomial coverage of each one-sided bound, averaged over true shares in
    [0.5, 0.99]: at least 98 % for a nominal 99 % (the allowance: Wilson's coverage
    oscillates around the nominal level on small samples), and never below 93 % at any share
    (its known dip near the edges at 20 samples)."""
    shares = [0.5 + 0.01 * i for i in range(50)]
    lower_cover, upper_cover = [], []
    for p in shares:
        below = above = 0.0
        for k in range(n + 1):
            lo, hi = wilson_interval(k / n, n)
            w = _pmf(k, n, p)
            below += w if lo <= p else 0.0
            above += w if hi >= p else 0.0
        lower_cover.append(below)
        upper_cover.append(above)
    for cover in (lower_cover, upper_cover):
        assert sum(cover) / len(cover) >= 0.98, (n, sum(cover) / len(cover))
        assert min(cover) >= 0.93, (n, min(cover))


def test_bounds_narrow_with_the_sample_and_bracket_the_share() -> None:
    for p in (0.0, 0.3, 0.8, 0.95, 1.0):
        widths = []
        for n in (10, 100, 1000, 10000):
            lo, hi = wilson_interval(p, n)
            assert 0.0 <= lo <= p <= hi <= 1.0
            widths.append(hi - lo)
        assert widths == sorted(widths, reverse=True)


def test_equal_devices_without_spread_count_every_sample() -> None:
    ev = share_evidence({"a": 0.9, "b": 0.9}, {"a": 100, "b": 100}, {"a": 100, "b": 100})
    assert (ev.value, ev.samples, ev.devices, ev.spread) == (pytest.approx(0.9), 200, 2, 0.0)
    assert ev.effective == pytest.approx(200)


def test_devices_at_zero_and_one_are_worth_a_couple_of_samples() -> None:
    """What an aligned sampler produced: each device saw only one camera."""
    ev = share_evidence({"a": 0.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0},
                        dict.fromkeys("abcde", 44), dict.fromkeys("abcde", 44.0))
    assert ev.value == pytest.approx(0.8) and ev.samples == 220 and ev.spread == 1.0
    assert ev.effective < 10
    lo, hi = ev.interval()
    assert lo < 0.6 and hi > 0.95  # undecided, where the point estimate alone said 0.80


def test_capped_weights_lower_the_effective_sample_never_raise_it() -> None:
    # a device capped from 300 to 200 samples: its 100 extra samples add nothing
    ev = share_evidence({"a": 0.5, "b": 0.5}, {"a": 300, "b": 200}, {"a": 200, "b": 200})
    assert ev.samples == 400 and ev.effective == pytest.approx(400)
    # a device weighing a tenth of its samples: 110 weighed samples, 110 effective
    ev = share_evidence({"a": 0.5, "b": 0.5}, {"a": 100, "b": 100}, {"a": 100, "b": 10})
    assert ev.effective == pytest.approx(110)


def test_no_device_no_evidence() -> None:
    ev = share_evidence({}, {}, {})
    assert (ev.samples, ev.effective, ev.devices) == (0, 0.0, 0)
    assert ev.interval() == (0.0, 1.0)


@pytest.mark.parametrize(("p", "threshold"), [(0.99, 0.95), (0.9, 0.95), (0.97, 0.95), (0.5, 0.6)])
def test_samples_to_decide_is_the_smallest_that_decides(p: float, threshold: float) -> None:
    n = samples_to_decide(p, threshold)
    lo, hi = wilson_interval(p, n)
    lo1, hi1 = wilson_interval(p, n - 1)
    if p > threshold:
        assert lo >= threshold > lo1
    else:
        assert hi < threshold <= hi1
    # a design effect of 3 (a third of the samples effective) needs three times as many
    assert samples_to_decide(p, threshold, design=3) == pytest.approx(3 * n, abs=3)


def test_a_share_at_its_threshold_never_decides() -> None:
    assert samples_to_decide(0.95, 0.95) == MAX_NEEDED

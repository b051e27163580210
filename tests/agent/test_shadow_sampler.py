"""The shadow sampler against periodic traffic: pure, exhaustive over rates, periods and seeds."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from agent.runtime.shadow import Sampler

RATES = (0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.7, 1.0)


@pytest.mark.parametrize("rate", RATES)
def test_takes_its_rate_in_any_prefix(rate: float) -> None:
    """Whole 1/rate: exact to one sample in every prefix; otherwise the block lengths vary
    (floor or ceil of 1/rate) and the count strays by a few of their standard deviations."""
    span = 1 / rate
    short = math.floor(span + 1e-9)
    q = span - short  # share of long blocks
    whole = q < 1e-9
    s = Sampler(rate, seed=7)
    taken = 0
    for n in range(1, 20_001):
        taken += s.take()
        slack = 1.0 if whole else 1.0 + 5 * math.sqrt(n * q * (1 - q) / span**3)
        assert abs(taken - n * rate) <= slack, (rate, n, taken)


@pytest.mark.parametrize("period", [2, 3, 5, 7, 10, 20])
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3])
def test_every_phase_of_periodic_traffic_is_sampled_alike(period: int, rate: float) -> None:
    """Traffic that cycles through ``period`` sources (cameras): each source gets its share
    of the samples, within 4.5 standard deviations of a fair draw."""
    calls = 40_000
    s = Sampler(rate, seed=period * 1000 + int(rate * 100))
    phases = Counter(i % period for i in range(calls) if s.take())
    total = sum(phases.values())
    share = 1 / period
    sd = math.sqrt(total * share * (1 - share))
    for phase in range(period):
        assert abs(phases[phase] - total * share) <= 4.5 * sd, (period, rate, phases)


def test_a_strict_stride_would_align_and_this_one_does_not() -> None:
    """The sampler it replaces took every 10th call: with 5 cameras it only ever saw one."""
    stride = Counter(i % 5 for i in range(1000) if i % 10 == 9)
    assert len(stride) == 1
    for seed in range(20):
        s = Sampler(0.1, seed=seed)
        seen = Counter(i % 5 for i in range(1000) if s.take())
        assert len(seen) == 5 and min(seen.values()) >= 5, (seed, seen)


def test_seeded_runs_repeat_and_seeds_differ() -> None:
    def run(seed: int) -> list[int]:
        s = Sampler(0.1, seed=seed)
        return [i for i in range(500) if s.take()]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert len({tuple(run(seed)) for seed in range(10)}) == 10


def test_rate_one_takes_every_call() -> None:
    s = Sampler(1.0)
    assert all(s.take() for _ in range(100))

"""Shadow gates on periodic traffic: the device's sampler (agent.runtime.shadow.Sampler) feeding
the fleet's engine (fleet.rollout.engine.evaluate_stage), pure and seeded.

Each device's application cycles through ``period`` sources (cameras); the candidate
disagrees with the serving release on a slice of them. Every ``REPORT_S`` seconds a device
reports its cumulative shadow figures and the fleet judges the stage, as the controller
does: the first verdict other than WAIT ends the run. Spec defaults throughout (sample rate
0.1, no min_shadow_samples, trim 1) but the bake time and the agreement threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agent.runtime.shadow import Sampler
from fleet.rollout.engine import DeviceState, ShadowFigures, Verdict, evaluate_stage, parse_spec

T0 = 1_000_000.0
TARGET = 12
DEVICES = 3
RATE_HZ = 10  # requests per second per device
REPORT_S = 10
BAKE_S = 300
RUNS = 20

# request index -> the candidate disagrees; a slice of periodic traffic
SLICES: dict[tuple[int, str], Callable[[int], bool]] = {
    # 20 %: two sources, 2 of every 5 frames of the first; one source of five; two of ten
    (2, "20%"): lambda i: i % 2 == 0 and (i // 2) % 5 < 2,
    (5, "20%"): lambda i: i % 5 == 0,
    (10, "20%"): lambda i: i % 10 < 2,
    # 5 %: one frame in ten of the first of two sources, in four of one of five, ...
    (2, "5%"): lambda i: i % 2 == 0 and (i // 2) % 10 == 0,
    (5, "5%"): lambda i: i % 5 == 0 and (i // 5) % 4 == 0,
    (10, "5%"): lambda i: i % 10 == 0 and (i // 10) % 2 == 0,
    # a candidate that agrees everywhere
    (5, "0%"): lambda i: False,
}


def _spec() -> Any:
    return parse_spec({
        "name": "r12 in shadow", "bundle_id": 3,
        "stages": [{"name": "shadow", "mode": "shadow", "bake_seconds": BAKE_S}, {"name": "all"}],
        "gates": {"min_agreement": 0.95},
    })


def shadow_stage(differs: Callable[[int], bool], seed: int) -> tuple[Verdict, str]:
    """Run one shadow stage; (verdict, message) of its first decision."""
    spec = _spec()
    devices = [DeviceState(f"d{k}", 0, 11, "committed", online=True, assigned_at=T0)
               for k in range(DEVICES)]
    samplers = [Sampler(0.1, seed=seed * 100 + k) for k in range(DEVICES)]
    offsets = [(seed * 7 + k * 3) % 20 for k in range(DEVICES)]  # each device starts mid-cycle
    counts = [[0, 0] for _ in range(DEVICES)]  # samples, agreed
    request = 0
    t = 0
    while True:
        t += REPORT_S
        for _ in range(REPORT_S * RATE_HZ):
            for k in range(DEVICES):
                if samplers[k].take():
                    counts[k][0] += 1
                    counts[k][1] += not differs(request + offsets[k])
            request += 1
        figures = [ShadowFigures(f"d{k}", TARGET, n, agreed) for k, (n, agreed) in enumerate(counts)]
        seen = [DeviceState(d.device_id, 0, 11, "committed", online=True, last_seen=T0 + t,
                            assigned_at=T0) for d in devices]
        d = evaluate_stage(spec, 0, TARGET, seen, (), (), now=T0 + t, stage_started_at=T0, shadow=figures)
        if d.verdict is not Verdict.WAIT:
            return d.verdict, d.message


@pytest.mark.parametrize("period", [2, 5, 10])
def test_a_20_percent_slice_is_stopped_in_shadow_in_every_seeded_run(period: int) -> None:
    verdicts = [shadow_stage(SLICES[period, "20%"], seed) for seed in range(RUNS)]
    assert [v for v, _ in verdicts] == [Verdict.FAIL] * RUNS, verdicts
    assert all("shadow agreement" in m and "< 0.95" in m and "upper bound" in m for _, m in verdicts)


@pytest.mark.parametrize("period", [2, 5, 10])
def test_a_5_percent_slice_is_never_passed(period: int) -> None:
    verdicts = [shadow_stage(SLICES[period, "5%"], seed) for seed in range(RUNS)]
    assert all(v in (Verdict.FAIL, Verdict.INCONCLUSIVE) for v, _ in verdicts), verdicts


def test_a_candidate_that_agrees_passes() -> None:
    verdicts = [shadow_stage(SLICES[5, "0%"], seed) for seed in range(RUNS)]
    assert [v for v, _ in verdicts] == [Verdict.ADVANCE] * RUNS, verdicts

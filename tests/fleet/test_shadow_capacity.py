"""What a shadow stage can catch (fleet.rollout.capacity): pure."""

from __future__ import annotations

import pytest

from fleet.rollout.bounds import wilson_interval
from fleet.rollout.capacity import (
    capacity_warnings,
    samples_to_pass_clean,
    smallest_caught,
    stage_capacity,
)


@pytest.mark.parametrize(("threshold", "samples"), [(0.9, 49), (0.95, 103), (0.98, 266), (0.99, 536)])
def test_samples_a_clean_candidate_needs_to_pass(threshold: float, samples: int) -> None:
    assert samples_to_pass_clean(threshold) == samples
    assert wilson_interval(1.0, samples)[0] >= threshold > wilson_interval(1.0, samples - 1)[0]


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.98, 0.99])
@pytest.mark.parametrize("samples", [20, 50, 100, 200, 500, 1000, 5000])
def test_smallest_caught_is_the_edge_of_failing(threshold: float, samples: int) -> None:
    s = smallest_caught(samples, threshold)
    assert s is not None and 1 - threshold < s < 1
    assert wilson_interval(1 - s, samples)[1] < threshold
    assert wilson_interval(1 - s + 1e-6, samples)[1] >= threshold
    # more samples catch a thinner slice
    assert smallest_caught(samples * 2, threshold) < s  # type: ignore[operator]


def test_too_few_samples_catch_nothing() -> None:
    assert smallest_caught(0, 0.95) is None
    # one sample that disagrees: the 99 % upper bound of 0/1 is 0.84, not below a 0.5 threshold
    assert smallest_caught(1, 0.5) is None
    assert smallest_caught(10, 0.5) is not None  # 0/10: upper bound 0.35


def test_a_stage_with_enough_traffic_has_no_warning() -> None:
    # 5 devices, trim 1: 3 weighed x 10 requests/s x 0.1 x 600 s = 1800 samples
    cap = stage_capacity("shadow", 5, 1, 10.0, 0.1, 600, 0.95)
    assert (cap.kept, cap.samples, cap.clean_pass) == (3, 1800.0, 103)
    assert cap.caught is not None and cap.caught < 0.07
    assert cap.warning() is None


def test_the_issue_s_stage_is_warned_about() -> None:
    """3 devices at 1 request/s, the default sample rate and a 10-minute bake: the gate
    weighs one device's 60 samples (trim 1)."""
    cap = stage_capacity("shadow", 3, 1, 1.0, 0.1, 600, 0.95)
    assert cap.warning() == (
        "stage 'shadow': min_agreement 0.95 implies catching a 5% slice, but 1 of 3 devices weighed "
        "x 1 requests/s x sample rate 0.1 x bake 600 s = about 60 samples catch a 12% slice or more "
        "and pass a candidate that agrees everywhere only from 103 samples: the stage needs about 103 "
        "(raise bake_seconds, shadow_sample_rate or devices)")


def test_warnings_cover_shadow_stages_with_known_traffic_only() -> None:
    gates = {"min_agreement": 0.95, "trim_devices": 1}
    stages = [("shadow", "shadow", 0.1, 60.0, gates), ("canary", "switch", 0.1, 60.0, gates),
              ("all", "switch", 0.1, 0.0, gates)]
    assert len(capacity_warnings(stages, [3, 10, 50], {0: 1.0, 1: 1.0})) == 1
    assert capacity_warnings(stages, [3, 10, 50], {}) == []  # traffic unknown: not judged
    no_gate = [("shadow", "shadow", 0.1, 60.0, {"min_agreement": None, "trim_devices": 1})]
    assert capacity_warnings(no_gate, [3], {0: 1.0}) == []

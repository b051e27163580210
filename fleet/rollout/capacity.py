"""What a shadow stage can catch: pure arithmetic over its spec, its devices and their traffic.

A shadow stage's agreement gate decides on the Wilson bounds of its effective sample
(fleet.rollout.bounds). The sample a stage gathers by the end of its bake time is about

    samples = kept devices x requests per second per device x shadow_sample_rate x bake_seconds

where *kept* devices are those the gate weighs after setting aside the ``trim_devices``
highest and lowest (fleet.rollout.evidence.trim_count). With that sample:

- a candidate that agrees on every sample passes only when ``samples / (samples + z^2)``
  (the Wilson lower bound of 1.0) reaches ``min_agreement``: about
  ``z^2 x t / (1 - t)`` samples (103 for 0.95, 266 for 0.98 at 99 %);
- a candidate that disagrees on a share ``s`` of the traffic fails only when the Wilson upper
  bound of ``1 - s`` falls below ``min_agreement``; ``smallest_caught`` is the least such ``s``.

The gate *implies* a slice of ``1 - min_agreement``; a stage is said to catch it when it fails
a candidate differing on twice that slice (10 % for 0.95) and passes one that agrees. A spec
that cannot is accepted, with a warning (``capacity_warnings``) naming the figures: the
stage would end inconclusive, or pass what its threshold says it refuses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet.rollout.bounds import CONFIDENCE, wilson_interval, z_of
from fleet.rollout.evidence import trim_count

# A stage catches the slice its gate implies when it fails this many times that slice.
CATCH_FACTOR = 2.0


def samples_to_pass_clean(min_agreement: float, confidence: float = CONFIDENCE) -> int | float:
    """Samples a candidate agreeing on every one needs before its lower bound reaches the
    threshold (Wilson at 1.0: n / (n + z^2) >= t); ``math.inf`` at a threshold of 1, which
    no sample reaches."""
    if min_agreement >= 1.0:
        return math.inf
    z2 = z_of(confidence) ** 2
    return math.ceil(z2 * min_agreement / (1.0 - min_agreement) - 1e-9)


def smallest_caught(samples: float, min_agreement: float, confidence: float = CONFIDENCE) -> float | None:
    """The least disagreement share that fails the gate on ``samples`` (effective) samples;
    None when none does (even total disagreement is not enough)."""
    if samples <= 0 or wilson_interval(0.0, samples, confidence)[1] >= min_agreement:
        return None
    lo, hi = 0.0, 1.0  # share s: upper(1 - s) < t holds at hi, not at lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if wilson_interval(1.0 - mid, samples, confidence)[1] < min_agreement:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class StageCapacity:
    """One shadow stage's expected sample at the end of its bake time and what it catches."""

    stage: str
    devices: int
    kept: int  # devices weighed after the trim
    requests_per_s: float  # the median device's traffic of the model
    sample_rate: float
    bake_seconds: float
    min_agreement: float
    samples: float
    caught: float | None  # smallest disagreement share failed, None: none
    clean_pass: int | float  # samples a candidate that agrees everywhere needs to pass (inf: never)

    @property
    def implied(self) -> float:
        return 1.0 - self.min_agreement

    def warning(self) -> str | None:
        """Why this stage cannot catch the slice its gate implies, or None."""
        want = min(1.0, CATCH_FACTOR * self.implied)
        how = (f"{self.kept} of {self.devices} devices weighed x {self.requests_per_s:.3g} requests/s x "
               f"sample rate {self.sample_rate:g} x bake {self.bake_seconds:g} s = about "
               f"{self.samples:.0f} samples")
        short_pass = self.samples < self.clean_pass
        short_catch = self.caught is None or self.caught > want
        if not (short_pass or short_catch):
            return None
        caught = "no disagreement at all" if self.caught is None else f"a {self.caught:.0%} slice or more"
        need = max(self.clean_pass, _samples_to_catch(want, self.min_agreement))
        return (
            f"stage '{self.stage}': min_agreement {self.min_agreement:g} implies catching a "
            f"{self.implied:.0%} slice, but {how} catch {caught} and pass a candidate that agrees "
            f"everywhere only from {self.clean_pass} samples: the stage needs about {need} "
            f"(raise bake_seconds, shadow_sample_rate or devices)"
        )


def _samples_to_catch(share: float, min_agreement: float) -> int:
    """Samples needed to fail a candidate differing on ``share`` (a power-of-two search)."""
    n = 1
    while n < 10_000_000:
        caught = smallest_caught(n, min_agreement)
        if caught is not None and caught <= share:
            lo, hi = n // 2, n
            while lo + 1 < hi:
                mid = (lo + hi) // 2
                c = smallest_caught(mid, min_agreement)
                lo, hi = (lo, mid) if c is not None and c <= share else (mid, hi)
            return hi
        n *= 2
    return n


def stage_capacity(stage: str, devices: int, trim: int, requests_per_s: float, sample_rate: float,
                   bake_seconds: float, min_agreement: float) -> StageCapacity:
    kept = devices - 2 * trim_count(devices, trim)
    samples = kept * requests_per_s * sample_rate * bake_seconds
    return StageCapacity(stage, devices, kept, requests_per_s, sample_rate, bake_seconds, min_agreement,
                         samples, smallest_caught(samples, min_agreement),
                         samples_to_pass_clean(min_agreement))


def capacity_warnings(stages: Sequence[tuple[str, str, float, float, Mapping[str, float | int | None]]],
                      devices: Sequence[int], traffic: Mapping[int, float]) -> list[str]:
    """Warnings for the shadow stages of a spec.

    ``stages``: (name, mode, shadow_sample_rate, bake_seconds, gates) per stage with the
    gates that apply to it (``min_agreement``, ``trim_devices``); ``devices``: the devices
    of each stage (cumulative); ``traffic``: stage index -> the median device's requests per
    second of the model (a stage missing here has no traffic known and is not judged)."""
    out: list[str] = []
    for i, (name, mode, rate, bake, gates) in enumerate(stages):
        t = gates.get("min_agreement")
        if mode != "shadow" or t is None or i not in traffic:
            continue
        cap = stage_capacity(name, devices[i], int(gates.get("trim_devices") or 0), traffic[i], rate,
                             bake, float(t))
        if (w := cap.warning()) is not None:
            out.append(w)
    return out

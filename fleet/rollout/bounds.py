"""Confidence bounds for the gates: pure arithmetic over counts and weights.

A gate compares a *bound*, not a point estimate, with its threshold (as Kayenta judges
canaries): it passes only when the bound on the good side clears the threshold, fails only
when the bound on the bad side misses it, and is otherwise inconclusive (the stage gathers
more; ``on_inconclusive`` decides once the bake time is over).

- a share (agreement) gets the Wilson score interval, one-sided at ``CONFIDENCE`` each way;
  it behaves at 0 and 1 and on small samples, where the normal approximation does not;
- the sample is *effective*: devices weigh their samples capped (fleet.rollout.evidence),
  so a sample of device i weighs ``w_i / n_i``; Kish's effective size
  ``(sum w_i)^2 / sum(w_i^2 / n_i)`` is then at least the weighed total ``sum w_i``, which
  is taken (samples past a device's cap add nothing); and when devices disagree with one another more than
  their own samples explain (traffic one device sees and another does not, or a sampler
  aligned with periodic traffic), the between-device variance of the weighted mean
  (devices as clusters, ``k/(k-1)`` corrected) takes over: ``n_eff = p(1-p) / var``.
  Two devices at 0.0 and 1.0 are worth about two samples, not two hundred.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

# One-sided confidence of each bound: a candidate exactly at the threshold passes (or a good
# one fails) about 1 % of the stages it is judged in.
CONFIDENCE = 0.99
# Samples reported as "needed" are capped here (a share exactly at its threshold never decides).
MAX_NEEDED = 1_000_000


def z_of(confidence: float = CONFIDENCE) -> float:
    """The standard normal quantile of a one-sided ``confidence``."""
    return NormalDist().inv_cdf(confidence)


def wilson_interval(p: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(lower, upper) one-sided Wilson bounds of a share ``p`` observed on ``n`` (effective)
    samples; (0, 1) without a sample."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, p))
    z = z_of(confidence)
    z2n = z * z / n
    centre = p + z2n / 2
    spread = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    denom = 1 + z2n
    lower = 0.0 if p == 0.0 else max(0.0, (centre - spread) / denom)
    upper = 1.0 if p == 1.0 else min(1.0, (centre + spread) / denom)
    return lower, upper


@dataclass(frozen=True)
class ShareEvidence:
    """A stage's share from per-device shares: the point estimate, its effective sample and
    the devices' spread."""

    value: float
    samples: int  # the weighed samples (capped weights)
    effective: float  # effective sample size (see the module docstring)
    spread: float  # the kept devices' highest share minus their lowest
    devices: int

    def interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        return wilson_interval(self.value, self.effective, confidence)


def share_evidence(shares: Mapping[str, float], counts: Mapping[str, int],
                   weights: Mapping[str, float]) -> ShareEvidence:
    """The weighted mean of ``shares`` over the devices in it (``counts``: each device's own
    samples; ``weights``: its capped weight) with its effective sample size."""
    kept = [d for d in shares if counts.get(d, 0) > 0 and weights.get(d, 0) > 0]
    total = sum(weights[d] for d in kept)
    if not kept or total <= 0:
        return ShareEvidence(0.0, 0, 0.0, 0.0, 0)
    p = sum(shares[d] * weights[d] for d in kept) / total
    # never more than the weighed samples: a device's samples beyond its cap add nothing
    kish = min(total, total * total / sum(weights[d] ** 2 / counts[d] for d in kept))
    effective = kish
    k = len(kept)
    if k >= 2:
        between = k / (k - 1) * sum((weights[d] * (shares[d] - p)) ** 2 for d in kept) / total**2
        if between > 0:
            # a share of 0 or 1 with devices apart: use the variance of a share of one half
            # (the largest), so the spread still counts against the evidence
            pq = p * (1 - p) if 0 < p < 1 else 0.25
            effective = min(kish, pq / between)
    values = [shares[d] for d in kept]
    return ShareEvidence(p, round(total), effective, max(values) - min(values), k)


def samples_to_decide(p: float, threshold: float, *, design: float = 1.0,
                      confidence: float = CONFIDENCE) -> int:
    """About how many (weighed) samples a share ``p`` needs before its Wilson bound on the
    side of the threshold it lies clears it; ``design`` = samples / effective sample."""
    if p == threshold:
        return MAX_NEEDED
    lo, hi = 1, MAX_NEEDED
    if not _decides(p, threshold, hi / max(design, 1.0), confidence):
        return MAX_NEEDED
    while lo < hi:
        mid = (lo + hi) // 2
        if _decides(p, threshold, mid / max(design, 1.0), confidence):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _decides(p: float, threshold: float, n: float, confidence: float) -> bool:
    lower, upper = wilson_interval(p, n, confidence)
    return lower >= threshold if p > threshold else upper < threshold

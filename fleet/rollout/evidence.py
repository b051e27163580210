"""What a device's health reports are worth to a gate: pure functions over plain data.

A health window is a claim from one device identity, never a fact about the fleet
(docs/security.md "Device claims"). Before a gate looks at it:

- only windows of the target release from the stage's own devices count, received once
  the fleet had assigned the release to that device (``unassigned`` otherwise);
- a window with a negative count, errors above its inferences, or a negative or
  non-finite latency or drift is refused (``negative``, ``errors_above_inferences``,
  ``not_finite``); one whose (seq, ts) the device already sent is refused (``replayed``);
- a device's accepted inferences never exceed what it could have served since it was
  assigned: ``max_device_rate`` x (now - assigned + ``WINDOW_SLACK_S``); windows are taken
  in the order received and one that would pass that ceiling is refused (``implausible``);
- refusals are counted per device and reason, and shown in the gate's figures.

Then the gates weigh *devices*, not reports (``capped_weights``, ``trimmed_mean``):

- each device's figure is its own (its error rate, its median p95, its mean drift);
- a device weighs its accepted inferences, but never more than the largest other device:
  a million claimed inferences weigh as much as the busiest real device, no more;
- the stage's figure is the weighted mean of the device figures after setting aside the
  ``trim`` highest and the ``trim`` lowest devices, as many as leave at least one device
  (none of 2 devices, 1 of 3 or 4, 2 of 5 or more with trim 2): one device's claims,
  healthy or failing, cannot decide a stage of three or more devices;
- with one or two devices nothing is set aside: a device's errors count for its own share
  (a half with two devices), so a real problem on a real device still fails a small stage;
- a gate decides only once enough devices reported (``fleet.rollout.gate_results.devices_needed``):
  the device that reports first — a fake one needs no download — cannot decide alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.rollout.reports import DeviceState, HealthWindow, ShadowFigures

# A window received just after a device was assigned may cover up to one health interval
# before it (agents report every 60 s by default): the ceiling allows this much more time.
WINDOW_SLACK_S = 120.0
# Devices listed by name in a gate's figures (the figures are stored with every evaluation).
MAX_LISTED = 20


class Refusal(StrEnum):
    UNASSIGNED = "unassigned"  # received before the fleet assigned the release to the device
    NEGATIVE = "negative"  # a negative count, latency or drift
    NOT_FINITE = "not_finite"  # NaN or infinite latency or drift
    ERRORS_ABOVE_INFERENCES = "errors_above_inferences"
    REPLAYED = "replayed"  # the same (seq, ts) from the same device again
    IMPLAUSIBLE = "implausible"  # more inferences than the device could have served


@dataclass(frozen=True, slots=True)
class DeviceEvidence:
    """One device's accepted windows of the target release and what was refused."""

    device_id: str
    windows: tuple[HealthWindow, ...]
    inferences: int
    errors: int
    ceiling: int  # the most inferences the device could have served since it was assigned
    refused: Mapping[str, int] = field(default_factory=dict)


def _refusal(h: HealthWindow) -> Refusal | None:
    """Why one window is refused on its own figures, or None."""
    if h.inferences < 0 or h.errors < 0:
        return Refusal.NEGATIVE
    if h.errors > h.inferences:
        return Refusal.ERRORS_ABOVE_INFERENCES
    for value in (h.p95_ms, h.drift):
        if value is None:
            continue
        if not math.isfinite(value):
            return Refusal.NOT_FINITE
        if value < 0:
            return Refusal.NEGATIVE
    return None


def shadow_refusal(f: ShadowFigures, ceiling: int | None) -> Refusal | None:
    """Why a device's (cumulative) shadow report is refused, or None: negative or
    inconsistent counts, non-finite or out-of-range figures, more samples than the device
    could have served since it was assigned (``ceiling``)."""
    counts = (f.samples, f.agreed, f.errors, f.dropped)
    if any(n < 0 for n in counts):
        return Refusal.NEGATIVE
    if f.agreed + f.errors > f.samples:
        return Refusal.ERRORS_ABOVE_INFERENCES
    floats = (f.max_abs_error, f.cosine_min, f.candidate_p95_ms, f.current_p95_ms)
    if any(v is not None and not math.isfinite(v) for v in floats):
        return Refusal.NOT_FINITE
    if any(v is not None and v < 0 for v in (f.max_abs_error, f.candidate_p95_ms, f.current_p95_ms)):
        return Refusal.NEGATIVE
    if f.cosine_min is not None and not -1.0 <= f.cosine_min <= 1.0:
        return Refusal.NOT_FINITE
    if ceiling is not None and f.samples > ceiling:
        return Refusal.IMPLAUSIBLE
    return None


def device_evidence(
    members: Sequence[DeviceState],
    health: Iterable[HealthWindow],
    target: int,
    *,
    now: float,
    since: float,
    max_device_rate: float,
) -> dict[str, DeviceEvidence]:
    """Each member's evidence about ``target`` from ``health`` (in the order received).

    ``since`` stands in for a member's assignment time when it has none (the stage start).
    Every member appears, those without an accepted window with zero counts."""
    tallies = {
        d.device_id: _Tally(
            ceiling=int(max_device_rate * max(0.0, now - (d.assigned_at or since) + WINDOW_SLACK_S)),
            assigned_at=d.assigned_at,
        )
        for d in members
    }
    for h in health:
        t = tallies.get(h.device_id)
        if t is None or h.release != target:
            continue
        if t.assigned_at is not None and h.received_at is not None and h.received_at < t.assigned_at:
            t.refuse(Refusal.UNASSIGNED)
            continue
        # the fast path of _refusal: counts in order, figures finite and >= 0 (NaN compares false)
        p95, drift = h.p95_ms, h.drift
        if not (0 <= h.errors <= h.inferences and (p95 is None or 0 <= p95 < math.inf)
                and (drift is None or 0 <= drift < math.inf)):
            t.refuse(_refusal(h) or Refusal.NOT_FINITE)
            continue
        if h.seq is not None:
            key = (h.seq, h.ts if h.ts is not None else 0.0)
            if t.seen is None:
                t.seen = set()
            elif key in t.seen:
                t.refuse(Refusal.REPLAYED)
                continue
            t.seen.add(key)
        if t.inferences + h.inferences > t.ceiling:
            t.refuse(Refusal.IMPLAUSIBLE)
            continue
        t.windows.append(h)
        t.inferences += h.inferences
        t.errors += h.errors
    return {
        d: DeviceEvidence(d, tuple(t.windows), t.inferences, t.errors, t.ceiling, t.refused)
        for d, t in tallies.items()
    }


@dataclass(slots=True)
class _Tally:
    """One device's running count while its windows are read."""

    ceiling: int
    assigned_at: float | None
    windows: list[HealthWindow] = field(default_factory=list)
    inferences: int = 0
    errors: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    # the (seq, ts) of its raw reports taken (bucket sums have none: no set for those)
    seen: set[tuple[int, float]] | None = None

    def refuse(self, why: Refusal) -> None:
        self.refused[why.value] = self.refused.get(why.value, 0) + 1


def refused_figures(evidence: Mapping[str, DeviceEvidence]) -> dict[str, dict[str, int]]:
    """``{device: {reason: count}}`` of the devices with refused windows (the first MAX_LISTED)."""
    bad = sorted((d, dict(sorted(e.refused.items()))) for d, e in evidence.items() if e.refused)
    return dict(bad[:MAX_LISTED])


def capped_weights(counts: Mapping[str, int]) -> dict[str, int]:
    """Each device's weight: its own count, never more than the largest count of another
    device (a lone device keeps its own)."""
    if len(counts) < 2:
        return dict(counts)
    ordered = sorted(counts.values(), reverse=True)
    first, second = ordered[0], ordered[1]
    return {d: min(n, second if n == first else first) for d, n in counts.items()}


def trim_count(devices: int, trim: int) -> int:
    """How many devices are set aside at each end: ``trim``, but at least one device stays."""
    return max(0, min(trim, (devices - 1) // 2))


@dataclass(frozen=True)
class Trimmed:
    """A stage's figure from per-device figures: the weighted mean of the devices kept."""

    value: float
    kept: tuple[str, ...]
    high: tuple[str, ...]  # set aside: the highest figures
    low: tuple[str, ...]  # set aside: the lowest figures

    def figures(self) -> dict[str, list[str]]:
        return {"set_aside_high": list(self.high), "set_aside_low": list(self.low)}


def trimmed_mean(values: Mapping[str, float], weights: Mapping[str, float], trim: int) -> Trimmed:
    """Sort devices by figure (ties by id), set ``trim_count`` aside at each end and take
    the weighted mean of the rest (the plain mean when their weights are all zero)."""
    if not values:
        return Trimmed(0.0, (), (), ())
    ordered = sorted(values, key=lambda d: (values[d], d))
    k = trim_count(len(ordered), trim)
    low, kept, high = ordered[:k], ordered[k : len(ordered) - k], ordered[len(ordered) - k :]
    total = sum(weights.get(d, 0.0) for d in kept)
    if total > 0:
        value = sum(values[d] * weights.get(d, 0.0) for d in kept) / total
    else:
        value = sum(values[d] for d in kept) / len(kept)
    return Trimmed(value, tuple(kept), tuple(reversed(high)), tuple(low))

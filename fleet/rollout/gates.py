"""Health gates and device progress: pure functions over plain data (no database, no clock).

Rules:
- a device counts as updated only once it *committed* the target release (health state
  ``committed`` on that release, or a ``committed`` event); ``activated`` means on trial;
- a device that rolled back locally (event ``rolled_back`` whose ``from_release`` is the
  target) is ``rolled_back`` with the device's reason code at once; a ``failed`` event for
  the target is ``failed`` with its code (``superseded`` is the fleet's own doing: ignored);
- a device not heard from for ``silent_after_s`` (counted from when it was told to update,
  or its last report if later) is ``silent``, whatever it reported before;
- every gate returns PASS, FAIL or WAIT (not enough sample). Bad news needs its minimum
  sample too for rates and ratios; counts (failures, rollbacks, silent devices) fail as
  soon as they exceed their bound;
- each result carries what explains it: observed value, threshold, sample and minimum.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import msgspec

from fleet.rollout.bounds import CONFIDENCE, share_evidence
from fleet.rollout.evidence import (
    MAX_LISTED,
    DeviceEvidence,
    capped_weights,
    refused_figures,
    trim_count,
    trimmed_mean,
)
from shared.errors import EdgefleetError
from shared.telemetry.vocabulary import EventKind, ReasonCode, UpdateState


class SpecError(EdgefleetError):
    """A rollout spec that cannot be run; ``field`` names the offending field."""

    code = "rollout_spec"

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}", field=field_name)
        self.field = field_name


class Gates(msgspec.Struct, forbid_unknown_fields=True):
    """Gate thresholds (None: the gate is off) and the minimum sample they need."""

    max_error_rate: float | None = None
    max_latency_ratio: float | None = None
    max_drift: float | None = None
    max_install_failures: int | None = None
    max_local_rollbacks: int | None = 0
    max_silent_devices: int | None = 0
    max_offline_fraction: float | None = None
    min_inferences: int = 0
    min_devices: int = 1
    # Device claims (fleet.rollout.evidence): the most inferences per second one device could
    # serve (more is refused as implausible), and how many devices the rate, latency and drift
    # gates set aside at each end (highest and lowest figures) before they weigh the rest.
    max_device_rate: float = 2000.0
    trim_devices: int = 1
    # Shadow gates: judged in shadow stages only, on the candidate's figures (ShadowFigures).
    min_agreement: float | None = None
    max_abs_error: float | None = None
    min_cosine: float | None = None
    max_candidate_p95_ratio: float | None = None
    min_shadow_samples: int = 0

    def has_shadow_gate(self) -> bool:
        return any(v is not None for v in (self.min_agreement, self.max_abs_error, self.min_cosine))


def validate_gates(g: Gates, where: str) -> Gates:
    def bad(name: str, message: str) -> SpecError:
        return SpecError(f"{where}.{name}", message)

    for name in ("max_error_rate", "max_offline_fraction"):
        value = getattr(g, name)
        if value is not None and not 0 <= value <= 1:
            raise bad(name, f"{value} must be in [0, 1]")
    if g.max_latency_ratio is not None and g.max_latency_ratio <= 0:
        raise bad("max_latency_ratio", f"{g.max_latency_ratio} must be > 0 (e.g. 1.5)")
    if g.max_drift is not None and g.max_drift < 0:
        raise bad("max_drift", f"{g.max_drift} must be >= 0")
    for name in ("max_install_failures", "max_local_rollbacks", "max_silent_devices", "min_inferences"):
        value = getattr(g, name)
        if value is not None and value < 0:
            raise bad(name, f"{value} must be >= 0")
    if g.min_devices < 1:
        raise bad("min_devices", f"{g.min_devices} must be >= 1")
    if not (math.isfinite(g.max_device_rate) and g.max_device_rate > 0):
        raise bad("max_device_rate", f"{g.max_device_rate} must be > 0 (inferences per second of one device)")
    if g.trim_devices < 0:
        raise bad("trim_devices", f"{g.trim_devices} must be >= 0")
    if g.min_agreement is not None and not 0 <= g.min_agreement <= 1:
        raise bad("min_agreement", f"{g.min_agreement} must be in [0, 1]")
    if g.min_cosine is not None and not -1 <= g.min_cosine <= 1:
        raise bad("min_cosine", f"{g.min_cosine} must be in [-1, 1]")
    if g.max_abs_error is not None and g.max_abs_error < 0:
        raise bad("max_abs_error", f"{g.max_abs_error} must be >= 0")
    if g.max_candidate_p95_ratio is not None and g.max_candidate_p95_ratio <= 0:
        raise bad("max_candidate_p95_ratio", f"{g.max_candidate_p95_ratio} must be > 0 (e.g. 1.5)")
    if g.min_shadow_samples < 0:
        raise bad("min_shadow_samples", f"{g.min_shadow_samples} must be >= 0")
    return g


# -- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """A device of the rollout as the fleet last heard from it (times: UNIX seconds)."""

    device_id: str
    stage: int
    release: int | None = None
    state: str | None = None
    online: bool | None = None
    last_seen: float | None = None
    assigned_at: float | None = None
    # what a staged release waits for on the device (activation window, update lock)
    waiting: str | None = None


@dataclass(frozen=True)
class HealthWindow:
    """One health report's window for the rollout's model (``seq``, ``ts``: the device's
    own; ``received_at``: the fleet's clock, UNIX seconds)."""

    device_id: str
    release: int
    inferences: int
    errors: int
    p95_ms: float | None = None
    drift: float | None = None
    seq: int | None = None
    ts: float | None = None
    received_at: float | None = None


@dataclass(frozen=True)
class ShadowFigures:
    """A device's latest shadow report for the candidate (cumulative since it was loaded)."""

    device_id: str
    release: int
    samples: int
    agreed: int
    errors: int = 0
    dropped: int = 0
    max_abs_error: float | None = None
    cosine_min: float | None = None
    candidate_p95_ms: float | None = None
    current_p95_ms: float | None = None
    metric: str = "argmax"


@dataclass(frozen=True)
class InstallEvent:
    """An update event of a device, in the order received."""

    device_id: str
    release: int
    kind: str
    reason: str | None = None
    from_release: int | None = None


# -- device progress -------------------------------------------------------------------


class Progress(StrEnum):
    PENDING = "pending"  # its stage is not reached yet
    ASSIGNED = "assigned"  # told to update, nothing heard about the target yet
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    SMOKE_TESTING = "smoke_testing"
    TRIAL = "trial"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SILENT = "silent"
    SHADOW = "shadow"  # shadow stage: the candidate runs beside the serving release, reporting


SETTLED_BAD = frozenset({Progress.FAILED, Progress.ROLLED_BACK, Progress.SILENT})
_EVENT_PROGRESS: dict[str, Progress] = {
    EventKind.DOWNLOAD_STARTED: Progress.DOWNLOADING,
    EventKind.VERIFIED: Progress.VERIFYING,
    EventKind.STAGED: Progress.STAGED,
    EventKind.SMOKE_PASSED: Progress.SMOKE_TESTING,
    EventKind.ACTIVATED: Progress.TRIAL,
    EventKind.COMMITTED: Progress.COMMITTED,
    EventKind.FAILED: Progress.FAILED,
}
_IN_PROGRESS_STATES: dict[str, Progress] = {
    UpdateState.DOWNLOADING: Progress.DOWNLOADING,
    UpdateState.VERIFYING: Progress.VERIFYING,
    UpdateState.STAGED: Progress.STAGED,
    UpdateState.SMOKE_TESTING: Progress.SMOKE_TESTING,
}


@dataclass(frozen=True)
class DeviceProgress:
    device_id: str
    stage: int
    progress: Progress
    reason: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "stage": self.stage,
            "progress": self.progress.value,
            "reason": self.reason,
            "detail": self.detail,
        }


def is_local_rollback(e: InstallEvent, target: int) -> bool:
    """The agent reports a rollback with ``release`` = what it serves again and
    ``from_release`` = the release it left."""
    if e.kind != EventKind.ROLLED_BACK:
        return False
    return e.from_release == target if e.from_release is not None else e.release == target


def is_install_failure(e: InstallEvent, target: int) -> bool:
    return e.kind == EventKind.FAILED and e.release == target and e.reason != ReasonCode.SUPERSEDED


def device_progress(
    device: DeviceState,
    target: int,
    events: Sequence[InstallEvent],
    *,
    now: float,
    silent_after_s: float,
) -> DeviceProgress:
    """Where one assigned device stands with the target release; ``events`` are its own."""
    progress, reason, detail = Progress.ASSIGNED, None, ""
    for e in events:
        if is_local_rollback(e, target):
            progress, reason = Progress.ROLLED_BACK, e.reason
            detail = f"rolled back to r{e.release}" + (f" ({e.reason})" if e.reason else "")
        elif e.release == target and e.kind in _EVENT_PROGRESS and e.reason != ReasonCode.SUPERSEDED:
            progress = _EVENT_PROGRESS[e.kind]
            reason = e.reason if progress is Progress.FAILED else None
            detail = f"failed ({e.reason})" if progress is Progress.FAILED else ""
    if device.release == target and device.state == "committed" and progress is not Progress.ROLLED_BACK:
        progress, reason, detail = Progress.COMMITTED, None, ""
    elif device.release == target and device.state == "trial" and progress is Progress.ASSIGNED:
        progress = Progress.TRIAL
    elif progress is Progress.ASSIGNED and device.state in _IN_PROGRESS_STATES:
        progress = _IN_PROGRESS_STATES[device.state]
    if progress is Progress.STAGED and device.state == "staged" and device.waiting:
        # Waiting for its window or a lock is neither failed nor silent (it keeps reporting).
        detail = f"staged, {device.waiting.split('staged, ', 1)[-1]}"
    contacts = [t for t in (device.last_seen, device.assigned_at) if t is not None]
    if contacts and now - max(contacts) > silent_after_s:
        quiet = now - max(contacts)
        heard = (
            "never heard from since assigned"
            if device.last_seen is None
            or (device.assigned_at is not None and device.last_seen < device.assigned_at)
            else f"last heard {quiet:.0f} s ago"
        )
        detail = f"{heard}, deadline {silent_after_s:g} s (was {progress.value})"
        progress, reason = Progress.SILENT, "silent"
    return DeviceProgress(device.device_id, device.stage, progress, reason, detail)


def shadow_progress(
    device: DeviceState,
    target: int,
    events: Sequence[InstallEvent],
    figures: ShadowFigures | None,
    *,
    now: float,
    silent_after_s: float,
) -> DeviceProgress:
    """Where a device of a shadow stage stands: ``shadow`` once it reports the candidate
    beside its serving release; ``failed`` when staging the candidate was refused."""
    base = device_progress(device, target, events, now=now, silent_after_s=silent_after_s)
    if base.progress in (Progress.FAILED, Progress.SILENT):
        return base
    if figures is not None and figures.release == target:
        detail = f"{figures.samples} samples compared beside r{device.release}"
        return DeviceProgress(device.device_id, device.stage, Progress.SHADOW, None, detail)
    if device.release is None:
        return DeviceProgress(device.device_id, device.stage, Progress.SHADOW, "no_serving_release",
                              "serves no release of the model: nothing to compare with")
    return base


# -- gates -----------------------------------------------------------------------------


class GateStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"


@dataclass(frozen=True)
class GateResult:
    gate: str
    status: GateStatus
    message: str
    figures: dict[str, Any] = field(default_factory=dict)
    observed: float | None = None
    threshold: float | None = None
    sample: int = 0
    min_sample: int = 0
    unit: str = "devices"

    @property
    def short_of_sample(self) -> str:
        """'gate G has N of M <unit>' for an inconclusive result."""
        return f"gate {self.gate} has {self.sample} of {self.min_sample} {self.unit}"

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "status": self.status.value,
            "observed": self.observed,
            "threshold": self.threshold,
            "sample": self.sample,
            "min_sample": self.min_sample,
            "unit": self.unit,
            "message": self.message,
            "figures": self.figures,
        }


@dataclass(frozen=True)
class GateInput:
    """Everything the gates of one stage look at."""

    gates: Gates
    target: int
    members: Sequence[DeviceState]
    progress: Mapping[str, DeviceProgress]
    health: Sequence[HealthWindow]  # target release, since the stage started
    baseline: Sequence[HealthWindow]  # previous releases, before each device was told to update
    events: Sequence[InstallEvent]  # since the rollout started
    mode: str = "switch"  # the stage's mode: "shadow" judges the shadow gates instead
    shadow: Sequence[ShadowFigures] = ()  # target release as candidate, since the stage started
    # each member's accepted health of the target (fleet.rollout.evidence.device_evidence)
    evidence: Mapping[str, DeviceEvidence] = field(default_factory=dict)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _short_of(sample: int, need: int, unit: str) -> str:
    return f"needs {need} {unit}, has {sample}"


def _windows(inp: GateInput) -> list[HealthWindow]:
    """The accepted windows of the target release from the stage's devices (evidence)."""
    return [h for e in inp.evidence.values() for h in e.windows]


def devices_needed(inp: GateInput, refused_only: Collection[str]) -> int:
    """Devices that must have reported (an accepted window, traffic or not) before a rate,
    ratio or drift gate decides, pass or fail: enough that the devices set aside can be set
    aside (2 x ``trim_devices`` + 1), or every member still expected to report when the stage
    has fewer — not failed, rolled back or silent, and not a device whose every report was
    refused. So the device that reports first (a fake one needs no download) cannot decide
    the stage alone before the others report."""
    expected = sum(
        1 for d in inp.members
        if ((p := inp.progress.get(d.device_id)) is None or p.progress not in SETTLED_BAD)
        and d.device_id not in refused_only
    )
    return min(2 * inp.gates.trim_devices + 1, expected)


def _health_reported(inp: GateInput) -> tuple[int, int]:
    """(devices with an accepted window, devices the health gates need)."""
    refused_only = {d for d, e in inp.evidence.items() if e.refused and not e.windows}
    reported = sum(1 for e in inp.evidence.values() if e.windows)
    return reported, devices_needed(inp, refused_only)


def _too_few_reported(inp: GateInput, gate: str, label: str, common: dict[str, Any]) -> GateResult | None:
    reported, needed = _health_reported(inp)
    if reported >= needed:
        return None
    return GateResult(gate, GateStatus.WAIT, f"{label} {_short_of(reported, needed, 'devices')} reporting",
                      sample=reported, min_sample=needed, **common)


def _set_aside(devices: int, trim: int) -> str:
    k = trim_count(devices, trim)
    return f" (set aside: {k} highest, {k} lowest)" if k else ""


def error_rate_gate(inp: GateInput) -> GateResult | None:
    """Per-device error rates, each device weighing its inferences capped at the largest other
    device's, the ``trim_devices`` highest and lowest rates set aside (fleet.rollout.evidence)."""
    g = inp.gates
    if g.max_error_rate is None:
        return None
    reporting_ev = {d: e for d, e in inp.evidence.items() if e.inferences > 0}
    weights = capped_weights({d: e.inferences for d, e in reporting_ev.items()})
    rates = {d: e.errors / e.inferences for d, e in reporting_ev.items()}
    trimmed = trimmed_mean(rates, weights, g.trim_devices)
    rate = trimmed.value
    # the evidence behind the rate (fleet.rollout.bounds), shown beside it; the decision is
    # still the rate against the bound (see docs/rollouts.md "Agreement is judged on evidence")
    kept = set(trimmed.kept)
    evidence = share_evidence({d: r for d, r in rates.items() if d in kept},
                              {d: e.inferences for d, e in reporting_ev.items()},
                              {d: float(w) for d, w in weights.items()})
    lower, upper = evidence.interval()
    inferences = sum(e.inferences for e in reporting_ev.values())
    errors = sum(e.errors for e in reporting_ev.values())
    sample = sum(weights.values())
    reporting = len(reporting_ev)
    listed = sorted(reporting_ev, key=lambda d: (-rates[d], d))[:MAX_LISTED]
    figures = {
        "error_rate": round(rate, 6),
        "errors": errors,
        "inferences": inferences,
        "weighed_inferences": sample,
        "devices": reporting,
        "per_device": {
            d: {"inferences": reporting_ev[d].inferences, "errors": reporting_ev[d].errors,
                "rate": round(rates[d], 6), "weight": weights[d]}
            for d in listed
        },
        **trimmed.figures(),
        "lower_bound": round(lower, 6),
        "upper_bound": round(upper, 6),
        "confidence": CONFIDENCE,
        "effective_inferences": round(evidence.effective, 1),
        "device_spread": round(max(rates.values()) - min(rates.values()), 6) if rates else 0.0,
        "refused": refused_figures(inp.evidence),
        "max_error_rate": g.max_error_rate,
        "min_inferences": g.min_inferences,
        "min_devices": g.min_devices,
        "trim_devices": g.trim_devices,
    }
    need = max(g.min_inferences, 1)
    common = {"observed": round(rate, 6), "threshold": g.max_error_rate, "figures": figures}
    if sample < need:
        return GateResult(
            "max_error_rate",
            GateStatus.WAIT,
            f"error_rate {_short_of(sample, need, 'inferences')}",
            sample=sample,
            min_sample=need,
            unit="inferences",
            **common,
        )
    if (short := _too_few_reported(inp, "max_error_rate", "error_rate", common)) is not None:
        return short
    if reporting < g.min_devices:
        return GateResult(
            "max_error_rate",
            GateStatus.WAIT,
            f"error_rate {_short_of(reporting, g.min_devices, 'devices')}",
            sample=reporting,
            min_sample=g.min_devices,
            **common,
        )
    over = (
        f"over {_plural(sample, 'inference')} on {_plural(reporting, 'device')}"
        f"{_set_aside(reporting, g.trim_devices)}"
    )
    status, op = (GateStatus.FAIL, ">") if rate > g.max_error_rate else (GateStatus.PASS, "<=")
    return GateResult(
        "max_error_rate",
        status,
        f"error_rate {rate:.2f} {op} {g.max_error_rate} {over}",
        sample=sample,
        min_sample=need,
        unit="inferences",
        **common,
    )


def latency_gate(inp: GateInput) -> GateResult | None:
    """p95 on the target vs p95 on the previous release, device by device (median ratio; the
    sample weighs each device's inferences capped at the largest other device's)."""
    g = inp.gates
    if g.max_latency_ratio is None:
        return None
    new: dict[str, list[float]] = {}
    inferences: dict[str, int] = {}
    for h in _windows(inp):
        if h.p95_ms is not None and h.inferences:
            new.setdefault(h.device_id, []).append(h.p95_ms)
            inferences[h.device_id] = inferences.get(h.device_id, 0) + h.inferences
    old: dict[str, list[float]] = {}
    for h in inp.baseline:
        if (h.p95_ms is not None and math.isfinite(h.p95_ms) and h.p95_ms > 0 and h.inferences > 0
                and h.release != inp.target):
            old.setdefault(h.device_id, []).append(h.p95_ms)
    per_device = {d: (statistics.median(new[d]), statistics.median(old[d])) for d in sorted(new) if d in old}
    ratios = {d: round(n / o, 3) for d, (n, o) in per_device.items()}
    sampled = sum(capped_weights({d: inferences[d] for d in per_device}).values())
    ratio = statistics.median(ratios.values()) if ratios else 0.0
    p95_new = statistics.median(n for n, _ in per_device.values()) if per_device else None
    p95_old = statistics.median(o for _, o in per_device.values()) if per_device else None
    figures = {
        "latency_ratio": round(ratio, 3),
        "p95_ms": p95_new,
        "previous_p95_ms": p95_old,
        "devices": len(per_device),
        "per_device": ratios,
        "without_baseline": sorted(set(new) - set(old)),
        "inferences": sampled,
        "max_latency_ratio": g.max_latency_ratio,
    }
    need = max(g.min_inferences, 1)
    common = {"observed": round(ratio, 3), "threshold": g.max_latency_ratio, "figures": figures}
    if (short := _too_few_reported(inp, "max_latency_ratio", "latency_ratio", common)) is not None:
        return short
    if len(per_device) < g.min_devices:
        return GateResult(
            "max_latency_ratio",
            GateStatus.WAIT,
            f"latency_ratio {_short_of(len(per_device), g.min_devices, 'devices')} with p95 on both releases",
            sample=len(per_device),
            min_sample=g.min_devices,
            **common,
        )
    if sampled < need:
        return GateResult(
            "max_latency_ratio",
            GateStatus.WAIT,
            f"latency_ratio {_short_of(sampled, need, 'inferences')}",
            sample=sampled,
            min_sample=need,
            unit="inferences",
            **common,
        )
    status, op = (GateStatus.FAIL, ">") if ratio > g.max_latency_ratio else (GateStatus.PASS, "<=")
    return GateResult(
        "max_latency_ratio",
        status,
        f"latency p95 ratio {ratio:.2f} {op} {g.max_latency_ratio} (p95 {p95_new:.1f} ms vs "
        f"{p95_old:.1f} ms on the previous release, median of {_plural(len(per_device), 'device')})",
        sample=len(per_device),
        min_sample=g.min_devices,
        **common,
    )


def drift_gate(inp: GateInput) -> GateResult | None:
    """Each device's mean drift; the stage's is their mean, devices weighing alike, after
    setting aside the ``trim_devices`` highest and lowest."""
    g = inp.gates
    if g.max_drift is None:
        return None
    scores: dict[str, list[float]] = {}
    for h in _windows(inp):
        if h.drift is not None:
            scores.setdefault(h.device_id, []).append(h.drift)
    per_device = {d: sum(v) / len(v) for d, v in scores.items()}
    trimmed = trimmed_mean(per_device, dict.fromkeys(per_device, 1.0), g.trim_devices)
    drift = trimmed.value
    windows = sum(len(v) for v in scores.values())
    devices = len(per_device)
    figures = {
        "drift": round(drift, 4),
        "windows": windows,
        "devices": devices,
        **trimmed.figures(),
        "max_drift": g.max_drift,
    }
    common = {"observed": round(drift, 4), "threshold": g.max_drift, "figures": figures}
    if (short := _too_few_reported(inp, "max_drift", "drift", common)) is not None:
        return short
    if devices < g.min_devices:
        return GateResult(
            "max_drift",
            GateStatus.WAIT,
            f"drift {_short_of(devices, g.min_devices, 'devices')} reporting drift",
            sample=devices,
            min_sample=g.min_devices,
            **common,
        )
    status, op = (GateStatus.FAIL, ">") if drift > g.max_drift else (GateStatus.PASS, "<=")
    return GateResult(
        "max_drift",
        status,
        f"drift {drift:.2f} {op} {g.max_drift} over {_plural(windows, 'window')} "
        f"on {_plural(devices, 'device')}{_set_aside(devices, g.trim_devices)}",
        sample=devices,
        min_sample=g.min_devices,
        **common,
    )


def _count_gate(
    inp: GateInput, gate: str, bound: int | None, what: str, offenders: Mapping[str, str | None]
) -> GateResult | None:
    """A count of devices that must stay <= bound; fails at once, passes with min_devices."""
    if bound is None:
        return None
    count = len(offenders)
    members = len(inp.members)
    listed = ", ".join(f"{d} {r}" if r else d for d, r in sorted(offenders.items())[:5])
    listed += "…" if count > 5 else ""
    figures = {
        what: count,
        gate: bound,
        "devices": dict(sorted(offenders.items())),
        "reasons": sorted({r for r in offenders.values() if r}),
        "members": members,
    }
    common = {
        "observed": float(count),
        "threshold": float(bound),
        "figures": figures,
        "sample": members,
        "min_sample": inp.gates.min_devices,
    }
    if count > bound:
        return GateResult(gate, GateStatus.FAIL, f"{what} {count} > {bound}: {listed}", **common)
    if members < inp.gates.min_devices:
        return GateResult(
            gate, GateStatus.WAIT, f"{what} {_short_of(members, inp.gates.min_devices, 'devices')}", **common
        )
    return GateResult(gate, GateStatus.PASS, f"{what} {count} <= {bound}", **common)


# Failures the agent retries by itself (after its Fetcher's own attempts) with nothing wrong
# in the release: once the device got past them (verified the files, or further) they no
# longer count. Any other failure counts for good.
RETRIED_REASONS = frozenset({ReasonCode.DOWNLOAD, ReasonCode.DISK_FULL})
_PAST_DOWNLOAD = frozenset({EventKind.VERIFIED, EventKind.STAGED, EventKind.SMOKE_PASSED,
                            EventKind.ACTIVATED, EventKind.COMMITTED})


def install_failures_gate(inp: GateInput) -> GateResult | None:
    ids = {d.device_id for d in inp.members}
    bad: dict[str, str | None] = {}
    for e in inp.events:  # in the order they were received
        if e.device_id not in ids:
            continue
        if is_install_failure(e, inp.target):
            bad[e.device_id] = e.reason
        elif e.release == inp.target and e.kind in _PAST_DOWNLOAD and bad.get(e.device_id) in RETRIED_REASONS:
            del bad[e.device_id]
    result = _count_gate(inp, "max_install_failures", inp.gates.max_install_failures, "install_failures", bad)
    if result is not None and result.status is GateStatus.FAIL:
        # keep the established wording: "install_failures 1 > 0 on 1 device (hash)"
        reasons = result.figures["reasons"]
        why = f" ({', '.join(reasons)})" if reasons else ""
        message = (
            f"install_failures {len(bad)} > {inp.gates.max_install_failures} on "
            f"{_plural(len(bad), 'device')}{why}"
        )
        return replace(result, message=message)
    return result


def local_rollbacks_gate(inp: GateInput) -> GateResult | None:
    ids = {d.device_id for d in inp.members}
    back: dict[str, str | None] = {}
    for e in inp.events:
        if e.device_id in ids and is_local_rollback(e, inp.target):
            back[e.device_id] = e.reason
    return _count_gate(inp, "max_local_rollbacks", inp.gates.max_local_rollbacks, "local_rollbacks", back)


def silent_gate(inp: GateInput) -> GateResult | None:
    silent = {d: p.reason for d, p in inp.progress.items() if p.progress is Progress.SILENT}
    return _count_gate(inp, "max_silent_devices", inp.gates.max_silent_devices, "silent_devices", silent)


def offline_gate(inp: GateInput) -> GateResult | None:
    """Devices that went offline during the update (their last will, after they were told to
    update) or went silent past the deadline, as a fraction. A device already offline when it
    was assigned has not gone offline during the update: it counts once it is silent."""
    g = inp.gates
    if g.max_offline_fraction is None:
        return None

    def went_offline(d: DeviceState) -> bool:
        if d.online is not False or d.last_seen is None:
            return False
        return d.assigned_at is None or d.last_seen >= d.assigned_at

    offline = sorted(
        d.device_id
        for d in inp.members
        if went_offline(d)
        or inp.progress.get(d.device_id, DeviceProgress("", 0, Progress.ASSIGNED)).progress is Progress.SILENT
    )
    members = len(inp.members)
    fraction = len(offline) / members if members else 0.0
    figures = {
        "offline_fraction": round(fraction, 4),
        "offline": offline,
        "members": members,
        "max_offline_fraction": g.max_offline_fraction,
    }
    common = {
        "observed": round(fraction, 4),
        "threshold": g.max_offline_fraction,
        "figures": figures,
        "sample": members,
        "min_sample": g.min_devices,
    }
    if members < g.min_devices:
        return GateResult(
            "max_offline_fraction",
            GateStatus.WAIT,
            f"offline_fraction {_short_of(members, g.min_devices, 'devices')}",
            **common,
        )
    listed = ", ".join(offline[:5]) + ("…" if len(offline) > 5 else "")
    if fraction > g.max_offline_fraction:
        return GateResult(
            "max_offline_fraction",
            GateStatus.FAIL,
            f"offline_fraction {fraction:.2f} > {g.max_offline_fraction}: "
            f"{len(offline)} of {_plural(members, 'device')} offline or silent ({listed})",
            **common,
        )
    return GateResult(
        "max_offline_fraction",
        GateStatus.PASS,
        f"offline_fraction {fraction:.2f} <= {g.max_offline_fraction} "
        f"({len(offline)} of {_plural(members, 'device')})",
        **common,
    )


GATES = (
    error_rate_gate,
    latency_gate,
    drift_gate,
    local_rollbacks_gate,
    install_failures_gate,
    silent_gate,
    offline_gate,
)


def evaluate_gates(inp: GateInput) -> tuple[GateResult, ...]:
    """Every enabled gate of the stage's mode, in a fixed order (the first failing one names
    the failure)."""
    # Imported here: the shadow gates build on this module's types.
    from fleet.rollout.shadow_gates import SHADOW_GATES

    gates = SHADOW_GATES if inp.mode == "shadow" else GATES
    return tuple(r for r in (gate(inp) for gate in gates) if r is not None)

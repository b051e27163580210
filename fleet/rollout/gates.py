"""The gates on the target release's own health (error rate, latency against the previous
release, drift) and ``evaluate_gates``, which runs every gate of a stage's mode.

Every gate returns PASS, FAIL or WAIT (not enough sample). Bad news needs its minimum sample
too for rates and ratios; counts (failures, rollbacks, silent devices; fleet.rollout.count_gates)
fail as soon as they exceed their bound. Each result carries what explains it: observed value,
threshold, sample and minimum.
"""

from __future__ import annotations

import math
import statistics

from fleet.rollout.bounds import CONFIDENCE, share_evidence
from fleet.rollout.count_gates import (
    install_failures_gate,
    local_rollbacks_gate,
    offline_gate,
    silent_gate,
)
from fleet.rollout.evidence import (
    MAX_LISTED,
    capped_weights,
    refused_figures,
    trim_count,
    trimmed_mean,
)
from fleet.rollout.gate_results import GateResult, GateStatus, plural, short_of, too_few_reported
from fleet.rollout.reports import GateInput, HealthWindow
from fleet.rollout.shadow_gates import SHADOW_GATES


def _windows(inp: GateInput) -> list[HealthWindow]:
    """The accepted windows of the target release from the stage's devices (evidence)."""
    return [h for e in inp.evidence.values() for h in e.windows]


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
            f"error_rate {short_of(sample, need, 'inferences')}",
            sample=sample,
            min_sample=need,
            unit="inferences",
            **common,
        )
    if (short := too_few_reported(inp, "max_error_rate", "error_rate", common)) is not None:
        return short
    if reporting < g.min_devices:
        return GateResult(
            "max_error_rate",
            GateStatus.WAIT,
            f"error_rate {short_of(reporting, g.min_devices, 'devices')}",
            sample=reporting,
            min_sample=g.min_devices,
            **common,
        )
    over = (
        f"over {plural(sample, 'inference')} on {plural(reporting, 'device')}"
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
    if (short := too_few_reported(inp, "max_latency_ratio", "latency_ratio", common)) is not None:
        return short
    if len(per_device) < g.min_devices:
        return GateResult(
            "max_latency_ratio",
            GateStatus.WAIT,
            f"latency_ratio {short_of(len(per_device), g.min_devices, 'devices')} with p95 on both releases",
            sample=len(per_device),
            min_sample=g.min_devices,
            **common,
        )
    if sampled < need:
        return GateResult(
            "max_latency_ratio",
            GateStatus.WAIT,
            f"latency_ratio {short_of(sampled, need, 'inferences')}",
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
        f"{p95_old:.1f} ms on the previous release, median of {plural(len(per_device), 'device')})",
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
    if (short := too_few_reported(inp, "max_drift", "drift", common)) is not None:
        return short
    if devices < g.min_devices:
        return GateResult(
            "max_drift",
            GateStatus.WAIT,
            f"drift {short_of(devices, g.min_devices, 'devices')} reporting drift",
            sample=devices,
            min_sample=g.min_devices,
            **common,
        )
    status, op = (GateStatus.FAIL, ">") if drift > g.max_drift else (GateStatus.PASS, "<=")
    return GateResult(
        "max_drift",
        status,
        f"drift {drift:.2f} {op} {g.max_drift} over {plural(windows, 'window')} "
        f"on {plural(devices, 'device')}{_set_aside(devices, g.trim_devices)}",
        sample=devices,
        min_sample=g.min_devices,
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
    gates = SHADOW_GATES if inp.mode == "shadow" else GATES
    return tuple(r for r in (gate(inp) for gate in gates) if r is not None)

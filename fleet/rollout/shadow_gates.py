"""The gates of a shadow stage: the candidate's agreement with the serving release on the
same sampled live requests, its error against it, and its latency, as devices report them."""

from __future__ import annotations

import statistics
from typing import Any

from fleet.rollout.gates import (
    GateInput,
    GateResult,
    GateStatus,
    ShadowFigures,
    _plural,
    _short_of,
    install_failures_gate,
    offline_gate,
    silent_gate,
)


def _shadow_sample(inp: GateInput) -> tuple[list[ShadowFigures], int, int, dict[str, Any]]:
    """The stage's shadow figures: (reports, samples, devices with samples, common figures)."""
    ids = {d.device_id for d in inp.members}
    reports = [f for f in inp.shadow if f.device_id in ids and f.release == inp.target]
    samples = sum(f.samples for f in reports)
    devices = sum(1 for f in reports if f.samples)
    figures: dict[str, Any] = {
        "samples": samples,
        "agreed": sum(f.agreed for f in reports),
        "errors": sum(f.errors for f in reports),
        "dropped": sum(f.dropped for f in reports),
        "devices": devices,
        "metric": sorted({f.metric for f in reports}),
        "min_shadow_samples": inp.gates.min_shadow_samples,
        "min_devices": inp.gates.min_devices,
    }
    return reports, samples, devices, figures


def _shadow_wait(inp: GateInput, gate: str, what: str, samples: int, devices: int,
                 common: dict[str, Any]) -> GateResult | None:
    """WAIT when the shadow sample is short (samples, then devices); else None."""
    need = max(inp.gates.min_shadow_samples, 1)
    if samples < need:
        return GateResult(gate, GateStatus.WAIT, f"{what} {_short_of(samples, need, 'samples')}",
                          sample=samples, min_sample=need, unit="samples", **common)
    if devices < inp.gates.min_devices:
        short = _short_of(devices, inp.gates.min_devices, "devices")
        return GateResult(gate, GateStatus.WAIT, f"{what} {short} reporting shadow samples",
                          sample=devices, min_sample=inp.gates.min_devices, **common)
    return None


def _over(samples: int, devices: int) -> str:
    return f"over {_plural(samples, 'sample')} on {_plural(devices, 'device')}"


def agreement_gate(inp: GateInput) -> GateResult | None:
    """Share of sampled requests on which the candidate agrees with the serving release."""
    g = inp.gates
    if g.min_agreement is None:
        return None
    reports, samples, devices, figures = _shadow_sample(inp)
    agreement = figures["agreed"] / samples if samples else 0.0
    figures |= {"agreement": round(agreement, 6), "min_agreement": g.min_agreement,
                "per_device": {f.device_id: round(f.agreed / f.samples, 4) for f in reports if f.samples}}
    common = {"observed": round(agreement, 6), "threshold": g.min_agreement, "figures": figures}
    waiting = _shadow_wait(inp, "min_agreement", "shadow agreement", samples, devices, common)
    if waiting is not None:
        return waiting
    status, op = (GateStatus.FAIL, "<") if agreement < g.min_agreement else (GateStatus.PASS, ">=")
    errors = f", {figures['errors']} candidate errors" if figures["errors"] else ""
    return GateResult(
        "min_agreement", status,
        f"shadow agreement {agreement:.2f} {op} {g.min_agreement} {_over(samples, devices)} "
        f"(r{inp.target} vs the serving release{errors})",
        sample=samples, min_sample=max(g.min_shadow_samples, 1), unit="samples", **common,
    )


def abs_error_gate(inp: GateInput) -> GateResult | None:
    g = inp.gates
    if g.max_abs_error is None:
        return None
    reports, samples, devices, figures = _shadow_sample(inp)
    worst = [(f.max_abs_error, f.device_id) for f in reports if f.max_abs_error is not None]
    observed, where = max(worst) if worst else (0.0, None)
    figures |= {"max_abs_error": observed, "device": where, "bound": g.max_abs_error}
    common = {"observed": round(observed, 6), "threshold": g.max_abs_error, "figures": figures}
    waiting = _shadow_wait(inp, "max_abs_error", "shadow max_abs_error", samples, devices, common)
    if waiting is not None:
        return waiting
    status, op = (GateStatus.FAIL, ">") if observed > g.max_abs_error else (GateStatus.PASS, "<=")
    at = f", worst on {where}" if status is GateStatus.FAIL and where else ""
    return GateResult(
        "max_abs_error", status,
        f"shadow max_abs_error {observed:.3g} {op} {g.max_abs_error} {_over(samples, devices)}{at}",
        sample=samples, min_sample=max(g.min_shadow_samples, 1), unit="samples", **common,
    )


def cosine_gate(inp: GateInput) -> GateResult | None:
    g = inp.gates
    if g.min_cosine is None:
        return None
    reports, samples, devices, figures = _shadow_sample(inp)
    worst = [(f.cosine_min, f.device_id) for f in reports if f.cosine_min is not None]
    observed, where = min(worst) if worst else (1.0, None)
    figures |= {"cosine_min": observed, "device": where, "min_cosine": g.min_cosine}
    common = {"observed": round(observed, 6), "threshold": g.min_cosine, "figures": figures}
    waiting = _shadow_wait(inp, "min_cosine", "shadow cosine", samples, devices, common)
    if waiting is not None:
        return waiting
    status, op = (GateStatus.FAIL, "<") if observed < g.min_cosine else (GateStatus.PASS, ">=")
    return GateResult(
        "min_cosine", status,
        f"shadow cosine {observed:.4f} {op} {g.min_cosine} {_over(samples, devices)}",
        sample=samples, min_sample=max(g.min_shadow_samples, 1), unit="samples", **common,
    )


def candidate_latency_gate(inp: GateInput) -> GateResult | None:
    """Candidate p95 / serving p95 on the same sampled requests, median over devices."""
    g = inp.gates
    if g.max_candidate_p95_ratio is None:
        return None
    reports, samples, _devices, figures = _shadow_sample(inp)
    per = {
        f.device_id: (f.candidate_p95_ms, f.current_p95_ms)
        for f in reports
        if f.candidate_p95_ms is not None and f.current_p95_ms and f.samples
    }
    ratios = {d: round(c / s, 3) for d, (c, s) in sorted(per.items()) if c is not None and s}
    ratio = statistics.median(ratios.values()) if ratios else 0.0
    cand = statistics.median(c for c, _ in per.values() if c is not None) if per else None
    cur = statistics.median(s for _, s in per.values() if s) if per else None
    figures |= {"candidate_p95_ratio": round(ratio, 3), "candidate_p95_ms": cand, "current_p95_ms": cur,
                "per_device": ratios, "max_candidate_p95_ratio": g.max_candidate_p95_ratio}
    common = {"observed": round(ratio, 3), "threshold": g.max_candidate_p95_ratio, "figures": figures}
    waiting = _shadow_wait(
        inp, "max_candidate_p95_ratio", "candidate p95 ratio", samples, len(ratios), common
    )
    if waiting is not None:
        return waiting
    status, op = (GateStatus.FAIL, ">") if ratio > g.max_candidate_p95_ratio else (GateStatus.PASS, "<=")
    return GateResult(
        "max_candidate_p95_ratio", status,
        f"candidate p95 ratio {ratio:.2f} {op} {g.max_candidate_p95_ratio} (p95 {cand:.2f} ms vs "
        f"{cur:.2f} ms for the serving release on the same requests, median of "
        f"{_plural(len(ratios), 'device')})",
        sample=len(ratios), min_sample=g.min_devices, **common,
    )


# In a shadow stage no device serves the target: its health windows do not exist, so the
# gates on them give way to the shadow gates; the device-count gates stay.
SHADOW_GATES = (
    agreement_gate,
    abs_error_gate,
    cosine_gate,
    candidate_latency_gate,
    install_failures_gate,
    silent_gate,
    offline_gate,
)

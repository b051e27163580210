"""The gates of a shadow stage: the candidate's agreement with the serving release on the
same sampled live requests, its error against it, and its latency, as devices report them.

Each device's report is a claim (fleet.rollout.evidence): one with negative, inconsistent,
non-finite or implausible figures is refused; a device weighs its samples capped at the
largest other device's; agreement is the weighted mean of per-device agreement after
setting aside the ``trim_devices`` highest and lowest; the worst-device gates (abs error,
cosine) judge the worst device after setting aside the ``trim_devices`` worst.

Agreement is judged on evidence, not its point estimate: its Wilson bounds on the effective
sample (fleet.rollout.bounds) pass it, fail it, or leave it undecided (WAIT), and the
figures carry the effective sample and the devices' spread."""

from __future__ import annotations

import statistics
from typing import Any

from fleet.rollout.bounds import CONFIDENCE, samples_to_decide, share_evidence
from fleet.rollout.count_gates import install_failures_gate, offline_gate, silent_gate
from fleet.rollout.evidence import capped_weights, shadow_refusal, trim_count, trimmed_mean
from fleet.rollout.gate_results import GateResult, GateStatus, devices_needed, plural, short_of
from fleet.rollout.reports import GateInput, ShadowFigures


def _accepted(inp: GateInput) -> tuple[list[ShadowFigures], dict[str, dict[str, int]]]:
    """The stage's devices' shadow reports of the target that are accepted, and the refused
    ones by device and reason (one report per device: its latest)."""
    ids = {d.device_id for d in inp.members}
    reports, refused = [], {}
    for f in inp.shadow:
        if f.device_id not in ids or f.release != inp.target:
            continue
        ev = inp.evidence.get(f.device_id)
        why = shadow_refusal(f, ev.ceiling if ev is not None else None)
        if why is None:
            reports.append(f)
        else:
            refused[f.device_id] = {why.value: 1}
    return reports, refused


def _shadow_sample(inp: GateInput) -> tuple[list[ShadowFigures], int, int, dict[str, Any]]:
    """The stage's shadow figures: (reports, samples, devices with samples, common figures)."""
    reports, refused = _accepted(inp)
    samples = sum(capped_weights({f.device_id: f.samples for f in reports}).values())
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
        "refused": dict(sorted(refused.items())[:20]),
    }
    return reports, samples, devices, figures


def _shadow_wait(inp: GateInput, gate: str, what: str, samples: int, devices: int,
                 common: dict[str, Any]) -> GateResult | None:
    """WAIT when the shadow sample is short (samples, then devices); else None."""
    need = max(inp.gates.min_shadow_samples, 1)
    if samples < need:
        return GateResult(gate, GateStatus.WAIT, f"{what} {short_of(samples, need, 'samples')}",
                          sample=samples, min_sample=need, unit="samples", **common)
    reports, refused = _accepted(inp)
    reported = len({f.device_id for f in reports})
    needed = devices_needed(inp, set(refused))
    if reported < needed:
        short = short_of(reported, needed, "devices")
        return GateResult(gate, GateStatus.WAIT, f"{what} {short} reporting in shadow",
                          sample=reported, min_sample=needed, **common)
    if devices < inp.gates.min_devices:
        short = short_of(devices, inp.gates.min_devices, "devices")
        return GateResult(gate, GateStatus.WAIT, f"{what} {short} reporting shadow samples",
                          sample=devices, min_sample=inp.gates.min_devices, **common)
    return None


def _over(samples: int, devices: int) -> str:
    return f"over {plural(samples, 'sample')} on {plural(devices, 'device')}"


def agreement_gate(inp: GateInput) -> GateResult | None:
    """Share of sampled requests on which the candidate agrees with the serving release,
    judged by its Wilson bounds on the effective sample (fleet.rollout.bounds): PASS when
    the lower bound clears ``min_agreement``, FAIL when the upper bound misses it, else WAIT
    with the sample the observed share needs to decide."""
    g = inp.gates
    if g.min_agreement is None:
        return None
    reports, samples, devices, figures = _shadow_sample(inp)
    sampled = [f for f in reports if f.samples]
    weights = capped_weights({f.device_id: f.samples for f in sampled})
    shares = {f.device_id: f.agreed / f.samples for f in sampled}
    trimmed = trimmed_mean(shares, weights, g.trim_devices)
    agreement = trimmed.value
    kept = set(trimmed.kept)
    evidence = share_evidence({d: v for d, v in shares.items() if d in kept},
                              {f.device_id: f.samples for f in sampled},
                              {d: float(w) for d, w in weights.items()})
    lower, upper = evidence.interval()
    spread = max(shares.values()) - min(shares.values()) if shares else 0.0  # every device's
    figures |= {"agreement": round(agreement, 6), "min_agreement": g.min_agreement,
                "lower_bound": round(lower, 6), "upper_bound": round(upper, 6),
                "confidence": CONFIDENCE, "effective_samples": round(evidence.effective, 1),
                "device_spread": round(spread, 4),
                "per_device": {f.device_id: round(f.agreed / f.samples, 4) for f in sampled[:20]},
                **trimmed.figures()}
    common = {"observed": round(agreement, 6), "threshold": g.min_agreement, "figures": figures}
    waiting = _shadow_wait(inp, "min_agreement", "shadow agreement", samples, devices, common)
    if waiting is not None:
        return waiting
    pct = f"{CONFIDENCE:.0%}"
    effective = f"effective sample {evidence.effective:.0f}, device spread {spread:.2f}"
    errors = f", {figures['errors']} candidate errors" if figures["errors"] else ""
    if upper < g.min_agreement:
        status, op, bound = GateStatus.FAIL, "<", f"{pct} upper bound {upper:.3f}"
    elif lower >= g.min_agreement:
        status, op, bound = GateStatus.PASS, ">=", f"{pct} lower bound {lower:.3f}"
    else:
        design = samples / evidence.effective if evidence.effective > 0 else 1.0
        need = max(samples + 1, samples_to_decide(agreement, g.min_agreement, design=design))
        figures["samples_to_decide"] = need
        return GateResult(
            "min_agreement", GateStatus.WAIT,
            f"shadow agreement {agreement:.2f} undecided against {g.min_agreement}: {pct} bounds "
            f"{lower:.3f}-{upper:.3f} {_over(samples, devices)} ({effective}); about {need} "
            f"samples decide",
            sample=samples, min_sample=need, unit="samples", **common,
        )
    return GateResult(
        "min_agreement", status,
        f"shadow agreement {agreement:.2f} {op} {g.min_agreement} {_over(samples, devices)} "
        f"(r{inp.target} vs the serving release{errors}; {bound}, {effective})",
        sample=samples, min_sample=max(g.min_shadow_samples, 1), unit="samples", **common,
    )


def _worst_device_gate(inp: GateInput, gate: str, label: str, field: str, bound: float | None, *,
                       higher_is_worse: bool, digits: str) -> GateResult | None:
    """A bound on the worst device's figure (``field`` of its shadow report), after setting
    aside the ``trim_devices`` worst (as many as leave one device)."""
    if bound is None:
        return None
    reports, samples, devices, figures = _shadow_sample(inp)
    values = sorted(((v, f.device_id) for f in reports if (v := getattr(f, field)) is not None),
                    reverse=higher_is_worse)
    k = trim_count(len(values), inp.gates.trim_devices)
    if values:
        observed, where = values[k]
    else:
        observed, where = (0.0 if higher_is_worse else 1.0), None
    figures |= {field: observed, "device": where, gate: bound, "set_aside": [d for _v, d in values[:k]]}
    common = {"observed": round(observed, 6), "threshold": bound, "figures": figures}
    waiting = _shadow_wait(inp, gate, f"shadow {label}", samples, devices, common)
    if waiting is not None:
        return waiting
    failed = observed > bound if higher_is_worse else observed < bound
    op = (">" if failed else "<=") if higher_is_worse else ("<" if failed else ">=")
    at = f", worst on {where}" if failed and where else ""
    return GateResult(
        gate, GateStatus.FAIL if failed else GateStatus.PASS,
        f"shadow {label} {observed:{digits}} {op} {bound} {_over(samples, devices)}{at}",
        sample=samples, min_sample=max(inp.gates.min_shadow_samples, 1), unit="samples", **common,
    )


def abs_error_gate(inp: GateInput) -> GateResult | None:
    """The largest absolute difference between candidate and serving outputs on any device."""
    return _worst_device_gate(inp, "max_abs_error", "max_abs_error", "max_abs_error",
                              inp.gates.max_abs_error, higher_is_worse=True, digits=".3g")


def cosine_gate(inp: GateInput) -> GateResult | None:
    """The lowest cosine between candidate and serving outputs on any device."""
    return _worst_device_gate(inp, "min_cosine", "cosine", "cosine_min",
                              inp.gates.min_cosine, higher_is_worse=False, digits=".4f")


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
        f"{plural(len(ratios), 'device')})",
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

"""The gates that count devices: install failures, local rollbacks, silent devices (each
fails as soon as its count exceeds its bound) and the fraction offline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from fleet.rollout.gate_results import GateResult, GateStatus, plural, short_of
from fleet.rollout.progress import DeviceProgress, Progress, is_install_failure, is_local_rollback
from fleet.rollout.reports import DeviceState, GateInput
from shared.telemetry.vocabulary import EventKind, ReasonCode


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
            gate, GateStatus.WAIT, f"{what} {short_of(members, inp.gates.min_devices, 'devices')}", **common
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
            f"{plural(len(bad), 'device')}{why}"
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
            f"offline_fraction {short_of(members, g.min_devices, 'devices')}",
            **common,
        )
    listed = ", ".join(offline[:5]) + ("…" if len(offline) > 5 else "")
    if fraction > g.max_offline_fraction:
        return GateResult(
            "max_offline_fraction",
            GateStatus.FAIL,
            f"offline_fraction {fraction:.2f} > {g.max_offline_fraction}: "
            f"{len(offline)} of {plural(members, 'device')} offline or silent ({listed})",
            **common,
        )
    return GateResult(
        "max_offline_fraction",
        GateStatus.PASS,
        f"offline_fraction {fraction:.2f} <= {g.max_offline_fraction} "
        f"({len(offline)} of {plural(members, 'device')})",
        **common,
    )

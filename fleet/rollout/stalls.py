"""Stages that cannot progress: a device refused the release, or nothing moves any more.

The engine (``evaluate_stage``) waits while a member of the stage has not committed the
target and no gate counts it. Some of those waits never end:

- a device *refused* the release (reason ``rollback``, ``signature``, ``scope``, ``expired``,
  ``agent_version``, ``malformed``): it checked the signed manifest and said no, and asking
  again gets the same answer. Unless ``max_install_failures`` counts failed installs, the
  stage fails at once with the device's reason code and text;
- every member that has not committed is failed, rolled back or silent, and no gate counts
  it: nothing can move the stage. Once the stage has run for its deadline
  (``max(bake time, silent_after_s)``, so a device gets the time the spec gives it to speak up),
  it fails, naming each device and why.

- a stage that still waits for devices at its deadline (``deadline_seconds``, by default the
  bake time plus 3 times ``silent_after_s``, a day more while a device waits for its activation
  window or an update lock): a device that keeps reporting "downloading" (or any
  progress short of the target) is heard from, so it is never silent and never stuck; at the
  deadline it counts as failed and the stage fails, naming it (``judge_deadline``).

The failure then goes where every gate failure goes (``on_gate_failure``: roll back or
pause), so no rollout waits forever. ``judge_stall`` is pure: data in, a decision or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet.rollout.engine import Decision, DeviceProgress, Progress, RolloutSpec, Verdict
from shared.telemetry.vocabulary import REFUSAL_REASONS

# Device-side reason codes (shared.telemetry.vocabulary.ReasonCode) that refuse the release
# itself; the others (download, disk_full, load, smoke_test, ...) may pass on a retry.
REFUSAL_CODES = REFUSAL_REASONS
REFUSED_GATE = "device_refused"
STALLED_GATE = "stage_stalled"
DEADLINE_GATE = "stage_deadline"
MAX_DETAIL = 400
NAMED_DEVICES = 5


@dataclass(frozen=True)
class Refusal:
    """A device's latest failed update event for the target: its reason code and text."""

    reason: str | None
    message: str


def with_refusal_texts(
    devices: Sequence[DeviceProgress], refusals: Mapping[str, Refusal], target: str
) -> tuple[DeviceProgress, ...]:
    """Failed devices carry the device's own words: "refused r12 (1.2.0): rollback: ..."."""
    out = []
    for p in devices:
        r = refusals.get(p.device_id)
        if p.progress is Progress.FAILED and r is not None:
            verb = "refused" if r.reason in REFUSAL_CODES else "failed to install"
            text = f"{verb} {target}: {r.reason or 'unknown'}" + (f": {r.message}" if r.message else "")
            p = dataclasses.replace(p, reason=r.reason or p.reason, detail=text[:MAX_DETAIL])
        out.append(p)
    return tuple(out)


def _named(devices: Sequence[DeviceProgress]) -> str:
    shown = "; ".join(f"{p.device_id} {p.detail or p.progress.value}" for p in devices[:NAMED_DEVICES])
    return shown + (f"; and {len(devices) - NAMED_DEVICES} more" if len(devices) > NAMED_DEVICES else "")


def judge_stall(
    spec: RolloutSpec,
    stage_index: int,
    decision: Decision,
    *,
    now: float,
    stage_started_at: float,
) -> Decision | None:
    """A FAIL decision when the waiting stage cannot progress; None when it may still."""
    if decision.verdict is not Verdict.WAIT:
        return None
    stage = spec.stages[stage_index]
    gates = spec.gates_of(stage_index)
    label = f"stage {stage.name}"
    members = [p for p in decision.devices if p.stage <= stage_index]
    if len(members) < stage.min_devices:
        return judge_deadline(spec, stage_index, decision, now=now, stage_started_at=stage_started_at)
    counted = {
        Progress.FAILED: gates.max_install_failures is not None,
        Progress.ROLLED_BACK: gates.max_local_rollbacks is not None,
        Progress.SILENT: gates.max_silent_devices is not None,
    }
    refused = [
        p for p in members
        if p.progress is Progress.FAILED and p.reason in REFUSAL_CODES and not counted[Progress.FAILED]
    ]
    if refused:
        codes = sorted({p.reason or "" for p in refused})
        return dataclasses.replace(
            decision,
            verdict=Verdict.FAIL,
            message=f"{label}: {len(refused)} of {len(members)} devices refused the release "
            f"({', '.join(codes)}): {_named(refused)}",
            gate=REFUSED_GATE,
            figures={**decision.figures, "refused": {p.device_id: p.reason for p in refused}},
        )
    done = Progress.SHADOW if stage.mode == "shadow" else Progress.COMMITTED
    waiting = [p for p in members if p.progress is not done]
    stuck = [p for p in waiting if p.progress in counted and not counted[p.progress]]
    if not waiting or len(stuck) < len(waiting):
        return judge_deadline(spec, stage_index, decision, now=now, stage_started_at=stage_started_at)
    deadline = max(stage.bake_seconds, spec.silent_after_s)
    ran = now - stage_started_at
    if ran < deadline:
        return judge_deadline(spec, stage_index, decision, now=now, stage_started_at=stage_started_at)
    return dataclasses.replace(
        decision,
        verdict=Verdict.FAIL,
        message=f"{label}: cannot progress after {ran:.0f} s (deadline {deadline:g} s): "
        f"{len(stuck)} of {len(members)} devices will not reach the target and no gate counts "
        f"them: {_named(stuck)}",
        gate=STALLED_GATE,
        figures={**decision.figures, "stalled": {p.device_id: p.progress.value for p in stuck},
                 "deadline_s": deadline},
    )


def judge_deadline(
    spec: RolloutSpec,
    stage_index: int,
    decision: Decision,
    *,
    now: float,
    stage_started_at: float,
) -> Decision | None:
    """A FAIL decision when the stage still waits for devices at its deadline
    (``RolloutSpec.stage_deadline``): devices that are heard from but never finish (a download
    that never ends, a device reporting progress forever) or devices that never joined
    (``min_devices``). The devices that did not finish count as failed: the message names them
    and what they last reported. A stage that waits only for its bake time or for approval is
    not judged here (both end by themselves or by the operator)."""
    if decision.verdict is not Verdict.WAIT:
        return None
    stage = spec.stages[stage_index]
    members = [p for p in decision.devices if p.stage <= stage_index]
    # gates.device_progress says "staged, waiting for ..." of a device held by its window or a lock
    window_wait = any(p.progress is Progress.STAGED and p.detail.startswith("staged, ") for p in members)
    deadline = spec.stage_deadline(stage_index, window_wait=window_wait)
    ran = now - stage_started_at
    if ran < deadline:
        return None
    gates = spec.gates_of(stage_index)
    label = f"stage {stage.name}"
    timing = f"at its deadline ({ran:.0f} s of {deadline:g} s)"
    figures = {**decision.figures, "deadline_s": deadline, "ran_s": round(ran, 1)}
    if len(members) < stage.min_devices:
        return dataclasses.replace(
            decision,
            verdict=Verdict.FAIL,
            message=f"{label}: {len(members)} of at least {stage.min_devices} devices {timing}",
            gate=DEADLINE_GATE,
            figures={**figures, "unfinished": {}},
        )
    counted = {
        Progress.FAILED: gates.max_install_failures is not None,
        Progress.ROLLED_BACK: gates.max_local_rollbacks is not None,
        Progress.SILENT: gates.max_silent_devices is not None,
    }
    done = Progress.SHADOW if stage.mode == "shadow" else Progress.COMMITTED
    unfinished = [p for p in members if p.progress is not done and not counted.get(p.progress, False)]
    if not unfinished:
        return None  # only the bake time is left
    what = "in shadow" if stage.mode == "shadow" else "committed"
    return dataclasses.replace(
        decision,
        verdict=Verdict.FAIL,
        message=f"{label}: {len(unfinished)} of {len(members)} devices did not report the target "
        f"{what} {timing}, counted as failed: {_named(unfinished)}",
        gate=DEADLINE_GATE,
        figures={**figures, "unfinished": {p.device_id: p.progress.value for p in unfinished}},
    )

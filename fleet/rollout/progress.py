"""Where each device of a rollout stands with the target release: pure functions over plain
data (no database, no clock).

- a device counts as updated only once it *committed* the target release (health state
  ``committed`` on that release, or a ``committed`` event); ``activated`` means on trial;
- a device that rolled back locally (event ``rolled_back`` whose ``from_release`` is the
  target) is ``rolled_back`` with the device's reason code at once; a ``failed`` event for
  the target is ``failed`` with its code (``superseded`` is the fleet's own doing: ignored);
- a device not heard from for ``silent_after_s`` (counted from when it was told to update,
  or its last report if later) is ``silent``, whatever it reported before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleet.rollout.reports import DeviceState, InstallEvent, ShadowFigures
from shared.telemetry.vocabulary import EventKind, ReasonCode, UpdateState


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


@dataclass(frozen=True, slots=True)
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

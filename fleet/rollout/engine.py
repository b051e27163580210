"""The rollout engine: pure decisions over plain data. No database, no clock, no network.

Rules:
- a spec is validated once, at creation; every error names the field it is about;
- stages are cumulative: stage k holds the devices of stages 0..k plus those that match
  its selector and whose hash ``sha256(rollout_id:device_id)`` maps below percent/100;
  a device belongs to the first stage it qualifies for, so assignment is deterministic
  and does not move when other devices join or leave;
- a device is updated once it *committed* the target release (see ``gates``);
- a stage fails as soon as a gate fails with its minimum sample (no need to wait out
  the bake time for bad news), even while it waits for approval; it passes when it holds
  at least ``min_devices``, every device in it committed the target (or is counted by a
  gate that holds: failed, rolled back, silent), its bake time is over and every gate
  holds with its minimum sample;
- no data is not good news: when the bake time is over and a gate still lacks its
  sample, the stage is *inconclusive* and the spec's ``on_inconclusive`` decides: pause,
  extend the bake time (a bounded number of times, then pause) or fail;
- a stage with ``approval`` waits for the operator after it passed;
  otherwise it waits and says what for;
- a ``shadow`` stage switches nobody: its devices run the target beside their serving
  release on a sample of live requests; it waits until every device reports the candidate
  in shadow, is judged by the shadow gates (agreement, max abs error, cosine, candidate
  latency) instead of the gates on the target's own health, and when it passes the next
  (switch) stage activates the target on its devices. Shadow stages come first and the
  last stage switches.

Every stage ends by its deadline (``RolloutSpec.stage_deadline``; judged in
``fleet.rollout.stalls``). A decision becomes actions in ``fleet.rollout.actions.plan``.

The rollout lifecycle (one place, ``TRANSITIONS``; the controller changes a state only through
``transition``; ``state_diagram`` draws it for docs/architecture.md):

    created --start--> running --(last stage passes)--> succeeded
                        |  ^
                  pause |  | resume
                        v  |
                       paused
    running/paused --(gate fails, on_gate_failure=rollback) or rollback--> rolled_back
    running        --(gate fails, on_gate_failure=pause; inconclusive)--> paused
    running        --approve--> running (the stage waiting for approval goes on)
    created/running/paused --abort--> aborted
    succeeded --rollback--> rolled_back
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import msgspec

from fleet.rollout.evidence import device_evidence
from fleet.rollout.gate_results import GateResult, GateStatus
from fleet.rollout.gate_spec import Gates, SpecError, validate_gates
from fleet.rollout.gates import evaluate_gates
from fleet.rollout.progress import SETTLED_BAD, DeviceProgress, Progress, device_progress, shadow_progress
from fleet.rollout.reports import DeviceState, GateInput, HealthWindow, InstallEvent, ShadowFigures
from shared.errors import EdgefleetError

__all__ = [
    "DeviceProgress",
    "DeviceState",
    "GateResult",
    "GateStatus",
    "Gates",
    "HealthWindow",
    "InstallEvent",
    "Progress",
    "ShadowFigures",
    "SpecError",
]

MAX_STAGES = 32
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)\Z")


class TransitionError(EdgefleetError):
    """An operation that the rollout's current state does not allow."""

    code = "rollout_state"


STAGE_MODES = ("switch", "shadow")
# A stage's default deadline: its bake time plus this many silent_after_s (15 min by default):
# a device that is heard from but never gets there (a download that never ends, a hostile
# device reporting progress forever) holds the stage no longer than that.
DEADLINE_SILENCES = 3
WINDOW_WAIT_S = 86_400.0
ON_INCONCLUSIVE = ("pause", "extend", "fail")


class StageSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    selector: dict[str, str] | None = None
    percent: float | None = None
    min_devices: int = 0
    bake_seconds: float = 0.0
    approval: bool = False
    mode: str = "switch"
    gates: Gates | None = None  # replaces the rollout's gates for this stage
    # mode "shadow": share of live requests also run on the candidate, and the CPU budget of
    # the device's shadow worker (fraction of wall time)
    shadow_sample_rate: float = 0.1
    shadow_max_busy_fraction: float = 0.25
    # By then every device reached the target (or a gate counts it) or the stage fails, naming
    # the devices it still waits for (fleet.rollout.stalls). None: bake_seconds plus
    # DEADLINE_SILENCES times the rollout's silent_after_s (see stage_deadline).
    deadline_seconds: float | None = None


class RolloutSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    bundle_id: int
    stages: list[StageSpec]
    selector: dict[str, str] = {}
    gates: Gates = msgspec.field(default_factory=Gates)
    on_gate_failure: str = "rollback"
    silent_after_s: float = 300.0
    on_inconclusive: str = "pause"
    extend_seconds: float = 60.0
    max_extensions: int = 3
    # Devices activate the release only inside this window, "HH:MM-HH:MM" in each device's
    # local time (they download and stage it at any time); None: the device's own window.
    activation_window: str | None = None

    def gates_of(self, stage_index: int) -> Gates:
        return self.stages[stage_index].gates or self.gates

    def stage_deadline(self, stage_index: int, *, window_wait: bool = False) -> float:
        """Seconds from a stage's start by which its devices must have reached the target;
        ``window_wait``: a device waits for its activation window or an update lock, which
        adds a day to the default (a daily window comes round once in that time)."""
        stage = self.stages[stage_index]
        if stage.deadline_seconds is not None:
            return stage.deadline_seconds
        wait = WINDOW_WAIT_S if window_wait else 0.0
        return stage.bake_seconds + DEADLINE_SILENCES * self.silent_after_s + wait


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_NAMED = re.compile(r"(?:unknown|missing required) field `(?P<name>[^`]+)`")


def _field_of(exc: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec says "Expected `int`, got `str` - at `$.stages[0].percent`": split it."""
    m = _AT.match(str(exc))
    assert m is not None
    message, path = m.group("msg"), (m.group("path") or "").lstrip(".")
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return path or "spec", message


def parse_spec(data: Any) -> RolloutSpec:
    """Validate a decoded JSON rollout spec; raise SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError("spec", "a rollout spec is a JSON object")
    try:
        spec = msgspec.convert(data, RolloutSpec, strict=True)
    except msgspec.ValidationError as exc:
        name, message = _field_of(exc)
        raise SpecError(name, message) from None
    return validate_spec(spec)


def validate_spec(spec: RolloutSpec) -> RolloutSpec:
    if not spec.name.strip():
        raise SpecError("name", "must not be empty")
    if spec.bundle_id < 1:
        raise SpecError("bundle_id", f"{spec.bundle_id} is not a bundle id")
    if not spec.stages:
        raise SpecError("stages", "at least one stage is needed")
    if len(spec.stages) > MAX_STAGES:
        raise SpecError("stages", f"{len(spec.stages)} stages, at most {MAX_STAGES}")
    seen: set[str] = set()
    for i, stage in enumerate(spec.stages):
        where = f"stages[{i}]"
        if not stage.name.strip():
            raise SpecError(f"{where}.name", "must not be empty")
        if stage.name in seen:
            raise SpecError(f"{where}.name", f"stage name {stage.name!r} is used twice")
        seen.add(stage.name)
        if stage.percent is not None and not 0 < stage.percent <= 100:
            raise SpecError(f"{where}.percent", f"{stage.percent} must be in (0, 100]")
        if stage.bake_seconds < 0:
            raise SpecError(f"{where}.bake_seconds", f"{stage.bake_seconds} must be >= 0")
        if stage.min_devices < 0:
            raise SpecError(f"{where}.min_devices", f"{stage.min_devices} must be >= 0")
        if stage.mode not in STAGE_MODES:
            raise SpecError(f"{where}.mode", f"{stage.mode!r} must be 'switch' or 'shadow'")
        if stage.mode == "shadow":
            if i > 0 and spec.stages[i - 1].mode != "shadow":
                raise SpecError(
                    f"{where}.mode",
                    "a shadow stage must come before every switch stage (devices that switched "
                    "cannot shadow)",
                )
            if i == len(spec.stages) - 1:
                raise SpecError(f"{where}.mode", "the last stage must be a switch stage (after the shadow)")
            if not spec.gates_of(i).has_shadow_gate():
                raise SpecError(
                    f"{where}.gates" if stage.gates is not None else "gates",
                    f"stage {stage.name!r} runs in shadow: set min_agreement, max_abs_error or "
                    "min_cosine (a shadow stage without a shadow gate proves nothing)",
                )
        deadline = stage.deadline_seconds
        if deadline is not None and (deadline <= 0 or deadline < stage.bake_seconds):
            raise SpecError(
                f"{where}.deadline_seconds",
                f"{deadline:g} must be > 0 and at least the stage's bake_seconds ({stage.bake_seconds:g})",
            )
        for name in ("shadow_sample_rate", "shadow_max_busy_fraction"):
            value = getattr(stage, name)
            if not 0 < value <= 1:
                raise SpecError(f"{where}.{name}", f"{value} must be in (0, 1]")
        if stage.gates is not None:
            validate_gates(stage.gates, f"{where}.gates")
    validate_gates(spec.gates, "gates")
    if spec.on_gate_failure not in ("rollback", "pause"):
        raise SpecError("on_gate_failure", f"{spec.on_gate_failure!r} must be 'rollback' or 'pause'")
    if spec.on_inconclusive not in ON_INCONCLUSIVE:
        raise SpecError("on_inconclusive", f"{spec.on_inconclusive!r} must be 'pause', 'extend' or 'fail'")
    if spec.silent_after_s <= 0:
        raise SpecError("silent_after_s", f"{spec.silent_after_s} must be > 0")
    if spec.extend_seconds <= 0:
        raise SpecError("extend_seconds", f"{spec.extend_seconds} must be > 0")
    if spec.max_extensions < 0:
        raise SpecError("max_extensions", f"{spec.max_extensions} must be >= 0")
    if spec.activation_window is not None:
        m = _WINDOW.match(spec.activation_window)
        if m is None or m.group(1, 2) == m.group(3, 4):
            raise SpecError(
                "activation_window",
                f"{spec.activation_window!r} must be a non-empty HH:MM-HH:MM window in the devices' "
                'local time, e.g. "02:00-05:00" (it may wrap midnight: "22:00-04:00")',
            )
    return spec


def check_silence_floor(spec: RolloutSpec, *, session_expiry_s: float, health_interval_s: float) -> None:
    """With shared subscriptions the broker keeps handing a dead ingester's session its share of
    the devices' telemetry until the session expires; a device then goes unheard for up to the
    expiry plus one health interval. A ``silent_after_s`` shorter than that counts healthy
    devices silent (and rolls a release back) when an ingester dies: SpecError."""
    floor = session_expiry_s + health_interval_s
    if spec.silent_after_s < floor:
        raise SpecError(
            "silent_after_s",
            f"{spec.silent_after_s:g} s is shorter than the ingesters' session expiry "
            f"({session_expiry_s:g} s, mqtt_session_expiry_s) plus the devices' health interval "
            f"({health_interval_s:g} s, device_health_interval_s): devices would count as silent "
            f"whenever an ingester dies; set at least {floor:g}",
        )


def spec_to_json(spec: RolloutSpec) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(spec)  # a Struct's builtins are a dict
    return out


# -- lifecycle -----------------------------------------------------------------------


class RolloutState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


ACTIVE_STATES = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})
# Where a rollout has stopped for good (only an operator's rollback moves a succeeded one on)
FINISHED_STATES = frozenset({RolloutState.SUCCEEDED, RolloutState.ROLLED_BACK, RolloutState.ABORTED})

Operation = Literal["start", "pause", "resume", "abort", "rollback", "succeed", "gate_pause", "approve"]

TRANSITIONS: dict[tuple[RolloutState, str], RolloutState] = {
    (RolloutState.CREATED, "start"): RolloutState.RUNNING,
    (RolloutState.RUNNING, "pause"): RolloutState.PAUSED,
    (RolloutState.RUNNING, "gate_pause"): RolloutState.PAUSED,
    (RolloutState.RUNNING, "approve"): RolloutState.RUNNING,
    (RolloutState.PAUSED, "resume"): RolloutState.RUNNING,
    (RolloutState.RUNNING, "succeed"): RolloutState.SUCCEEDED,
    (RolloutState.RUNNING, "rollback"): RolloutState.ROLLED_BACK,
    (RolloutState.PAUSED, "rollback"): RolloutState.ROLLED_BACK,
    (RolloutState.SUCCEEDED, "rollback"): RolloutState.ROLLED_BACK,
    (RolloutState.CREATED, "abort"): RolloutState.ABORTED,
    (RolloutState.RUNNING, "abort"): RolloutState.ABORTED,
    (RolloutState.PAUSED, "abort"): RolloutState.ABORTED,
}


def transition(state: str, op: str) -> RolloutState:
    """The state after ``op``; TransitionError when ``state`` does not allow it."""
    try:
        return TRANSITIONS[(RolloutState(state), op)]
    except (KeyError, ValueError):
        allowed = sorted({s.value for (s, o) in TRANSITIONS if o == op})
        raise TransitionError(
            f"cannot {op} a rollout that is {state}; {op} applies to: {', '.join(allowed)}",
            state=state,
        ) from None


def state_diagram() -> str:
    """The transition table as a Mermaid state diagram (docs/architecture.md shows it; a test
    keeps the two equal). Operations between the same two states share one arrow."""
    ops: dict[tuple[RolloutState, RolloutState], list[str]] = {}
    for (before, op), after in TRANSITIONS.items():
        ops.setdefault((before, after), []).append(op)
    lines = ["stateDiagram-v2", f"    [*] --> {RolloutState.CREATED.value}"]
    lines += [f"    {a.value} --> {b.value}: {', '.join(o)}" for (a, b), o in ops.items()]
    ends = [s for s in RolloutState if not any(b is s for (b, _op) in TRANSITIONS)]
    lines += [f"    {s.value} --> [*]" for s in ends]
    return "\n".join(lines) + "\n"


# -- stage assignment --------------------------------------------------------------


def device_hash(rollout_id: int, device_id: str) -> float:
    """Map (rollout, device) to [0, 1), uniformly and deterministically."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def matches(selector: Mapping[str, str] | None, labels: Mapping[str, Any]) -> bool:
    return not selector or all(labels.get(k) == v for k, v in selector.items())


def assign_stages(
    rollout_id: int, spec: RolloutSpec, devices: Iterable[tuple[str, Mapping[str, Any]]]
) -> dict[str, int]:
    """device_id -> index of the first stage that holds it; devices of no stage are left out."""
    out: dict[str, int] = {}
    for device_id, labels in devices:
        if not matches(spec.selector, labels):
            continue
        h = device_hash(rollout_id, device_id)
        for index, stage in enumerate(spec.stages):
            percent = 100.0 if stage.percent is None else stage.percent
            if matches(stage.selector, labels) and h < percent / 100.0:
                out[device_id] = index
                break
    return out


# -- stage decisions ---------------------------------------------------------------


class Verdict(StrEnum):
    WAIT = "wait"  # not decided yet; the message says what for
    ADVANCE = "advance"  # the stage passed: go to the next one
    COMPLETE = "complete"  # the last stage passed
    FAIL = "fail"  # a gate failed (or the stage was inconclusive with on_inconclusive=fail)
    AWAIT_APPROVAL = "await_approval"  # passed; the operator has to approve
    EXTEND = "extend"  # inconclusive: extend the bake time once more
    INCONCLUSIVE = "inconclusive"  # inconclusive: pause


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    message: str
    gate: str | None = None
    gates: tuple[GateResult, ...] = ()
    figures: dict[str, Any] = field(default_factory=dict)
    devices: tuple[DeviceProgress, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "message": self.message,
            "gate": self.gate,
            "figures": self.figures,
            "gates": [g.to_json() for g in self.gates],
        }


def _count_by(progress: Iterable[DeviceProgress]) -> str:
    counts: dict[str, int] = {}
    for p in progress:
        key = p.progress.value + (f" ({p.reason})" if p.reason and p.progress is not Progress.SILENT else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def evaluate_stage(
    spec: RolloutSpec,
    stage_index: int,
    target_release: int,
    devices: Sequence[DeviceState],
    health: Sequence[HealthWindow],
    events: Sequence[InstallEvent],
    *,
    now: float,
    stage_started_at: float,
    baseline: Sequence[HealthWindow] = (),
    extensions: int = 0,
    approved: bool = False,
    shadow: Sequence[ShadowFigures] = (),
) -> Decision:
    """Decide what the rollout does next at ``stage_index``.

    ``devices`` are the rollout's devices (any stage; those past the current one are
    ignored); ``health`` the target-release windows reported since the stage started;
    ``baseline`` previous-release windows from before each device was told to update;
    ``events`` the update events of the rollout's devices since it started, in the order
    received; ``extensions`` how often the stage's bake time was extended already;
    ``approved`` whether the operator approved the stage; ``shadow`` the latest shadow
    report of each device with the target as candidate, since the stage started (shadow
    stages). Times are UNIX seconds.
    """
    stage = spec.stages[stage_index]
    label = f"stage {stage.name}"
    gates = spec.gates_of(stage_index)
    members = [d for d in devices if d.stage <= stage_index]
    by_device: dict[str, list[InstallEvent]] = {}
    for e in events:
        by_device.setdefault(e.device_id, []).append(e)
    shadowing = stage.mode == "shadow"
    if shadowing:
        latest = {f.device_id: f for f in shadow if f.release == target_release}
        progress = {
            d.device_id: shadow_progress(
                d, target_release, by_device.get(d.device_id, ()), latest.get(d.device_id),
                now=now, silent_after_s=spec.silent_after_s,
            )
            for d in members
        }
    else:
        progress = {
            d.device_id: device_progress(
                d, target_release, by_device.get(d.device_id, ()), now=now, silent_after_s=spec.silent_after_s
            )
            for d in members
        }
    evidence = device_evidence(members, health, target_release, now=now, since=stage_started_at,
                               max_device_rate=gates.max_device_rate)
    inp = GateInput(gates, target_release, members, progress, health, baseline, events,
                    mode=stage.mode, shadow=shadow, evidence=evidence)
    results = evaluate_gates(inp)
    snapshot = tuple(progress.values())

    def decide(verdict: Verdict, message: str, *, gate: str | None = None, figures: Any = None) -> Decision:
        return Decision(
            verdict,
            f"{label}: {message}",
            gate=gate,
            gates=results,
            figures=figures if figures is not None else base,
            devices=snapshot,
        )

    for r in results:
        if r.status is GateStatus.FAIL:
            return decide(Verdict.FAIL, r.message, gate=r.gate, figures=r.figures)

    done = Progress.SHADOW if shadowing else Progress.COMMITTED
    committed = [p for p in snapshot if p.progress is done]
    # A device that failed, rolled back or went silent no longer holds the stage up when a
    # gate that counts it is on (and held, or we would have failed above).
    excused_kinds = {
        Progress.FAILED: gates.max_install_failures is not None,
        Progress.ROLLED_BACK: gates.max_local_rollbacks is not None,
        Progress.SILENT: gates.max_silent_devices is not None,
    }
    excused = [p for p in snapshot if p.progress in SETTLED_BAD and excused_kinds[p.progress]]
    bake = stage.bake_seconds + extensions * spec.extend_seconds
    baked = max(0.0, now - stage_started_at)
    base = {
        "devices": len(members),
        "committed": len(committed),
        "on_target": len(committed),
        "excused": len(excused),
        "bake_elapsed_s": round(baked, 1),
        "bake_seconds": bake,
        "extensions": extensions,
        "min_devices": stage.min_devices,
    }

    if len(members) < stage.min_devices:
        return decide(Verdict.WAIT, f"{len(members)} of at least {stage.min_devices} devices")
    if len(committed) + len(excused) < len(members):
        others = [p for p in snapshot if p.progress is not done]
        what = "in shadow" if shadowing else "committed"
        return decide(
            Verdict.WAIT,
            f"{len(committed)} of {len(members)} devices report r{target_release} {what} "
            f"({_count_by(others)})",
        )
    if baked < bake:
        extended = f" (extended {extensions}x by {spec.extend_seconds:g} s)" if extensions else ""
        return decide(Verdict.WAIT, f"bake {baked:.0f} s of {bake:g} s{extended}")
    short = [r for r in results if r.status is GateStatus.WAIT]
    if short:
        why = "inconclusive: " + "; ".join(r.short_of_sample for r in short)
        figures = {**base, "short": [r.to_json() for r in short]}
        if spec.on_inconclusive == "fail":
            return decide(Verdict.FAIL, f"{why} after {baked:.0f} s", gate=short[0].gate, figures=figures)
        if spec.on_inconclusive == "extend" and extensions < spec.max_extensions:
            return decide(
                Verdict.EXTEND,
                f"{why}; bake time extended by {spec.extend_seconds:g} s "
                f"({extensions + 1} of {spec.max_extensions})",
                figures=figures,
            )
        if spec.on_inconclusive == "extend":
            why += f" after {spec.max_extensions} extensions"
        return decide(Verdict.INCONCLUSIVE, why, gate=short[0].gate, figures=figures)
    passed = "; ".join(r.message for r in results) or "no gates"
    if excused:
        passed += f"; not updated: {_count_by(excused)}"
    if stage.approval and not approved:
        return decide(Verdict.AWAIT_APPROVAL, f"passed ({passed}); waiting for approval")
    if stage_index == len(spec.stages) - 1:
        return decide(Verdict.COMPLETE, f"passed ({passed}); rollout complete")
    if shadowing and spec.stages[stage_index + 1].mode != "shadow":
        return decide(Verdict.ADVANCE, f"passed in shadow ({passed}); devices switch to r{target_release}")
    return decide(Verdict.ADVANCE, f"passed ({passed})")

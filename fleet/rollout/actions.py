"""What a stage's verdict does to its rollout, as a list of actions: pure, data in, actions out.

The engine (``evaluate_stage``, then ``stalls.judge_stall``) decides; ``plan`` turns the
decision into actions; the controller applies them one by one and does nothing else. A
state change is only ever a ``Transition`` naming an operation of ``engine.TRANSITIONS``,
so no verdict can move a rollout where the table does not allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet.rollout.engine import Decision, RolloutSpec, Verdict


@dataclass(frozen=True)
class Record:
    """Append an event to the rollout's history."""

    kind: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Note:
    """The rollout's latest evaluation (what it waits for, or why it stopped); None clears it."""

    message: str | None


@dataclass(frozen=True)
class Transition:
    """Move the rollout by an operation of the transition table, with the reason it shows."""

    op: str
    reason: str | None


@dataclass(frozen=True)
class WaitForApproval:
    """The stage passed and waits for the operator: mark since when (once)."""


@dataclass(frozen=True)
class StopWaitingForApproval:
    """The stage no longer waits for the operator."""


@dataclass(frozen=True)
class Extend:
    """The stage's bake time grows by the spec's ``extend_seconds``."""


@dataclass(frozen=True)
class EndShadow:
    """Devices running the target in shadow stop (the rollout stops moving)."""


@dataclass(frozen=True)
class EnterStage:
    """Go to stage ``index``: its clock starts now, its pending devices are assigned."""

    index: int


@dataclass(frozen=True)
class RollBack:
    """Point every switched device back at its previous release (re-issued as a higher one)."""

    reason: str
    stage: str


Action = (
    Record | Note | Transition | WaitForApproval | StopWaitingForApproval | Extend | EndShadow | EnterStage
    | RollBack
)


def plan(
    spec: RolloutSpec,
    stage_index: int,
    decision: Decision,
    *,
    now: datetime,
    last_evaluation: str | None,
    awaiting_approval: bool,
    members: int,
    target: str,
) -> list[Action]:
    """The actions that apply ``decision`` to a running rollout at ``stage_index``.

    ``last_evaluation`` is the rollout's stored one (a wait is recorded when it changes);
    ``awaiting_approval`` whether the stage already waits for the operator; ``members`` how
    many devices the rollout holds and ``target`` the release as text ("detector r3 (1.2)"),
    for the success message.
    """
    verdict, message = decision.verdict, decision.message
    details = decision.to_json()
    actions: list[Action] = []
    if verdict is not Verdict.AWAIT_APPROVAL:
        actions.append(StopWaitingForApproval())
    if verdict is Verdict.WAIT:
        if message != last_evaluation:
            actions += [Record("evaluation", message, details), Note(message)]
    elif verdict is Verdict.AWAIT_APPROVAL:
        if not awaiting_approval:
            actions += [WaitForApproval(), Record("awaiting_approval", message, details)]
        actions.append(Note(message))
    elif verdict is Verdict.EXTEND:
        actions += [Extend(), Note(message), Record("extended", message, details)]
    elif verdict is Verdict.INCONCLUSIVE:
        actions += [
            Transition("gate_pause", message),
            EndShadow(),
            Note(message),
            Record("inconclusive", message, details),
            Record("paused", f"paused: {message}"),
        ]
    elif verdict is Verdict.ADVANCE:
        actions += [Record("stage_passed", message, details), EnterStage(stage_index + 1)]
    elif verdict is Verdict.COMPLETE:
        actions += [
            Record("stage_passed", message, details),
            Transition("succeed", None),
            Note(message),
            Record("succeeded", f"succeeded: {members} devices run {target}"),
        ]
    else:  # FAIL
        reason = f"{message} at {now.astimezone(UTC):%H:%M:%S} UTC (gate {decision.gate})"
        actions += [Record("gate_failed", message, details), Note(message)]
        if spec.on_gate_failure == "pause":
            actions += [Transition("gate_pause", reason), EndShadow(), Record("paused", f"paused: {reason}")]
        else:
            actions.append(RollBack(reason, spec.stages[stage_index].name))
    return actions

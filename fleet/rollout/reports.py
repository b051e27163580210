"""What the gates are given: plain records of what the fleet heard from each device of a
rollout (its state, health windows, shadow figures, update events), read from the database by
``fleet.rollout.inputs``, and ``GateInput``, everything the gates of one stage look at."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleet.rollout.gate_spec import Gates

if TYPE_CHECKING:
    from fleet.rollout.evidence import DeviceEvidence
    from fleet.rollout.progress import DeviceProgress


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class InstallEvent:
    """An update event of a device, in the order received."""

    device_id: str
    release: int
    kind: str
    reason: str | None = None
    from_release: int | None = None


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

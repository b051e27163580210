"""The rollout endpoints' request and response bodies as types, so the OpenAPI document
describes them (and the status document is checked against them on the way out).

The request is checked twice on purpose: Litestar decodes it into ``RolloutCreate`` (the
document's schema; lax about "50" for 50), then ``engine.parse_spec`` decodes the same JSON
strictly and checks what types cannot (ranges, unique names, stage order), naming the field.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example

from fleet.api.schemas import ErrorBody
from fleet.rollout.engine import RolloutSpec, RolloutState


class RolloutCreate(RolloutSpec, forbid_unknown_fields=True, kw_only=True):
    """A rollout spec (docs/rollouts.md), and whether to re-sign the bundle as a new, higher
    release when some devices accepted a release above it."""

    reissue: bool = False


class StageStatus(msgspec.Struct):
    name: str
    index: int
    # pending, active, awaiting_approval, passed, paused, rolled_back, aborted
    state: str
    devices: list[str]  # the devices that joined at this stage (stages are cumulative), by id
    percent: float | None
    selector: dict[str, str] | None
    min_devices: int
    bake_seconds: float
    approval: bool
    mode: str
    committed: int
    gate_results: list[dict[str, Any]]  # the latest result of each gate (fleet.rollout.gates)
    device_count: int = 0  # all the devices that joined at this stage (``devices`` lists 1,000)


class MemberStatus(msgspec.Struct):
    device_id: str
    stage: int
    status: str  # pending, assigned, shadow, rolled_back, removed
    progress: str  # fleet.rollout.progress.Progress
    reason: str | None
    detail: str
    assigned_at: str | None
    online: bool | None
    last_seen: str | None
    previous_bundle_id: int | None
    shadow: dict[str, Any] | None


class RolloutEventRow(msgspec.Struct):
    ts: str | None
    kind: str
    message: str
    data: dict[str, Any]


class RolloutStatus(msgspec.Struct):
    """A rollout as GET /api/v1/rollouts/{id} shows it; the list leaves out events and
    gate_history."""

    id: int
    name: str
    model: str
    bundle_id: int
    release: int | None
    version: str | None
    reissue_of: int | None
    state: RolloutState
    current_stage: int
    current_stage_name: str
    stage_started_at: str | None
    reason: str | None
    last_evaluation: str | None
    awaiting_approval: bool
    awaiting_approval_since: str | None
    approved_stage: int | None
    extensions: int
    gates: list[dict[str, Any]]
    progress: dict[str, int]  # devices per progress
    stages: list[StageStatus]
    devices: list[MemberStatus]
    spec: dict[str, Any]  # the spec as created (RolloutCreate without reissue)
    created: str | None
    updated: str | None
    devices_total: int = 0  # all the members (``devices`` lists the first 1,000 by stage and id)
    events: list[RolloutEventRow] | msgspec.UnsetType = msgspec.UNSET
    gate_history: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET
    # POST /api/v1/rollouts only: what its shadow stages cannot catch (fleet.rollout.capacity)
    warnings: list[str] | msgspec.UnsetType = msgspec.UNSET


def as_status(document: dict[str, Any]) -> RolloutStatus:
    return msgspec.convert(document, RolloutStatus)


def _error(status: int, text: str, *examples: tuple[str, str, str | None]) -> dict[int, ResponseSpec]:
    return {
        status: ResponseSpec(
            data_container=ErrorBody,
            description=text,
            generate_examples=False,
            examples=[
                Example(summary=summary, value={"status_code": status, "detail": detail}
                        | ({"code": code} if code else {}))
                for summary, detail, code in examples
            ],
        )
    }


UNAUTHORIZED = _error(
    401, "No or no valid operator token",
    ("no token", "operator endpoint (scope deploy): send 'Authorization: Bearer <operator token>'; "
     "'edgefleet token create' makes one", None),
)
FORBIDDEN = _error(
    403, "A token without the scope, or a device credential",
    ("missing scope", "ci has scopes [read]; this endpoint needs 'deploy'. Use a token with it "
     "(an admin runs 'edgefleet token create --scope deploy')", None),
)
NOT_FOUND = _error(404, "No such rollout (or, at create, no such bundle)",
                   ("unknown rollout", "rollout 7 does not exist", "not_found"))
BAD_SPEC = _error(
    400, "The spec is malformed or cannot run; the detail names the field",
    ("out of range", "stages[0].percent: 0 must be in (0, 100]", "rollout_spec"),
    ("silence under the ingesters' session", "silent_after_s: 30 s is shorter than the ingesters' "
     "session expiry (60 s, mqtt_session_expiry_s) plus the devices' health interval (60 s, "
     "device_health_interval_s): devices would count as silent whenever an ingester dies; set at "
     "least 120", "rollout_spec"),
)
CREATE_CONFLICT = _error(
    409, "Devices are in another active rollout, or accepted a release above the bundle's",
    ("devices busy", "2 of the rollout's devices are already in another active rollout: rollout 3 "
     "holds edge-01, edge-02; finish, abort or roll back that rollout first", "conflict"),
)
STATE_CONFLICT = _error(
    409, "The rollout's state does not allow the operation (engine.TRANSITIONS)",
    ("state", "cannot pause a rollout that is succeeded; pause applies to: running", "rollout_state"),
)

READ_RESPONSES = {**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND}
LIST_RESPONSES = {**UNAUTHORIZED, **FORBIDDEN}
CREATE_RESPONSES = {**BAD_SPEC, **UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **CREATE_CONFLICT}
OPERATION_RESPONSES = {**UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND, **STATE_CONFLICT}

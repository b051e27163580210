"""The answers of the device, bundle, certificate and health routes as the OpenAPI document
names them (the rollouts' are in fleet.api.rollout_schemas). The routes build their bodies
as dicts; tests/fleet/test_openapi_rollouts.py validates real answers against these."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example

from fleet.api.schemas import BAD_REQUEST, ErrorBody


class AssignedRelease(msgspec.Struct):
    bundle_id: int
    release: int | None
    rollout_id: int | None
    activation_window: str | msgspec.UnsetType = msgspec.UNSET


class DeviceView(msgspec.Struct):
    """A device as the operator sees it; GET of one device adds its health per release and
    its refused telemetry."""

    device_id: str
    labels: dict[str, str]
    online: bool
    last_seen: str | None
    enrolled_at: str | None
    agent_version: str
    generation: int
    models: dict[str, Any]  # per model: the release it runs and its lifecycle state
    held: dict[str, list[int]]
    waiting: dict[str, str]
    assigned: dict[str, AssignedRelease]
    health: dict[str, Any] | None  # the last health report's fields
    status: str  # active, revoked, reenrollment_pending
    revoked_at: str | None
    reenroll_requested_at: str | None
    reenroll_approved_until: str | None
    rotation_requested_at: str | None
    health_by_release: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET
    telemetry_refused: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class DeviceDeleted(msgspec.Struct):
    device_id: str
    deleted: bool


class RotationRequested(msgspec.Struct):
    requested: int  # devices asked to rotate


class BundleView(msgspec.Struct):
    id: int
    name: str
    release: int
    version: str
    digest: str
    created: str
    expires: str | None
    uploaded_at: str | None
    reissue_of: int | None
    files: dict[str, str]  # role -> sha256


class HighestRelease(msgspec.Struct):
    name: str
    release: int  # 0 when the fleet holds none
    version: str | None
    bundle_id: int | None


class CertificateView(msgspec.Struct):
    serial: str
    fingerprint_sha256: str
    issued_at: str
    not_after: str
    revoked_at: str | None


class CertificatesRevoked(msgspec.Struct):
    device_id: str
    revoked: list[str]  # serials
    crl_file: str
    broker_reloaded: bool
    disconnected: bool


class ReleaseHealth(msgspec.Struct):
    model: str
    release: int
    reports: int
    inferences: int
    errors: int
    error_rate: float | None
    p95_ms_max: float | None
    first_hour: str | None
    last_hour: str | None
    devices: int | msgspec.UnsetType = msgspec.UNSET


class ChartPoint(msgspec.Struct):
    """One time bucket of a rollout's health chart (t: the bucket's start, UNIX seconds)."""

    t: float
    inferences: int
    errors: int
    error_rate: float | None
    p95_ms: float | None  # the worst device's p95 in the bucket
    reports: int
    devices: int


class ChartSeries(msgspec.Struct):
    release: int
    points: list[ChartPoint]


class ChartMarker(msgspec.Struct):
    t: float | None
    kind: str
    message: str | None


class RolloutHealthChart(msgspec.Struct):
    """GET /api/v1/rollouts/{id}/health: the dashboard's chart data."""

    bucket_s: int
    from_: float = msgspec.field(name="from")
    to: float
    buckets: list[ChartPoint]
    series: list[ChartSeries]
    rollout_id: int
    model: str
    release: int | None
    state: str
    devices: int
    markers: list[ChartMarker]


class Liveness(msgspec.Struct):
    status: str


class IngestStats(msgspec.Struct):
    ingest: dict[str, Any] | None  # this process's ingester counters; None when it runs none


def ok(model: Any, text: str) -> dict[int, ResponseSpec]:
    """The 200 answer, typed."""
    return {200: ResponseSpec(data_container=model, description=text, generate_examples=False)}


def _error(status: int, text: str, summary: str, detail: str,
           code: str | None = None) -> dict[int, ResponseSpec]:
    return {status: ResponseSpec(
        data_container=ErrorBody, description=text, generate_examples=False,
        examples=[Example(summary=summary, value={"status_code": status, "detail": detail}
                          | ({"code": code} if code else {}))])}


BAD_LABEL = _error(400, "A label that cannot be stored; the detail says which and why", "bad label",
                   r"label key 'Site!' must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z "
                   "(1-64 letters, digits, '.', '_', '-')")
UNAUTHORIZED = _error(401, "No or no valid operator token", "no token",
                      "operator endpoint (scope admin): send 'Authorization: Bearer <operator token>'; "
                      "'edgefleet token create' makes one")
FORBIDDEN = _error(403, "A token without the scope, or a device credential", "missing scope",
                   "ci has scopes [read]; this endpoint needs 'admin'. Use a token with it (an admin "
                   "runs 'edgefleet token create --scope admin')")
DEVICE_NOT_FOUND = _error(404, "No such device", "unknown device", "device 'edge-9' is not enrolled",
                          "not_found")
BUNDLE_NOT_FOUND = _error(404, "No such bundle", "unknown bundle", "bundle 7 does not exist", "not_found")
BUNDLE_CONFLICT = _error(409, "A bundle with the same model and release but other content is stored",
                         "release taken", "detector release 3 already exists as bundle 7 with digest "
                         "ad58f2d57a4a…; this upload has digest 4fd54593c3f9…. Release numbers are never "
                         "reused: build it with a higher release.", "conflict")

READ = {**UNAUTHORIZED, **FORBIDDEN}
DEVICE_READ = {**READ, **DEVICE_NOT_FOUND}
DEVICE_CHANGE = {**BAD_REQUEST, **READ, **DEVICE_NOT_FOUND}
BUNDLE_READ = {**READ, **BUNDLE_NOT_FOUND}

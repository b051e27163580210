"""Devices: enrollment, desired state (device side), inventory (operator side)."""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody
from sqlmodel import Session, col, select
from sqlmodel import delete as sql_delete

from fleet.api.auth import bearer, credential_hash, device_guard, operator_guard
from fleet.api.context import AppContext
from fleet.api.device_credentials import apply_credentials, cut_off, issue_credentials
from fleet.api.enrollment import (
    Admission,
    DeviceRevoked,
    EnrollmentTokenRefused,
    Proof,
    ReenrollmentNeedsProof,
    admit,
    check_device_secret,
    check_labels,
    check_new_device_id,
)
from fleet.api.enrollment_tokens import accept_enrollment_token
from fleet.api.response_schemas import DEVICE_READ, READ, DeviceDeleted, DeviceView, ok
from fleet.api.schemas import (
    BAD_REQUEST,
    DEVICE_RESPONSES,
    FORBIDDEN,
    TOO_MANY,
    UNAUTHORIZED,
)
from fleet.api.trust import newest_root_version
from fleet.db.device_models import read_models, stored_models
from fleet.db.engine import session_scope
from fleet.db.models import Assignment, Bundle, Device, DeviceClaim, Rollout, as_utc, now_utc
from fleet.errors import NotFoundError
from fleet.identity.store import revoke_with_device
from fleet.ingest import claims_store, rollup
from fleet.rollout.shadow import shadow_entries
from shared.contract.desired import DesiredEntry, DesiredState, stable_part
from shared.contract.enrollment import EnrollRequest, EnrollResponse
from shared.errors import MalformedDocumentError
from shared.timeutil import format_time, format_ts

log = logging.getLogger(__name__)

MAX_PAGE = 1000  # devices per page of GET /devices


def _base_url(request: Request[Any, Any, Any]) -> str:
    return str(request.base_url).rstrip("/")


def desired_etag(body: DesiredState) -> str:
    """A strong ETag over what the device acts on (everything but ``server_time``)."""
    return '"' + hashlib.sha256(stable_part(body)).hexdigest()[:32] + '"'


def etag_matches(header: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: ``*`` or a list of (weak or strong) tags, compared weakly."""
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _assignments_of(
    session: Session, device_ids: list[str], *, between: tuple[str, str] | None = None
) -> tuple[dict[str, list[Assignment]], dict[int, Bundle]]:
    """Assignments of many devices and their bundles in two queries (no query per device);
    ``between``: the first and last ids of a page in the database's order (every device between
    them is on the page)."""
    by_device: dict[str, list[Assignment]] = {d: [] for d in device_ids}
    if not device_ids:
        return by_device, {}
    query = select(Assignment)
    if between is not None:
        # a keyset page holds every device between its first and last id: a range on the
        # primary key's leading column is an index scan whatever the table's statistics say
        # (an IN of 100 ids was planned as a sequential scan of all assignments after a bulk
        # insert: 7.7 ms at 100,000 devices, against 0.04 ms)
        query = query.where(col(Assignment.device_id) >= between[0],
                            col(Assignment.device_id) <= between[1])
    else:
        query = query.where(col(Assignment.device_id).in_(device_ids))
    rows = [a for a in session.exec(query).all() if a.device_id in by_device]
    for a in rows:
        by_device.setdefault(a.device_id, []).append(a)
    bundle_ids = sorted({a.bundle_id for a in rows})
    bundles = (
        {b.id: b for b in session.exec(select(Bundle).where(col(Bundle.id).in_(bundle_ids)))}
        if bundle_ids
        else {}
    )
    return by_device, {i: b for i, b in bundles.items() if i is not None}


def device_json(
    session: Session,
    device: Device,
    silence_after_s: float,
    *,
    preloaded: tuple[dict[str, list[Assignment]], dict[int, Bundle]] | None = None,
) -> dict[str, Any]:
    by_device, bundles = preloaded or _assignments_of(session, [device.id])
    assignments = by_device.get(device.id, [])
    last_seen = as_utc(device.last_seen)
    silent = last_seen is None or datetime.now(UTC) - last_seen > timedelta(seconds=silence_after_s)
    models = read_models(device.models)
    return {
        "device_id": device.id,
        "labels": device.labels,
        "online": device.online and not silent,
        "last_seen": format_ts(last_seen) if last_seen else None,
        "enrolled_at": format_time(device.enrolled_at),
        "agent_version": device.agent_version,
        "generation": device.generation,
        "models": stored_models(models),
        # per model, the releases whose files the device keeps (a rollback to them downloads
        # nothing) and what a staged release waits for, as its last health report said
        "held": {m: e.held for m, e in sorted(models.items()) if e.held is not None},
        "waiting": {m: e.waiting for m, e in sorted(models.items()) if e.waiting},
        "assigned": {
            a.model: {
                "bundle_id": a.bundle_id,
                "release": bundles[a.bundle_id].release if a.bundle_id in bundles else None,
                "rollout_id": a.rollout_id,
            }
            for a in assignments
        },
        "health": device.last_health,
        **identity_json(device),
    }


def identity_json(device: Device) -> dict[str, Any]:
    """Where the device's identity stands: active, revoked, or a re-enrollment pending."""
    def ts(value: datetime | None) -> str | None:
        value = as_utc(value)
        return format_ts(value) if value else None

    revoked = device.revoked_at is not None
    pending = device.reenroll_requested_at is not None and not revoked
    return {
        "status": "revoked" if revoked else "reenrollment_pending" if pending else "active",
        "revoked_at": ts(device.revoked_at),
        "reenroll_requested_at": ts(device.reenroll_requested_at),
        "reenroll_approved_until": ts(device.reenroll_approved_until),
        "rotation_requested_at": ts(device.rotation_requested_at),
    }


def _activation_windows(session: Session, rollout_ids: list[int | None]) -> dict[tuple[int, int], str]:
    """(rollout id, its bundle id) -> the ``activation_window`` of each rollout's spec that sets
    one (docs/rollouts.md). Keyed by the rollout's own bundle: a rollback's re-issue, assigned
    under the same rollout, carries no window (devices take it at once)."""
    ids = sorted({r for r in rollout_ids if r is not None})
    if not ids:
        return {}
    out: dict[tuple[int, int], str] = {}
    for rollout in session.exec(select(Rollout).where(col(Rollout.id).in_(ids))):
        window = (rollout.spec or {}).get("activation_window")
        if isinstance(window, str) and window and rollout.id is not None:
            out[(rollout.id, rollout.bundle_id)] = window
    return out


def _get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled", device_id=device_id)
    return device


class DeviceController(Controller):
    path = "/api/v1/devices"
    tags = ["devices"]

    @post(
        "/enroll",
        sync_to_thread=True,
        status_code=201,
        summary="Enroll a new device, or re-enroll a known one with proof",
        description="Public, with an enrollment token in the body (rate limited per client IP). "
        "The token only creates new devices: re-enrolling a known id needs its current credential "
        "as `Authorization: Bearer` or an operator's approval (POST /api/v1/devices/{id}/approve); "
        "without either the attempt is recorded as pending and refused with 403.",
        security=[{}],  # public: no credential
        responses={**UNAUTHORIZED, **TOO_MANY, **BAD_REQUEST, **FORBIDDEN},
    )
    def enroll(self, data: JSONBody[EnrollRequest], state: State,
               request: Request[Any, Any, Any]) -> EnrollResponse:
        ctx: AppContext = state.ctx
        device_id = check_new_device_id(data.device_id)
        labels = check_labels(data.labels)
        secret = check_device_secret(data.device_secret)
        secret_hash = credential_hash(secret) if secret else None
        presented = bearer(request)
        now = now_utc()
        with session_scope(ctx.engine) as session:
            device = session.get(Device, device_id)
            try:
                admission, proof = admit(device, credential_hash(presented) if presented else None, now,
                                         secret_hash)
            except ReenrollmentNeedsProof as exc:
                assert device is not None
                device.reenroll_requested_at = now  # the operator sees it pending
                session.add(device)
                session.commit()
                log.warning("re-enrollment of %s refused: no proof", device_id)
                raise PermissionDeniedException(detail=exc.message) from None
            except DeviceRevoked as exc:
                raise PermissionDeniedException(detail=exc.message) from None
            token_id = None
            if proof not in (Proof.CREDENTIAL, Proof.SECRET):  # a proven device needs no token
                try:
                    token_id = accept_enrollment_token(session, ctx, data.token, now,
                                                       count_use=admission is Admission.NEW)
                except EnrollmentTokenRefused as exc:
                    raise NotAuthorizedException(detail=exc.message) from None
        issued = issue_credentials(ctx, device_id)
        with session_scope(ctx.engine) as session:
            device = session.get(Device, device_id)
            if device is None:
                device = Device(id=device_id, labels=labels, credential_hash="",
                                enrollment_token_id=token_id)
            elif labels:
                device.labels = labels
            if secret_hash and (proof is not Proof.SECRET):  # new, approved, or an agent's first
                device.device_secret_hash = secret_hash
            apply_credentials(device, issued, now=now,
                              previous_hash=credential_hash(presented) if proof is Proof.CREDENTIAL
                              and presented else None)
            if proof is Proof.APPROVAL:  # its old state, and so its certificates' keys, are not trusted
                revoke_with_device(session, ctx.settings, ctx.engine, device_id)
            session.add(device)
        if admission is Admission.REENROLL:
            log.info("device %s re-enrolled (proof: %s)", device_id, proof.value)
        return EnrollResponse(device_id=device_id, credential=issued.credential, mqtt_url=ctx.mqtt_url,
                              broker_password=issued.broker_password,
                              mqtt_protocol="3.1.1" if ctx.settings.mqtt_url is None else None)

    @post(
        "/{device_id:str}/credential",
        guards=[device_guard],
        sync_to_thread=True,
        status_code=201,
        summary="The device rotates its own credentials",
        description="With its current credential (or the previous one within the overlap). The "
        "answer carries a new credential and broker password; the credential presented stays "
        "valid for the overlap window. Devices call it when their desired state says "
        "`rotate_credential` (an operator asked for it).",
        responses=DEVICE_RESPONSES,
    )
    def rotate_own(self, device_id: FromPath[str], state: State,
                   request: Request[Any, Any, Any]) -> EnrollResponse:
        ctx: AppContext = state.ctx
        presented = bearer(request) or ""
        issued = issue_credentials(ctx, device_id)
        with session_scope(ctx.engine) as session:
            device = _get_device(session, device_id)
            apply_credentials(device, issued, now=now_utc(), previous_hash=credential_hash(presented))
            session.add(device)
        log.info("device %s rotated its credentials", device_id)
        return EnrollResponse(device_id=device_id, credential=issued.credential, mqtt_url=ctx.mqtt_url,
                              broker_password=issued.broker_password,
                              mqtt_protocol="3.1.1" if ctx.settings.mqtt_url is None else None)

    @get(
        "/{device_id:str}/desired",
        guards=[device_guard],
        responses={**DEVICE_RESPONSES,
                   200: ResponseSpec(DesiredState, description="The desired state (shared.contract.desired)"),
                   304: ResponseSpec(None, description="Unchanged since the ETag in If-None-Match")},
        sync_to_thread=True,
        summary="The releases this device should run",
        description="Answers with an ETag; a request whose If-None-Match holds it gets 304 Not Modified "
        "without a body (the device keeps what it has).",
    )
    def desired(
        self, device_id: FromPath[str], state: State, request: Request[Any, Any, Any]
    ) -> Response[Any]:
        ctx: AppContext = state.ctx
        base = _base_url(request)
        with Session(ctx.engine) as session:
            device = _get_device(session, device_id)
            rows = session.exec(
                select(Assignment, Bundle)
                .join(Bundle, col(Bundle.id) == col(Assignment.bundle_id))
                .where(Assignment.device_id == device_id)
                .order_by(col(Assignment.model))
            ).all()
            windows = _activation_windows(session, [a.rollout_id for a, _b in rows])
            shadows = shadow_entries(session, device_id, base)  # candidates of shadow stages
            body = DesiredState(
                device_id=device.id,
                generation=device.generation,
                server_time=time.time(),
                models=[
                    DesiredEntry(
                        name=b.name,
                        release=b.release,
                        digest=b.digest,
                        bundle_id=a.bundle_id,
                        envelope_url=f"{base}/api/v1/bundles/{a.bundle_id}/envelope",
                        blob_url=f"{base}/api/v1/blobs/{{sha256}}",
                        activation_window=windows.get((a.rollout_id, a.bundle_id))
                        if a.rollout_id is not None else None,
                        shadow=shadows.get(b.name),
                    )
                    for a, b in rows
                ],
            )
            # An operator asked the device to fetch new credentials (POST .../credential); or
            # the device still presents its previous credential (the answer of a rotation or
            # re-enrollment was lost on the way, and with it the new broker password): it asks
            # again within the overlap instead of going dark when the overlap ends.
            presented = bearer(request)
            if device.rotation_requested_at is not None or (
                presented and device.previous_credential_hash == credential_hash(presented)
            ):
                body.rotate_credential = True
        # The newest trust root the fleet serves (GET /api/v1/trust/roots): a device behind it
        # walks its root forward before installing what the new root signs. Absent without a
        # chain; agents that predate it ignore the field.
        root_version = newest_root_version(ctx.settings.keys_dir)
        if root_version is not None:
            body.root_version = root_version
        etag = desired_etag(body)
        headers = {"ETag": etag}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(content=b"", status_code=304, headers=headers)
        return Response(content=body, headers=headers, media_type="application/json")

    @get(
        "/",
        guards=[operator_guard],
        sync_to_thread=True,
        summary="Devices by id; all of them, or a page with `limit` (and `after`, the last id seen)",
        description="With `limit`, a full page carries `Link: <...?after=LAST&limit=N>; rel=\"next\"`.",
        responses={**ok(list[DeviceView], "The devices in id order (a page of them with `limit`)"),
                   **BAD_REQUEST, **READ},
    )
    def list_devices(
        self, state: State, limit: FromQuery[int | None] = None, after: FromQuery[str | None] = None
    ) -> Response[list[dict[str, Any]]]:
        ctx: AppContext = state.ctx
        if limit is not None and not 1 <= limit <= MAX_PAGE:
            raise MalformedDocumentError(f"limit {limit} must be between 1 and {MAX_PAGE}")
        query = select(Device).order_by(col(Device.id))
        if after is not None:
            query = query.where(col(Device.id) > after)
        if limit is not None:
            query = query.limit(limit)
        with Session(ctx.engine) as session:
            devices = session.exec(query).all()
            preloaded = _assignments_of(session, [d.id for d in devices],
                                        between=(devices[0].id, devices[-1].id) if devices else None)
            silence = ctx.settings.silence_after_s
            body = [device_json(session, d, silence, preloaded=preloaded) for d in devices]
        headers: dict[str, str] = {}
        if limit is not None and len(devices) == limit:
            headers["Link"] = f'</api/v1/devices?after={quote(devices[-1].id)}&limit={limit}>; rel="next"'
        return Response(body, headers=headers)

    @get(
        "/{device_id:str}",
        guards=[operator_guard],
        sync_to_thread=True,
        summary="One device, with its health per release (hourly rollups)",
        responses={**ok(DeviceView, "The device, with health_by_release and telemetry_refused"),
                   **DEVICE_READ},
    )
    def get_device(self, device_id: FromPath[str], state: State) -> dict[str, Any]:
        ctx: AppContext = state.ctx
        with Session(ctx.engine) as session:
            body = device_json(session, _get_device(session, device_id), ctx.settings.silence_after_s)
            body["health_by_release"] = rollup.per_device(session, device_id)
            # its telemetry refused by the ingesters, by cause (docs/telemetry.md "Bounds")
            body["telemetry_refused"] = claims_store.claims_json(session, device_id)
            return body

    @delete("/{device_id:str}", guards=[operator_guard], opt={"scope": "admin"}, sync_to_thread=True,
            status_code=200, summary="Delete a device (cut off as by a revoke); it may enroll anew",
            responses={**ok(DeviceDeleted, "The device is gone"), **DEVICE_READ})
    def delete_device(self, device_id: FromPath[str], state: State) -> dict[str, Any]:
        ctx: AppContext = state.ctx
        with session_scope(ctx.engine) as session:
            device = _get_device(session, device_id)
            cut_off(ctx, device)
            session.exec(sql_delete(Assignment).where(col(Assignment.device_id) == device_id))
            session.exec(sql_delete(DeviceClaim).where(col(DeviceClaim.device_id) == device_id))
            session.delete(device)
        log.warning("device %s deleted", device_id)
        return {"device_id": device_id, "deleted": True}

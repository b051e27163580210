"""Guards: operator tokens with scopes, device credentials, and what a device may read.

Operators send ``Authorization: Bearer <token>``: the bootstrap admin token of the
settings (every scope) or a token made with ``POST /api/v1/tokens`` (stored hashed,
scopes ``read``, ``deploy``, ``admin``; admin implies the other two). A route names the
scope it needs in ``opt={"scope": ...}``; without one, GET/HEAD need ``read`` and every
other method ``deploy``.

Devices send their own credential and only ever read their own desired state and the
envelopes and blobs of bundles assigned to them.

401 when no usable credential is presented; 403 when a valid credential asks for what it
may not. Each refusal says what to do.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import anyio
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet.api.context import AppContext
from fleet.db.models import ApiToken, Assignment, Bundle, Device, now_utc
from fleet.metrics import record_denied
from fleet.rollout.shadow import shadow_bundles
from shared.randomtoken import random_token

# any connection a guard sees (HTTP or websocket, whatever its handler, user, auth and state)
Connection = ASGIConnection[Any, Any, Any, Any]

SCOPES = ("read", "deploy", "admin")
TOKEN_PREFIX = "eft_"


def new_credential() -> str:
    return random_token(32)


def new_operator_token() -> str:
    return TOKEN_PREFIX + random_token(32)


def credential_hash(credential: str) -> str:
    # Credentials are 256-bit random strings: a plain SHA-256 is enough, no KDF needed.
    return hashlib.sha256(credential.encode()).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def parse_scopes(scopes: list[str] | str) -> tuple[str, ...]:
    """Validated, ordered, de-duplicated scopes; ValueError names the bad one."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    wanted = {s.strip() for s in items if s.strip()}
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not wanted:
        raise ValueError(f"give at least one scope of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in wanted)


@dataclass(frozen=True)
class Operator:
    name: str
    scopes: frozenset[str]
    token_id: int | None = None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def bearer(connection: Connection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def ctx_of(connection: Connection) -> AppContext:
    ctx: AppContext = connection.app.state.ctx
    return ctx


def _device_for(ctx: AppContext, token: str) -> str | None:
    """The (not revoked) device whose current credential this is, or whose previous one
    within the rotation overlap."""
    from fleet.api.enrollment import credential_matches

    hashed = credential_hash(token)
    with Session(ctx.engine) as session:
        for column in (Device.credential_hash, Device.previous_credential_hash):
            device = session.exec(select(Device).where(column == hashed)).first()
            if device is not None and credential_matches(device, hashed, now_utc()):
                return device.id
    return None


async def device_by_token(ctx: AppContext, token: str) -> str | None:
    return await anyio.to_thread.run_sync(_device_for, ctx, token)


def is_operator(ctx: AppContext, token: str) -> bool:
    """The bootstrap admin token of the settings."""
    admin = ctx.settings.admin_token
    return bool(admin) and constant_time_equal(token, admin or "")


def _token_operator(ctx: AppContext, token: str) -> Operator | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    with Session(ctx.engine) as session:
        row = session.exec(
            select(ApiToken).where(
                ApiToken.token_hash == credential_hash(token), col(ApiToken.revoked_at).is_(None)
            )
        ).first()
        if row is None:
            return None
        name = f"token {row.id} ({row.name})" if row.name else f"token {row.id}"
        return Operator(name=name, scopes=frozenset(row.scopes.split(",")), token_id=row.id)


async def operator_by_token(ctx: AppContext, token: str) -> Operator | None:
    if is_operator(ctx, token):
        return Operator(name="admin (bootstrap token)", scopes=frozenset(SCOPES))
    return await anyio.to_thread.run_sync(_token_operator, ctx, token)


def required_scope(connection: Connection, handler: BaseRouteHandler) -> str:
    scope = handler.opt.get("scope")
    if scope:
        return str(scope)
    return "read" if connection.scope.get("method") in ("GET", "HEAD") else "deploy"


def _unauthorized(detail: str, reason: str) -> NotAuthorizedException:
    record_denied(401, reason)
    return NotAuthorizedException(detail=detail)


def _forbidden(detail: str, reason: str) -> PermissionDeniedException:
    record_denied(403, reason)
    return PermissionDeniedException(detail=detail)


async def authenticate_operator(
    connection: Connection, scope: str
) -> Operator:
    ctx = ctx_of(connection)
    token = bearer(connection)
    if token is None:
        raise _unauthorized(
            f"operator endpoint (scope {scope}): send 'Authorization: Bearer <operator token>'; "
            "'edgefleet token create' makes one",
            "no_token",
        )
    operator = await operator_by_token(ctx, token)
    if operator is None:
        if await device_by_token(ctx, token) is not None:
            raise _forbidden(
                "a device credential cannot call operator endpoints; use an operator token",
                "device_on_operator",
            )
        raise _unauthorized(
            "the operator token is not valid (unknown or revoked); ask an admin for a new one "
            "('edgefleet token create')",
            "bad_token",
        )
    if not operator.allows(scope):
        have = ", ".join(sorted(operator.scopes)) or "none"
        raise _forbidden(
            f"{operator.name} has scopes [{have}]; this endpoint needs '{scope}'. "
            f"Use a token with it (an admin runs 'edgefleet token create --scope {scope}')",
            "scope",
        )
    return operator


async def operator_guard(connection: Connection, handler: BaseRouteHandler) -> None:
    await authenticate_operator(connection, required_scope(connection, handler))


async def device_guard(connection: Connection, _: BaseRouteHandler) -> None:
    """The device named in the path, with its own credential."""
    ctx = ctx_of(connection)
    token = bearer(connection)
    if token is None:
        raise _unauthorized("device endpoint: send 'Authorization: Bearer <device credential>'", "no_token")
    device_id = await device_by_token(ctx, token)
    if device_id is None:
        if await operator_by_token(ctx, token) is not None:
            raise _forbidden(
                "this endpoint answers the device itself only; operators read GET /api/v1/devices/{id}",
                "operator_on_device",
            )
        raise _unauthorized("the device credential is not valid; enroll the device again", "bad_credential")
    wanted = connection.path_params.get("device_id")
    if wanted is not None and wanted != device_id:
        raise _forbidden(f"credential of {device_id} cannot access device {wanted}", "other_device")


def device_may_read_bundle(ctx: AppContext, device_id: str, bundle_id: int) -> bool:
    with Session(ctx.engine) as session:
        stmt = select(func.count()).select_from(Assignment).where(
            Assignment.device_id == device_id, Assignment.bundle_id == bundle_id
        )
        if session.exec(stmt).one():
            return True
        # a candidate the device runs in shadow (fleet.rollout.shadow)
        return any(b.id == bundle_id for b in shadow_bundles(session, device_id))


def device_may_read_blob(ctx: AppContext, device_id: str, sha256: str) -> bool:
    with Session(ctx.engine) as session:
        files = session.exec(
            select(Bundle.files)
            .join(Assignment, col(Assignment.bundle_id) == col(Bundle.id))
            .where(Assignment.device_id == device_id)
        ).all()
        files = [*files, *(b.files for b in shadow_bundles(session, device_id))]
    return any(sha256 in (f or {}).values() for f in files)


async def bundle_reader_guard(connection: Connection, handler: BaseRouteHandler) -> None:
    """Operators with ``read``; devices only for bundles (and their blobs) assigned to them."""
    ctx = ctx_of(connection)
    token = bearer(connection)
    if token is None:
        raise _unauthorized(
            "send 'Authorization: Bearer <device credential or operator token>'", "no_token"
        )
    device_id = await device_by_token(ctx, token)
    if device_id is None:
        await authenticate_operator(connection, "read")
        return
    params = connection.path_params
    if "bundle_id" in params:
        bundle_id = int(params["bundle_id"])
        if not await anyio.to_thread.run_sync(device_may_read_bundle, ctx, device_id, bundle_id):
            raise _forbidden(
                f"bundle {bundle_id} is not assigned to device {device_id}; fetch "
                f"/api/v1/devices/{device_id}/desired for what it should run",
                "not_assigned",
            )
    elif "sha256" in params:
        sha256 = str(params["sha256"])
        if not await anyio.to_thread.run_sync(device_may_read_blob, ctx, device_id, sha256):
            raise _forbidden(
                f"blob {sha256[:80]} belongs to no bundle assigned to device {device_id}; fetch "
                f"/api/v1/devices/{device_id}/desired for what it should run",
                "not_assigned",
            )

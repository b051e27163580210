"""Enrollment tokens (admin scope): create (shown once), list, revoke; and the check that
spends one at enrollment.

A token only creates new devices (fleet.api.enrollment). Rotating it: create a new one, give
it to the devices still to be enrolled, revoke the old one; enrolled devices never use it
again. The settings' ``enrollment_token`` (EDGEFLEET_ENROLLMENT_TOKEN) stays valid while it
is set: unset it once the fleet's devices use stored tokens.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec
from litestar import Controller, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from sqlalchemy import update
from sqlalchemy.engine import CursorResult
from sqlmodel import Session, col, select

from fleet.api.auth import constant_time_equal, credential_hash, operator_guard
from fleet.api.context import AppContext
from fleet.api.enrollment import EnrollmentTokenRefused, check_enrollment_token, check_token_name
from fleet.api.revocation import revoke_by_id
from fleet.api.schemas import ERROR_RESPONSES
from fleet.db.engine import session_scope
from fleet.db.models import EnrollmentToken, as_utc, now_utc
from shared.errors import MalformedDocumentError
from shared.randomtoken import random_token
from shared.timeutil import format_ts

TOKEN_PREFIX = "efe_"
MAX_VALID_S = 10 * 365 * 86400


class EnrollmentTokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    expires_in_s: float | None = None  # None: never
    max_uses: int | None = None  # None: unlimited


class EnrollmentTokenInfo(msgspec.Struct):
    id: int
    name: str
    created: str
    uses: int
    expires_at: str | None = None
    max_uses: int | None = None
    revoked_at: str | None = None


class NewEnrollmentToken(msgspec.Struct):
    info: EnrollmentTokenInfo
    token: str


def _ts(value: datetime | None) -> str | None:
    value = as_utc(value)
    return format_ts(value) if value else None


def _info(row: EnrollmentToken) -> EnrollmentTokenInfo:
    assert row.id is not None
    return EnrollmentTokenInfo(id=row.id, name=row.name, created=_ts(row.created) or "", uses=row.uses,
                               expires_at=_ts(row.expires_at), max_uses=row.max_uses,
                               revoked_at=_ts(row.revoked_at))


def accept_enrollment_token(session: Session, ctx: AppContext, token: str, now: datetime, *,
                            count_use: bool) -> int | None:
    """The id of the stored token that admits this enrollment (None: the settings' bootstrap
    token); raises EnrollmentTokenRefused. A counted use is taken atomically, so concurrent
    enrollments never exceed ``max_uses``."""
    bootstrap = ctx.settings.enrollment_token
    if bootstrap and constant_time_equal(token, bootstrap):
        return None
    hashed = credential_hash(token)
    row = session.exec(select(EnrollmentToken).where(EnrollmentToken.token_hash == hashed)).first()
    check_enrollment_token(row, now)
    assert row is not None and row.id is not None
    if count_use:
        stmt = update(EnrollmentToken).where(col(EnrollmentToken.id) == row.id)
        if row.max_uses is not None:
            stmt = stmt.where(col(EnrollmentToken.uses) < row.max_uses)
        done = session.execute(stmt.values(uses=EnrollmentToken.uses + 1))
        if not isinstance(done, CursorResult) or done.rowcount != 1:
            raise EnrollmentTokenRefused(f"enrollment token {row.id} is used up ({row.max_uses} enrollments)",
                                         token_id=row.id, max_uses=row.max_uses)
    return row.id


class EnrollmentTokenController(Controller):
    path = "/api/v1/enrollment-tokens"
    tags = ["enrollment tokens"]
    guards = [operator_guard]
    opt = {"scope": "admin"}

    @post("/", sync_to_thread=True, status_code=201, responses=ERROR_RESPONSES,
          summary="Create an enrollment token (shown once); it may expire and be limited in uses")
    def create(self, data: JSONBody[EnrollmentTokenRequest], state: State) -> NewEnrollmentToken:
        ctx: AppContext = state.ctx
        name = check_token_name(data.name)
        if data.expires_in_s is not None and not 0 < data.expires_in_s <= MAX_VALID_S:
            raise MalformedDocumentError(f"expires_in_s {data.expires_in_s} must be in (0, {MAX_VALID_S}]")
        if data.max_uses is not None and not 1 <= data.max_uses <= 1_000_000_000:
            raise MalformedDocumentError(f"max_uses {data.max_uses} must be between 1 and 1000000000")
        token = TOKEN_PREFIX + random_token(32)
        now = now_utc()
        expires = now + timedelta(seconds=data.expires_in_s) if data.expires_in_s is not None else None
        with session_scope(ctx.engine) as session:
            row = EnrollmentToken(name=name, token_hash=credential_hash(token), created=now,
                                  expires_at=expires, max_uses=data.max_uses)
            session.add(row)
            session.flush()
            info = _info(row)
        return NewEnrollmentToken(info=info, token=token)

    @get("/", sync_to_thread=True, summary="All enrollment tokens (never their secrets)",
         responses=ERROR_RESPONSES)
    def list_tokens(self, state: State) -> list[EnrollmentTokenInfo]:
        with Session(state.ctx.engine) as session:
            return [_info(r) for r in session.exec(select(EnrollmentToken).order_by(col(EnrollmentToken.id)))]

    @delete("/{token_id:int}", sync_to_thread=True, status_code=200, responses=ERROR_RESPONSES,
            summary="Revoke an enrollment token at once (enrolled devices are not touched)")
    def revoke(self, token_id: FromPath[int], state: State) -> EnrollmentTokenInfo:
        return revoke_by_id(state.ctx.engine, EnrollmentToken, token_id, "enrollment token", _info)

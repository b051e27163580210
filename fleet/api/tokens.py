"""Operator API tokens (admin scope): create (the token is shown once), list, revoke."""

from __future__ import annotations

import msgspec
from litestar import Controller, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from sqlmodel import Session, col, select

from fleet.api.auth import credential_hash, new_operator_token, operator_guard, parse_scopes
from fleet.api.context import AppContext
from fleet.api.revocation import revoke_by_id
from fleet.api.schemas import ERROR_RESPONSES
from fleet.db.engine import session_scope
from fleet.db.models import ApiToken, as_utc, now_utc
from shared.errors import MalformedDocumentError
from shared.timeutil import format_ts


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    scopes: list[str]
    name: str = ""


class TokenInfo(msgspec.Struct):
    id: int
    name: str
    scopes: list[str]
    created: str
    revoked_at: str | None = None


class NewToken(msgspec.Struct):
    id: int
    name: str
    scopes: list[str]
    created: str
    token: str


def _info(row: ApiToken) -> TokenInfo:
    assert row.id is not None
    revoked = as_utc(row.revoked_at)
    return TokenInfo(
        id=row.id,
        name=row.name,
        scopes=row.scopes.split(","),
        created=format_ts(as_utc(row.created) or now_utc()),
        revoked_at=format_ts(revoked) if revoked else None,
    )


class TokenController(Controller):
    path = "/api/v1/tokens"
    tags = ["tokens"]
    guards = [operator_guard]
    opt = {"scope": "admin"}

    @post("/", sync_to_thread=True, status_code=201, summary="Create an operator token (shown once)",
          responses=ERROR_RESPONSES)
    def create(self, data: JSONBody[TokenRequest], state: State) -> NewToken:
        ctx: AppContext = state.ctx
        try:
            scopes = parse_scopes(data.scopes)
        except ValueError as exc:
            raise MalformedDocumentError(str(exc)) from None
        if len(data.name) > 128:
            raise MalformedDocumentError(f"name is {len(data.name)} characters, at most 128")
        token = new_operator_token()
        with session_scope(ctx.engine) as session:
            row = ApiToken(name=data.name, token_hash=credential_hash(token), scopes=",".join(scopes))
            session.add(row)
            session.flush()
            info = _info(row)
        return NewToken(id=info.id, name=info.name, scopes=info.scopes, created=info.created, token=token)

    @get("/", sync_to_thread=True, summary="All operator tokens (never their secrets)",
         responses=ERROR_RESPONSES)
    def list_tokens(self, state: State) -> list[TokenInfo]:
        with Session(state.ctx.engine) as session:
            return [_info(r) for r in session.exec(select(ApiToken).order_by(col(ApiToken.id)))]

    @delete("/{token_id:int}", sync_to_thread=True, status_code=200, summary="Revoke a token at once",
            responses=ERROR_RESPONSES)
    def revoke(self, token_id: FromPath[int], state: State) -> TokenInfo:
        return revoke_by_id(state.ctx.engine, ApiToken, token_id, "token", _info)

"""Revoking a stored token by id, the same for operator tokens and enrollment tokens: 404
when the id names nothing, the first revocation's time kept when asked again."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Engine

from fleet.db.engine import session_scope
from fleet.db.models import ApiToken, EnrollmentToken, now_utc
from fleet.errors import NotFoundError

Row = TypeVar("Row", ApiToken, EnrollmentToken)
Answer = TypeVar("Answer")


def revoke_by_id(engine: Engine, model: type[Row], row_id: int, what: str,
                 answer: Callable[[Row], Answer]) -> Answer:
    """Revoke the ``model`` row ``row_id`` (``what`` names it in the 404) and return
    ``answer(row)``, made while the row is still bound to its session."""
    with session_scope(engine) as session:
        row = session.get(model, row_id)
        if row is None:
            raise NotFoundError(f"{what} {row_id} does not exist", token_id=row_id)
        if row.revoked_at is None:
            row.revoked_at = now_utc()
            session.add(row)
        session.flush()
        return answer(row)

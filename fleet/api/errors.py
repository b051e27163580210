"""Every error leaves as JSON ``{"status_code", "detail"}``; no stack trace reaches a client."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from sqlalchemy.exc import DataError, IntegrityError

from fleet.errors import ConflictError, NotFoundError
from fleet.rollout.engine import TransitionError
from shared.errors import EdgefleetError

log = logging.getLogger("fleet.api")


def error_response(status: int, detail: str, **extra: Any) -> Response[dict[str, Any]]:
    body = {"status_code": status, "detail": detail, **extra}
    return Response(body, status_code=status, media_type="application/json")


def _validation_detail(exc: ValidationException) -> str:
    detail = exc.detail or "invalid request"
    extra = exc.extra
    if isinstance(extra, list) and extra:
        parts = []
        for item in extra:
            if isinstance(item, dict):
                key = item.get("key")
                msg = item.get("message", "")
                parts.append(f"{key}: {msg}" if key else str(msg))
        if parts:
            detail = f"{detail}: {'; '.join(parts)}"
    return detail


def http_exception_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    detail = _validation_detail(exc) if isinstance(exc, ValidationException) else exc.detail
    if exc.status_code >= 500:
        log.error("%s %s: %s", request.method, request.url.path, detail)
    response = error_response(exc.status_code, detail)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    if exc.status_code == 401:
        response.headers.setdefault("WWW-Authenticate", 'Bearer realm="edgefleet"')
    return response


def edgefleet_error_handler(request: Request[Any, Any, Any], exc: EdgefleetError) -> Response[dict[str, Any]]:
    if isinstance(exc, NotFoundError):
        status = 404
    elif isinstance(exc, ConflictError | TransitionError):
        status = 409
    else:
        status = 400
    log.info("%s %s refused (%s): %s", request.method, request.url.path, exc.code, exc.message)
    return error_response(status, exc.message, code=exc.code)


def integrity_error_handler(request: Request[Any, Any, Any], exc: IntegrityError) -> Response[dict[str, Any]]:
    log.warning("%s %s: integrity error: %s", request.method, request.url.path, exc.orig)
    return error_response(409, "the request conflicts with data stored meanwhile; retry it")


def out_of_range_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """A number the database cannot hold (an id past 64 bits on SQLite, 32 bits on PostgreSQL)."""
    log.info("%s %s refused: value out of range: %s", request.method, request.url.path, exc)
    detail = "a number in the request is out of range (ids are below 2147483648)"
    return error_response(400, detail, code="range")


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error; the fleet log has the details")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPException: http_exception_handler,
    EdgefleetError: edgefleet_error_handler,
    IntegrityError: integrity_error_handler,
    DataError: out_of_range_handler,
    OverflowError: out_of_range_handler,
    Exception: internal_error_handler,
}

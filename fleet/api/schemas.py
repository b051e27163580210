"""Shapes the OpenAPI document names: the error body and the responses every guarded
route may give."""

from __future__ import annotations

import msgspec
from litestar.openapi.datastructures import ResponseSpec


class ErrorBody(msgspec.Struct):
    """Every error: the status again and what is wrong and what to do."""

    status_code: int
    detail: str
    code: str | None = None


def _error(text: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorBody, description=text, generate_examples=False)


BAD_REQUEST = {400: _error("Malformed input; the detail says which field and why")}
UNAUTHORIZED = {401: _error("No or no valid credential; the detail says what to send")}
FORBIDDEN = {403: _error("A valid credential asking for what it may not (scope, other device)")}
NOT_FOUND = {404: _error("Unknown id")}
CONFLICT = {409: _error("Conflicts with the stored state")}
TOO_MANY = {429: _error("Rate limited; Retry-After says when to try again")}

ERROR_RESPONSES = {**BAD_REQUEST, **UNAUTHORIZED, **FORBIDDEN, **NOT_FOUND}
DEVICE_RESPONSES = {**ERROR_RESPONSES, **TOO_MANY}

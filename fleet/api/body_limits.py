"""Request bodies at the fleet's HTTP boundary: JSON size and nesting bounded before any
handler (or the JSON decoder) sees them.

Litestar decodes a JSON body recursively; one nested deeper than the interpreter's recursion
limit raised RecursionError, answered 500. Two layers close it:

- ``BodyLimitMiddleware`` (ASGI, outside routing and auth) reads each body that is not
  declared binary (``application/octet-stream``, ``multipart/*``) or sent to a file route
  (``BINARY_ROUTES``: the bundle upload): a declared
  ``Content-Length`` over ``json_max_bytes`` is refused 413 before a byte is read, a body
  that grows past it while read is refused 413, and one nested deeper than
  ``json_max_depth`` (arrays and objects, strings skipped) is refused 400. The body is then
  handed on unchanged;
- ``FleetRequest`` (the app's request class): a body declared binary but decoded as JSON by
  a handler anyway, nested past the decoder's recursion limit, is a 400 too.

Refusals are JSON ``{"status_code", "detail", "code"}`` like every other error.
"""

from __future__ import annotations

import json
import re
from typing import Any

from litestar import Request
from litestar.exceptions import ClientException

from fleet.metrics import ASGIApp, record_denied
from fleet.settings import Settings

BINARY_TYPES = ("application/octet-stream", "multipart/")
# Routes whose body is a file whatever its declared type (curl --data-binary says
# x-www-form-urlencoded): never read here. Their handlers cap the size themselves.
BINARY_ROUTES = frozenset({("POST", "/api/v1/bundles")})
# A JSON string: what is inside one never counts as nesting.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")  # one pass removes one level (never two, as two replaces could)


class JsonTooDeep(ValueError):
    """A JSON text nested deeper than the bound."""

    def __init__(self, bound: int) -> None:
        super().__init__(f"the JSON body is nested deeper than {bound} levels (arrays and objects)")
        self.bound = bound


def check_json_depth(body: bytes, bound: int) -> None:
    """JsonTooDeep when ``body`` nests arrays/objects deeper than ``bound``.

    Strings are removed, then every innermost ``[]``/``{}`` pair at once, ``bound`` times:
    a well-formed text is empty by then. Brackets that do not pair up are left to the JSON
    decoder, which refuses them as malformed.
    """
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(bound):
        if not brackets:
            return
        shorter = _INNERMOST.sub(b"", brackets)
        if len(shorter) == len(brackets):
            return  # malformed: the decoder's 400
        brackets = shorter
    if brackets and _INNERMOST.search(brackets):
        raise JsonTooDeep(bound)


def _content_type(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return value.decode("latin-1").split(";", 1)[0].strip().lower()
    return ""


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_bytes = settings.json_max_bytes
        self.max_depth = settings.json_max_depth

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        ctype = _content_type(scope)
        if ctype.startswith(BINARY_TYPES) or (scope.get("method"), scope.get("path")) in BINARY_ROUTES:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, 413, "json_too_large", f"the body is {declared} bytes, more than "
                               f"the {self.max_bytes} allowed for JSON (json_max_bytes)")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, 413, "json_too_large", f"the body is more than the "
                                   f"{self.max_bytes} bytes allowed for JSON (json_max_bytes)")
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        try:
            check_json_depth(body, self.max_depth)
        except JsonTooDeep as exc:
            await self._refuse(send, 400, "json_too_deep", f"{exc} (json_max_depth)")
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, status: int, code: str, detail: str) -> None:
        record_denied(status, code)
        body = json.dumps({"status_code": status, "detail": detail, "code": code}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class FleetRequest(Request[Any, Any, Any]):
    """Litestar's request, with a JSON body nested past the decoder's recursion a 400."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise ClientException("the JSON body is nested too deeply") from None

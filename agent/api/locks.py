"""Update-lock routes of the local API (docs/agent-api.md, "Update locks").

    GET    /v1/locks                   the locks held and what pending updates wait for
    POST   /v1/locks/{holder}          take (or take again) the lock: {"lease_s": 60, "reason": "..."}
    POST   /v1/locks/{holder}/renew    a new lease for a lock still held: {"lease_s": 60} (optional)
    DELETE /v1/locks/{holder}          release it

Pure request -> answer functions over the lock table; the server does the HTTP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from agent.update.locks import Lease, LockError, LockTable
from shared import strictjson
from shared.errors import MalformedDocumentError

PREFIX = "/v1/locks"
MAX_LOCK_BODY = 4096


def lease_json(lease: Lease, now_mono: float, now_wall: float) -> dict[str, Any]:
    remaining = lease.remaining(now_mono)
    return {
        "holder": lease.holder,
        "lease_s": lease.lease_s,
        "expires_in_s": round(remaining, 3),
        "expires_at": round(now_wall + remaining, 3),
        "reason": lease.reason,
    }


def _body(raw: bytes, *, need_lease: bool) -> tuple[float | None, str]:
    if not raw.strip():
        if need_lease:
            raise LockError(400, "bad_request", 'send {"lease_s": <seconds>} (and optionally "reason")')
        return None, ""
    try:
        doc = strictjson.loads(raw, max_bytes=MAX_LOCK_BODY, what="lock request")
    except MalformedDocumentError as exc:
        raise LockError(400, "bad_json", str(exc)) from None
    if not isinstance(doc, dict) or not set(doc) <= {"lease_s", "reason"}:
        raise LockError(400, "bad_request", 'the body is {"lease_s": <seconds>, "reason": "<text>"}')
    lease = doc.get("lease_s")
    if lease is None and need_lease:
        raise LockError(400, "bad_lease", "lease_s is required: how long the lock holds unless renewed")
    if lease is not None and (isinstance(lease, bool) or not isinstance(lease, int | float)
                              or not math.isfinite(lease)):
        raise LockError(400, "bad_lease", f"lease_s {lease!r} must be a number of seconds")
    reason = doc.get("reason", "")
    if not isinstance(reason, str):
        raise LockError(400, "bad_request", "reason must be a string")
    return (float(lease) if lease is not None else None), reason


def handle(
    table: LockTable,
    method: str,
    path: str,
    body: bytes,
    waiting: Callable[[], dict[str, str]] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Answer one lock request: (status, JSON document); LockError for a refusal."""
    parts = path[len(PREFIX):].strip("/").split("/") if path != PREFIX else []
    now_mono, now_wall = table.clock(), time.time()
    if not parts:
        if method != "GET":
            raise LockError(405, "method_not_allowed", f"{method} {PREFIX}: use GET, or "
                            f"POST/DELETE {PREFIX}/<holder>")
        held = table.held()
        return 200, {
            "locks": [lease_json(x, now_mono, now_wall) for x in held],
            "waiting": waiting() if waiting is not None else {},
        }
    holder = parts[0]
    if len(parts) == 1 and method == "POST":
        lease_s, reason = _body(body, need_lease=True)
        assert lease_s is not None
        return 200, lease_json(table.acquire(holder, lease_s, reason), table.clock(), now_wall)
    if len(parts) == 2 and parts[1] == "renew" and method == "POST":
        lease_s, _ = _body(body, need_lease=False)
        return 200, lease_json(table.renew(holder, lease_s), table.clock(), now_wall)
    if len(parts) == 1 and method == "DELETE":
        table.release(holder)
        return 200, {"holder": holder, "released": True}
    if len(parts) == 1 and method == "GET":
        for x in table.held():
            if x.holder == holder:
                return 200, lease_json(x, now_mono, now_wall)
        raise LockError(404, "no_lock", f"{holder!r} holds no update lock")
    raise LockError(404, "not_found", f"no route {method} {path}; see docs/agent-api.md (Update locks)")

"""Rate limits: an in-process token bucket per client IP or per device credential.

Three buckets, each configurable in the settings (rate 0 turns one off):

- ``enroll``: ``POST /api/v1/devices/enroll``, per client IP;
- ``public``: ``/healthz``, ``/metrics``, ``/schema...``, the device CA certificate, per
  client IP;
- ``device``: the device endpoints (desired state, envelopes, blobs, certificate
  requests), per credential
  (hashed; per client IP when none is sent).

A refused request gets 429 with ``Retry-After`` and a JSON detail. Each process counts
on its own, so N API processes allow N times the rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from fleet.metrics import ASGIApp, record_denied
from fleet.settings import Settings

MAX_KEYS = 100_000


@dataclass(frozen=True)
class Limit:
    rate_per_s: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and self.burst > 0


class TokenBucket:
    """Buckets by key; ``take(key)`` returns 0.0 when allowed, else seconds until one is."""

    def __init__(self, limit: Limit, *, clock: Any = time.monotonic, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        now = self.clock()
        rate, burst = self.limit.rate_per_s, float(self.limit.burst)
        with self._lock:
            tokens, last = self._buckets.pop(key, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / rate
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # the least recently seen
        return wait


DEVICE_PREFIXES = ("/api/v1/blobs/", "/api/v1/bundles/")
PUBLIC_PATHS = ("/healthz", "/metrics")

WHAT = {
    "enroll": "enrollment requests from {who}",
    "public": "requests to public endpoints from {who}",
    "device": "device requests from {who}",
}


def classify(method: str, path: str) -> str | None:
    if path == "/api/v1/devices/enroll":
        return "enroll"
    if path in PUBLIC_PATHS or path == "/schema" or path.startswith("/schema/"):
        return "public"
    if path.startswith("/api/v1/blobs/") or (
        path.startswith("/api/v1/bundles/") and path.endswith("/envelope")
    ):
        return "device"
    if path.startswith("/api/v1/devices/") and path.endswith(("/desired", "/certificate")):
        return "device"
    if path == "/api/v1/certificates/ca":
        return "public"
    return None


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.trust_forwarded_for = settings.trust_forwarded_for
        limits = {
            "enroll": Limit(settings.enroll_rate_per_s, settings.enroll_burst),
            "public": Limit(settings.public_rate_per_s, settings.public_burst),
            "device": Limit(settings.device_rate_per_s, settings.device_burst),
        }
        self.buckets = {name: TokenBucket(limit) for name, limit in limits.items() if limit.enabled}

    def client_ip(self, scope: MutableMapping[str, Any]) -> str:
        if self.trust_forwarded_for:
            for name, value in scope.get("headers", []):
                if name == b"x-forwarded-for":
                    return value.decode("latin-1").split(",")[0].strip() or "unknown"
        client = scope.get("client")
        return str(client[0]) if client else "unknown"

    def _key(self, kind: str, scope: MutableMapping[str, Any]) -> tuple[str, str]:
        ip = self.client_ip(scope)
        if kind == "device":
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    digest = hashlib.sha256(value).hexdigest()[:24]
                    return f"cred:{digest}", "this credential"
        return f"ip:{ip}", ip

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            kind = classify(scope.get("method", "GET"), scope.get("path", ""))
            bucket = self.buckets.get(kind) if kind else None
            if bucket is not None and kind is not None:
                key, who = self._key(kind, scope)
                wait = bucket.take(key)
                if wait > 0:
                    await self._refuse(send, kind, who, bucket.limit, wait)
                    return
        await self.app(scope, receive, send)

    async def _refuse(self, send: Any, kind: str, who: str, limit: Limit, wait: float) -> None:
        record_denied(429, kind)
        retry = max(1, math.ceil(wait))
        detail = (
            f"too many {WHAT[kind].format(who=who)}: at most {limit.rate_per_s:g} per second "
            f"(bursts of {limit.burst}); retry in {retry} s"
        )
        body = json.dumps({"status_code": 429, "detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

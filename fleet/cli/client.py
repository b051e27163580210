"""A small client for the fleet HTTP API (v1), shared by the CLI and the demo.

Every failure becomes a named ``FleetError`` with a one-line message an operator can act
on: the fleet cannot be reached, the token is refused, or the server said what is wrong
(its JSON ``detail``). Nothing here prints; callers decide how to show results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from shared.errors import EdgefleetError

DEFAULT_URL = "http://127.0.0.1:8080"
UPLOAD_CHUNK = 1 << 20
ROLLOUT_ACTIONS = ("start", "pause", "resume", "approve", "abort", "rollback")
# fleet.rollout.engine.FINISHED_STATES as the API spells them (the CLI does not import the
# engine; tests/fleet/test_rollout_machine.py checks the two agree)
TERMINAL_STATES = frozenset({"succeeded", "rolled_back", "aborted"})


class FleetError(EdgefleetError):
    """The fleet API could not be used: unreachable, refused, or answered an error."""

    code = "fleet"


class FleetUnreachableError(FleetError):
    code = "fleet_unreachable"


class FleetHTTPError(FleetError):
    code = "fleet_http"

    def __init__(self, message: str, *, status_code: int, detail: str) -> None:
        super().__init__(message, status_code=status_code, detail=detail)
        self.status_code = status_code
        self.detail = detail


def default_url() -> str:
    return os.environ.get("EDGEFLEET_URL") or DEFAULT_URL


def default_token(data_dir: Path | None = None) -> str | None:
    """EDGEFLEET_TOKEN, else the admin token a local `edgefleet serve` wrote, else None."""
    token = os.environ.get("EDGEFLEET_TOKEN")
    if token:
        return token.strip()
    candidates = [Path(data_dir) / "admin.token"] if data_dir else []
    if os.environ.get("EDGEFLEET_DATA_DIR"):
        candidates.append(Path(os.environ["EDGEFLEET_DATA_DIR"]) / "admin.token")
    candidates.append(Path("fleet-data") / "admin.token")
    for path in candidates:
        try:
            return path.read_text().strip() or None
        except OSError:
            continue
    return None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] if text else response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("message") or body.get("error")
        extra = body.get("extra")
        if detail and extra:
            return f"{detail} ({extra})"
        if detail:
            return str(detail)
    return str(body)[:300]


def _items(body: Any, *keys: str) -> list[dict[str, Any]]:
    """Accept a bare list or an object wrapping it under one of ``keys`` (or "items")."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for key in (*keys, "items", "data"):
            if isinstance(body.get(key), list):
                return body[key]
    raise FleetError(f"the fleet answered an unexpected list format: {str(body)[:200]}")


class FleetClient:
    """Operator calls to the fleet. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the decoded JSON body (None when empty)."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise FleetUnreachableError(
                f"the fleet at {self.url} did not answer {method} {path} in time; is it overloaded?"
            ) from None
        except (httpx.TransportError, OSError) as exc:
            raise FleetUnreachableError(
                f"cannot reach the fleet at {self.url}: is `edgefleet serve` running? ({exc})"
            ) from None
        if response.status_code >= 400:
            detail = _detail(response)
            hint = ""
            if response.status_code == 401:
                hint = "; pass --token or set EDGEFLEET_TOKEN (see fleet-data/admin.token)"
            elif response.status_code == 403:
                hint = "; this token lacks the scope for it"
            raise FleetHTTPError(
                f"{method} {path} failed with HTTP {response.status_code}: {detail}{hint}",
                status_code=response.status_code,
                detail=detail,
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise FleetError(f"{method} {path}: the fleet answered non-JSON: {response.text[:200]}") from None

    # -- API -----------------------------------------------------------------------
    def health(self) -> Any:
        return self.request("GET", "/healthz")

    def upload_bundle(self, path: Path, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Stream a single-file bundle to the fleet; ``progress(n)`` is told each chunk sent."""
        path = Path(path)
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while block := fh.read(UPLOAD_CHUNK):
                    yield block
                    if progress:
                        progress(len(block))

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        return self.request("POST", "/api/v1/bundles", content=chunks(), headers=headers)

    def list_bundles(self) -> list[dict[str, Any]]:
        return _items(self.request("GET", "/api/v1/bundles"), "bundles")

    def highest_release(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", "/api/v1/bundles/highest", params={"name": name}))

    def get_bundle(self, bundle_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/bundles/{bundle_id}")

    def list_devices(self, page_size: int = 500) -> list[dict[str, Any]]:
        """Every device, a page at a time (bounded responses however large the fleet)."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": page_size}
        while True:
            page = _items(self.request("GET", "/api/v1/devices", params=params), "devices")
            out.extend(page)
            if len(page) < page_size:
                return out
            params = {"limit": page_size, "after": page[-1]["device_id"]}

    def get_device(self, device_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/devices/{device_id}")

    def create_rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/v1/rollouts", json=spec)

    def list_rollouts(self) -> list[dict[str, Any]]:
        return _items(self.request("GET", "/api/v1/rollouts"), "rollouts")

    def get_rollout(self, rollout_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/rollouts/{rollout_id}")

    def rollout_action(self, rollout_id: int, action: str) -> dict[str, Any]:
        """One of start, pause, resume, approve, abort, rollback; returns the rollout afterwards."""
        if action not in ROLLOUT_ACTIONS:
            raise ValueError(f"unknown rollout action {action!r}; one of {ROLLOUT_ACTIONS}")
        return self.request("POST", f"/api/v1/rollouts/{rollout_id}/{action}")

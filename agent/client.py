"""A small Python client for the agent's local inference API (TCP or Unix socket).

    from agent.client import AgentClient

    with AgentClient(unix_socket="/run/edgefleet/agent.sock") as agent:
        if agent.ready():
            probs = agent.predict("clf", {"x": x})["probs"]

Binary requests (the default) send and receive ``application/x-npz``, which keeps dtypes
and costs no JSON parsing; ``binary=False`` sends JSON and converts the outputs with
the dtypes the model declares. Every refusal raises AgentError with the server's code
(e.g. ``input``, ``unknown_model``, ``timeout``) and detail; an unreachable agent
raises AgentUnavailableError.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

DEFAULT_URL = "http://127.0.0.1:8181"
NPZ = "application/x-npz"
NPY = "application/x-npy"


class AgentError(Exception):
    """The agent answered with an error: ``status``, ``code`` and ``detail`` as it sent them."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class AgentUnavailableError(AgentError):
    """The agent could not be reached (not running, wrong socket path, connection cut)."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, "unavailable", detail)


class AgentClient:
    def __init__(self, url: str | None = None, unix_socket: str | None = None, *,
                 timeout: float = 60.0) -> None:
        if url and unix_socket:
            raise ValueError("give url or unix_socket, not both")
        if unix_socket:
            transport = httpx.HTTPTransport(uds=str(unix_socket))
            self._where = f"unix:{unix_socket}"
            self._http = httpx.Client(transport=transport, base_url="http://agent", timeout=timeout)
        else:
            self._where = url or DEFAULT_URL
            self._http = httpx.Client(base_url=self._where, timeout=timeout)
        self._outputs: dict[str, dict[str, str]] = {}  # model -> output name -> dtype (JSON replies)
        self.last_release: int | None = None

    # -- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise AgentUnavailableError(f"cannot reach the agent at {self._where}: {exc}") from None
        return response

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            doc = response.json()
            code, detail = str(doc["error"]), str(doc["detail"])
        except (ValueError, KeyError, TypeError):
            code, detail = "http", response.text[:500] or response.reason_phrase
        raise AgentError(response.status_code, code, detail)

    # -- API ----------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when the agent serves at least one model (False when it is up but has none)."""
        response = self._request("GET", "/readyz")
        if response.status_code == 503:
            return False
        if response.status_code != 200:
            self._raise(response)
        return True

    def models(self) -> list[dict[str, Any]]:
        """The active models: name, release, version, digest, runtime, inputs, outputs, batching."""
        response = self._request("GET", "/v1/models")
        if response.status_code != 200:
            self._raise(response)
        models: list[dict[str, Any]] = response.json()["models"]
        for m in models:
            self._outputs[m["name"]] = {o["name"]: o["dtype"] for o in m["outputs"]}
        return models

    def predict(self, name: str, inputs: dict[str, np.ndarray], *,
                binary: bool = True) -> dict[str, np.ndarray]:
        """Run the active release of ``name``; the release that answered is in ``last_release``."""
        path = f"/v1/models/{quote(name, safe='')}/predict"
        if binary:
            buf = io.BytesIO()
            arrays = {k: np.asarray(v) for k, v in inputs.items()}
            np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as its allow_pickle: bool
            response = self._request("POST", path, content=buf.getvalue(),
                                     headers={"Content-Type": NPZ, "Accept": NPZ})
        else:
            doc = {"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}
            response = self._request("POST", path, json=doc)
        if response.status_code != 200:
            self._raise(response)
        release = response.headers.get("X-Edgefleet-Release")
        self.last_release = int(release) if release and release.isdigit() else None
        ctype = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if ctype == NPZ:
            with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if ctype == NPY:
            output = response.headers.get("X-Edgefleet-Output", "output")
            return {output: np.load(io.BytesIO(response.content), allow_pickle=False)}
        outputs = response.json()["outputs"]
        if name not in self._outputs:
            self.models()
        dtypes = self._outputs.get(name, {})
        return {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in outputs.items()}

    # -- update locks (docs/agent-api.md "Update locks") ----------------------------------

    def _lock_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._request(method, path, json=body) if body is not None else self._request(
            method, path, headers={"Content-Length": "0"})
        if response.status_code != 200:
            self._raise(response)
        doc: dict[str, Any] = response.json()
        return doc

    def acquire_lock(self, holder: str, lease_s: float, reason: str = "") -> dict[str, Any]:
        """Hold off activation of updates for ``lease_s`` seconds (renew before it runs out).
        Answers ``{"holder", "lease_s", "expires_in_s", "expires_at", "reason"}``."""
        return self._lock_call("POST", f"/v1/locks/{quote(holder, safe='')}",
                               {"lease_s": lease_s, "reason": reason})

    def renew_lock(self, holder: str, lease_s: float | None = None) -> dict[str, Any]:
        """A new lease for a lock still held; AgentError ``no_lock`` (404) once it lapsed."""
        body = {} if lease_s is None else {"lease_s": lease_s}
        return self._lock_call("POST", f"/v1/locks/{quote(holder, safe='')}/renew", body)

    def release_lock(self, holder: str) -> None:
        self._lock_call("DELETE", f"/v1/locks/{quote(holder, safe='')}")

    def locks(self) -> dict[str, Any]:
        """``{"locks": [...], "waiting": {model: what its staged release waits for}}``."""
        return self._lock_call("GET", "/v1/locks")

    @contextlib.contextmanager
    def update_lock(self, holder: str, lease_s: float, reason: str = "") -> Iterator[dict[str, Any]]:
        """``with agent.update_lock("camera-app", 60):`` holds the lock for the block (renew it
        with ``renew_lock`` if the block may outlast the lease), releases it on exit."""
        lease = self.acquire_lock(holder, lease_s, reason)
        try:
            yield lease
        finally:
            with contextlib.suppress(AgentError):
                self.release_lock(holder)

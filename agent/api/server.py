"""The local inference API: loopback HTTP and an optional Unix socket.

    GET  /healthz                   200 while the process runs
    GET  /readyz                    200 when a model is loaded, else 503
    GET  /v1/models                 active models with release, version, signature, batching
    POST /v1/models/{name}/predict  raw tensors (application/x-edgefleet-tensors), application/x-npy
                                    (single-input models), application/x-npz or JSON {"inputs": {...}}
                                    (the framings: agent.api.codecs)
    GET|POST|DELETE /v1/locks/...   update locks of local applications (agent.api.locks)

The reply has the request's framing unless ``Accept`` asks for another one (an x-npy
reply needs a single-output model; x-npy requests of several-output models get npz).
Requests run through the model's scheduler (dynamic batching); one without a result
within ``request_timeout_s`` is answered 504. Errors are JSON
``{"error": "<code>", "detail": "<what to do>"}``. The server never dies on bad input:
every request is answered or its connection closed. See docs/agent-api.md.

HTTP/1.1 framing is agent.api.http1's (not http.server, which brings ssl and email.* into
every agent); tests/agent/test_api_headers.py keeps them out of ``import agent.main``.
Connections, workers and timeouts are agent.api.connections'; a body is judged by its
declared size (413) and the ``BodyBudget`` of bodies in flight (503) before it is read, and
JSON inputs are decoded by agent.api.json_inputs (docs/agent-api.md, "Limits").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from agent.api import locks as lock_routes
from agent.api.codecs import (
    BODY_COST,
    JSON,
    NPY,
    NPZ,
    TENSORS,
    TENSORS_HEADER,
    json_inputs,
    npy_bytes,
    npy_inputs,
    npz_bytes,
    npz_inputs,
    reply_format,
    tensors_inputs,
    tensors_reply,
)
from agent.api.connections import Connection, ConnectionLimits, ConnectionServer
from agent.api.errors import ApiError
from agent.api.http1 import RequestHandler
from agent.errors import ConfigError, InferenceError, InputError, UnknownModelError
from agent.runtime.batching import RequestTimeout
from agent.runtime.host import LoadedModel, ModelHost
from agent.update.locks import LockError, LockTable

log = logging.getLogger(__name__)

PREDICT_PREFIX = "/v1/models/"


def _specs(specs: list[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in specs]


def describe(model: LoadedModel, max_batch_rows: int = 1,
             batching: dict[str, Any] | None = None) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "release": model.release,
        "version": m.version,
        "digest": model.digest,
        "runtime": m.runtime,
        "inputs": _specs(m.inputs),
        "outputs": _specs(m.outputs),
        "max_batch_rows": max_batch_rows,
        "batching": batching,
    }


class BodyBudget:
    """Bytes of request bodies (weighted by what decoding them costs) held at once, over all
    connections: what keeps the API's memory bounded whatever the number of clients. A
    request over what is left is answered 503 before its body is read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, cost: int) -> bool:
        with self._lock:
            if self.used + cost > self.limit:
                return False
            self.used += cost
            return True

    def give(self, cost: int) -> None:
        with self._lock:
            self.used -= cost


# A JSON reply is built as Python lists (~32 bytes a number) and encoded (~10-20 more): it
# may hold at most max_json_bytes / this many numbers.
JSON_REPLY_BYTES_PER_NUMBER = 16


class _Handler(RequestHandler):
    server_version = "edgefleet-agent"
    logger = log
    host: ModelHost
    max_body_bytes: int
    max_json_bytes: int
    budget: BodyBudget
    request_timeout_s: float | None
    locks: LockTable | None = None
    update_waiting: Callable[[], dict[str, str]] | None = None
    agent_status: Callable[[], dict[str, Any]] | None = None  # GET /v1/status (the agent assembles it)

    # -- plumbing -----------------------------------------------------------------

    _send = RequestHandler.send_reply  # status line, headers and a small body in one write

    def _json(self, status: int, doc: Any, **kw: Any) -> None:
        self._send(status, msgspec.json.encode(doc), JSON, **kw)

    def _error(self, exc: ApiError, close: bool = False) -> None:
        if exc.status >= 500 and exc.status != 503:
            log.warning("api %s %s: %s", exc.status, exc.code, exc.detail)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        self._json(exc.status, {"error": exc.code, "detail": exc.detail}, headers=headers, close=close)

    def _guard(self, fn: Any) -> None:
        self._consumed = not self.body_length
        self._cost = 0
        try:
            fn()
        except ApiError as exc:
            # A body left unread would be parsed as the next request: close instead.
            self._error(exc, close=exc.status in (411, 413) or not self._consumed)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except TimeoutError:
            raise  # answered 408 by RequestHandler.serve
        except Exception as exc:  # the server must not die on anything a client sends
            log.exception("api: unexpected error")
            with contextlib.suppress(OSError):
                self._error(ApiError(500, "internal", f"unexpected error: {exc}"), close=True)
        finally:
            if self._cost:
                self.budget.give(self._cost)
                self._cost = 0

    def _body(self, limit: int | None = None, media: str = JSON) -> bytes | bytearray:
        """The body, judged by its declared size before a byte of it is read: 411 without a
        Content-Length, 413 over ``limit``, 503 when the body budget cannot hold it."""
        n = self.body_length
        if n is None:
            raise ApiError(411, "length_required", "a Content-Length header is required")
        limit = self.max_body_bytes if limit is None else limit
        if n > limit:
            hint = f" (api.max_json_bytes); send {TENSORS} or {NPY} for large inputs" if media == JSON else ""
            raise ApiError(413, "too_large", f"the body is {n} bytes, max {limit}{hint}")
        cost = n * BODY_COST.get(media, 1)
        if not self.budget.take(cost):
            raise ApiError(503, "busy", f"request bodies of {self.budget.used} bytes (weighted) are being "
                           f"handled, at most {self.budget.limit} (api.max_inflight_bytes); retry later")
        self._cost = cost
        self.send_continue()
        data: bytes | bytearray = self.rfile.read(n)
        self._consumed = True
        if len(data) != n:
            raise ApiError(400, "bad_request", f"the body ended after {len(data)} of {n} bytes")
        return data

    # -- routes -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_HEAD(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def do_PUT(self) -> None:
        self._guard(self._not_allowed)

    def do_DELETE(self) -> None:
        self._guard(self._delete)

    def _delete(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._is_lock_path(path):
            return self._lock_request("DELETE", path)
        self._not_allowed()

    # -- update locks -------------------------------------------------------------------

    def _is_lock_path(self, path: str) -> bool:
        return path == lock_routes.PREFIX or path.startswith(lock_routes.PREFIX + "/")

    def _lock_request(self, method: str, path: str) -> None:
        if self.locks is None:
            raise ApiError(404, "not_found", "update locks are not enabled on this agent")
        body = b""
        if method == "POST" and self.body_length:
            body = bytes(self._body(lock_routes.MAX_LOCK_BODY))  # 4 KiB at most
        self._consumed = True
        try:
            status, doc = lock_routes.handle(self.locks, method, path, body, self.update_waiting)
        except LockError as exc:
            raise ApiError(exc.status, exc.code, exc.detail) from None
        self._json(status, doc)

    def _not_allowed(self) -> None:
        raise ApiError(405, "method_not_allowed", f"{self.command} is not supported on {self.path}")

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._is_lock_path(path):
            self._lock_request("GET", path)
        elif path == "/healthz":
            self._json(200, {"status": "ok"})
        elif path == "/readyz":
            models = self.host.snapshot()
            if models:
                self._json(200, {"status": "ready", "models": sorted(models)})
            else:
                self._json(503, {"error": "no_model", "detail": "no model is active yet; install a bundle"})
        elif path == "/v1/status" and self.agent_status is not None:
            self._json(200, self.agent_status())  # models, enrollment, fleet and broker links
        elif path == "/v1/models":
            models = self.host.snapshot()
            self._json(200, {"models": [self._describe(n, m) for n, m in sorted(models.items())]})
        elif path.startswith(PREDICT_PREFIX) and path.endswith("/predict"):
            raise ApiError(405, "method_not_allowed", "predict takes POST")
        else:
            raise ApiError(404, "not_found", f"no route {path}; see GET /v1/models")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._is_lock_path(path):
            return self._lock_request("POST", path)
        parts = path.split("/")
        if not (len(parts) == 5 and path.startswith(PREDICT_PREFIX) and parts[4] == "predict" and parts[3]):
            raise ApiError(404, "not_found", f"no route {path}; POST /v1/models/<name>/predict")
        name = parts[3]
        model = self.host.get(name)
        if model is None:
            if not self.host.ready():
                raise ApiError(503, "no_model", "no model is active yet; install a bundle")
            raise ApiError(404, "unknown_model",
                           f"no active model {name!r}; active: {sorted(self.host.snapshot())}")
        ctype = self.headers.get("Content-Type", JSON).split(";", 1)[0].strip().lower() or JSON
        if ctype not in BODY_COST:
            raise ApiError(415, "unsupported_media_type",
                           f"send {TENSORS}, {NPY}, {NPZ} or {JSON}, not {ctype!r}")
        body = self._body(self.max_json_bytes if ctype == JSON else self.max_body_bytes, ctype)
        manifest = model.manifest
        if ctype == TENSORS:
            inputs = tensors_inputs(body, self.headers.get(TENSORS_HEADER))
        elif ctype == NPY:
            inputs = npy_inputs(name, [s.name for s in manifest.inputs], body)
        elif ctype == NPZ:
            inputs = npz_inputs(body, self.max_body_bytes)
        else:
            inputs = json_inputs(name, {s.name: s.dtype for s in manifest.inputs}, body)
        del body  # the inputs hold what they need (a view keeps its buffer)
        reply = reply_format(self.headers.get("Accept", ""), ctype, len(manifest.outputs))
        try:
            used, outputs = self.host.predict(name, inputs, timeout_s=self.request_timeout_s)
        except InputError as exc:
            raise ApiError(400, "input", str(exc)) from None
        except UnknownModelError as exc:
            raise ApiError(404, "unknown_model", str(exc)) from None
        except InferenceError as exc:
            raise ApiError(500, "inference", f"{exc}; the error is counted in health telemetry") from None
        except RequestTimeout as exc:
            raise ApiError(504, "timeout", f"{name}: {exc} (api.request_timeout_s); the device is "
                           "busy, retry later or send fewer requests at once") from None
        headers = {"X-Edgefleet-Release": str(used.release)}
        if reply == TENSORS:
            data, extra = tensors_reply(outputs)
            self._send(200, data, TENSORS, {**headers, **extra})
        elif reply == NPY:
            self._send(200, npy_bytes(next(iter(outputs.values()))), NPY,
                       {**headers, "X-Edgefleet-Output": next(iter(outputs))})
        elif reply == NPZ:
            self._send(200, npz_bytes(outputs), NPZ, headers)
        else:
            numbers = sum(int(np.size(v)) for v in outputs.values())
            if numbers > self.max_json_bytes // JSON_REPLY_BYTES_PER_NUMBER:
                raise ApiError(406, "not_acceptable", f"the outputs hold {numbers} numbers, more than a JSON "
                               f"reply may ({self.max_json_bytes // JSON_REPLY_BYTES_PER_NUMBER}: "
                               f"api.max_json_bytes / {JSON_REPLY_BYTES_PER_NUMBER}); send Accept: "
                               f"{TENSORS} or {NPZ}")
            self._json(
                200,
                {
                    "model": name,
                    "release": used.release,
                    "outputs": {k: v.tolist() for k, v in outputs.items()},
                },
                headers=headers,
            )

    def _describe(self, name: str, model: LoadedModel) -> dict[str, Any]:
        scheduler = self.host.scheduler(name)
        if scheduler is None:
            return describe(model)
        return describe(model, scheduler.max_rows, scheduler.status())


def _listen_tcp(address: tuple[str, int], backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        return socket.create_server(address, family=family, backlog=backlog)
    except OSError as exc:
        where = f"api.listen = {address[0]}:{address[1]}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{where}: the address is already in use (another agent running?); "
                              "stop it or choose another port") from None
        raise ConfigError(f"{where}: cannot listen: {exc.strerror or exc}") from None


def _listen_unix(path: Path, backlog: int) -> socket.socket:
    if not path.parent.is_dir():
        raise ConfigError(f"api.unix_socket = {str(path)!r}: directory {path.parent} does not exist "
                          "(the systemd unit's RuntimeDirectory= makes /run/edgefleet; else create it)")
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"api.unix_socket = {str(path)!r}: cannot listen: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _within_open_files(limits: ConnectionLimits) -> ConnectionLimits:
    """``max_connections`` within the process's open-file limit: the soft limit is raised
    toward the hard one when it is short (systemd's default soft limit is 1024), else the
    connections are capped, leaving 128 descriptors to the rest of the agent."""
    import resource

    need = limits.max_connections + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < need:
            capped = max(1, soft - 128)
            log.warning("api: %d open files allowed: api.max_connections %d lowered to %d",
                        soft, limits.max_connections, capped)
            return msgspec.structs.replace(limits, max_connections=capped)
    return limits


class ApiServer:
    """The API on loopback TCP and/or a Unix socket; ``start`` serves in daemon threads
    (agent.api.connections: one thread parks idle connections, ``limits.workers`` serve)."""

    def __init__(self, host: ModelHost, *, listen: tuple[str, int] | None, unix_socket: str = "",
                 max_body_bytes: int = 64 * 1024 * 1024, max_json_bytes: int = 8 * 1024 * 1024,
                 max_inflight_bytes: int = 128 * 1024 * 1024, request_timeout_s: float | None = 30.0,
                 limits: ConnectionLimits | None = None, locks: LockTable | None = None,
                 update_waiting: Callable[[], dict[str, str]] | None = None,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.budget = BodyBudget(max_inflight_bytes)
        handler = type("Handler", (_Handler,), {"host": host, "max_body_bytes": max_body_bytes,
                                                "max_json_bytes": min(max_json_bytes, max_body_bytes),
                                                "budget": self.budget,
                                                "request_timeout_s": request_timeout_s, "locks": locks,
                                                "update_waiting": staticmethod(update_waiting)
                                                if update_waiting else None,
                                                "agent_status": staticmethod(status) if status else None})
        self.limits = _within_open_files(limits or ConnectionLimits())
        listeners: list[socket.socket] = []
        self.tcp_address: tuple[str, int] | None = None
        self.unix_path: Path | None = None
        try:
            if listen is not None:
                tcp = _listen_tcp(listen, self.limits.backlog)
                listeners.append(tcp)
                self.tcp_address = tcp.getsockname()[:2]
            if unix_socket:
                listeners.append(_listen_unix(Path(unix_socket), self.limits.backlog))
                self.unix_path = Path(unix_socket)
        except BaseException:
            for sock in listeners:
                sock.close()
            raise

        def serve(conn: Connection) -> bool:
            if conn.state is None:
                conn.state = handler(conn)
            # Connection.state is opaque to the connection layer (object); here it is always this
            # server's handler, and a cast would cost a call per request.
            return conn.state.serve()  # type: ignore[attr-defined, no-any-return]

        self.connections = ConnectionServer(listeners, serve, self.limits)

    def start(self) -> None:
        self.connections.start()

    def stop(self) -> None:
        self.connections.stop()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)

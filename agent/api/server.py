"""The local inference API: loopback HTTP and an optional Unix socket.

    GET  /healthz                   200 while the process runs
    GET  /readyz                    200 when a model is loaded, else 503
    GET  /v1/models                 active models with release, version, signature, batching
    POST /v1/models/{name}/predict  JSON {"inputs": {...}}, application/x-npz (one array per
                                    input) or application/x-npy (one array, single-input models)
    GET|POST|DELETE /v1/locks/...   update locks of local applications (agent.api.locks)

The reply has the request's format unless ``Accept`` asks for another one (an x-npy
reply needs a single-output model; x-npy requests of several-output models get npz).
Requests run through the model's scheduler (dynamic batching); one without a result
within ``request_timeout_s`` is answered 504. Errors are JSON
``{"error": "<code>", "detail": "<what to do>"}``. The server never dies on bad input:
every request is answered or its connection closed. See docs/agent-api.md.

HTTP/1.1 framing is agent.api.http1's (not http.server, which brings ssl and email.* into
every agent); tests/agent/test_api_headers.py keeps them out of ``import agent.main``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from agent.api import locks as lock_routes
from agent.api.http1 import RequestHandler
from agent.errors import InferenceError, InputError, UnknownModelError
from agent.runtime.batching import RequestTimeout
from agent.runtime.host import LoadedModel, ModelHost
from agent.update.locks import LockError, LockTable
from shared import strictjson
from shared.errors import MalformedDocumentError

log = logging.getLogger(__name__)

NPZ = "application/x-npz"
NPY = "application/x-npy"
JSON = "application/json"
FORMATS = (JSON, NPZ, NPY)
PREDICT_PREFIX = "/v1/models/"


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _specs(specs: list[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in specs]


def describe(model: LoadedModel, max_batch_rows: int = 1) -> dict[str, Any]:
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
    }


def _json_inputs(model: LoadedModel, body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        doc = strictjson.loads(body, max_bytes=max_bytes, what="request body")
    except MalformedDocumentError as exc:
        raise ApiError(400, "bad_json", f"{exc}; send {{\"inputs\": {{name: nested lists}}}}") from None
    if not isinstance(doc, dict) or set(doc) != {"inputs"} or not isinstance(doc["inputs"], dict):
        raise ApiError(400, "bad_request", 'the body must be {"inputs": {"<input name>": [...]}}')
    specs = {s.name: s for s in model.manifest.inputs}
    out = {}
    for name, value in doc["inputs"].items():
        spec = specs.get(name)
        if spec is None:
            raise ApiError(
                400, "input", f"model {model.name} has no input {name!r}; it takes {sorted(specs)}"
            )
        try:
            out[name] = np.asarray(value, dtype=spec.dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ApiError(
                400, "input", f"input {name!r} is not a rectangular array of {spec.dtype}: {exc}"
            ) from None
    return out


def _npz_inputs(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    import zipfile  # only .npz bodies need it (~1.7 MB): not loaded with the agent

    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            total = sum(info.file_size for info in npz.zip.infolist())
            if total > max_bytes:
                raise ApiError(413, "too_large", f"the npz expands to {total} bytes, max {max_bytes}")
            return {k: npz[k] for k in npz.files}
    except ApiError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ApiError(400, "bad_npz", f"the body is not a valid .npz without pickles: {exc}") from None


def _npy_inputs(model: LoadedModel, body: bytes) -> dict[str, np.ndarray]:
    names = [s.name for s in model.manifest.inputs]
    if len(names) != 1:
        raise ApiError(400, "input", f"{NPY} carries one array but model {model.name} takes inputs "
                       f"{names}; send {NPZ} with one array per input")
    return {names[0]: _npy_array(body)}


class _SlowPath(Exception):
    """A .npy header this module does not parse itself (format 3.0): numpy's reader decodes it."""


# Parsed .npy headers, keyed by their bytes: an application sends the same header with every
# request, and parsing it (ast.literal_eval) costs more than the rest of the decode.
_NPY_HEADERS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], bool]] = {}


def _npy_header(body: bytes) -> tuple[np.dtype[Any], tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of a .npy body; ValueError when malformed."""
    if body[:6] != b"\x93NUMPY" or len(body) < 10:
        raise ValueError("the magic string \\x93NUMPY is missing")
    major = body[6]
    if major == 1:
        start = 10
        end = start + int.from_bytes(body[8:10], "little")
    elif major in (2, 3):
        start = 12
        end = start + int.from_bytes(body[8:12], "little")
    else:
        raise ValueError(f"unknown .npy format version {major}.{body[7]}")
    key = body[:end]
    parsed = _NPY_HEADERS.get(key)
    if parsed is None:
        buf = io.BytesIO(key)
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:  # 3.0 (utf-8 field names): numpy's reader, not cached
            raise _SlowPath
        if dtype.hasobject:
            raise ValueError("object arrays (pickles) are not allowed")
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_NPY_HEADERS) >= 64:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = parsed
    return (*parsed, end)


def _npy_read(body: bytes) -> np.ndarray:
    buf = io.BytesIO(body)
    arr = np.lib.format.read_array(buf, allow_pickle=False)
    if buf.tell() != len(body):
        raise ApiError(400, "bad_npy", f"the body has {len(body) - buf.tell()} bytes after the array")
    return arr


def _npy_array(body: bytes) -> np.ndarray:
    """The array of a .npy body, without copying its data (a read-only view of ``body``)."""
    try:
        try:
            dtype, shape, fortran, offset = _npy_header(body)
        except _SlowPath:
            return _npy_read(body)
        count = 1
        for dim in shape:
            count *= dim
        need = count * dtype.itemsize
        have = len(body) - offset
        if have < need:
            raise ValueError(f"the array needs {need} bytes of data, the body holds {have}")
        if have > need:
            raise ApiError(400, "bad_npy", f"the body has {have - need} bytes after the array")
        arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
    except ApiError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ApiError(400, "bad_npy", f"the body is not a valid .npy without pickles: {exc}") from None


_NPY_OUT_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy_bytes(arr: np.ndarray) -> bytes:
    """A .npy of ``arr``; the header of a (dtype, shape) is built once (numpy's writer
    spends more time on it than on the data of a typical output)."""
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    key = (arr.dtype.str, arr.shape)
    header = _NPY_OUT_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        if arr.dtype.hasobject:
            np.lib.format.write_array(buf, arr, allow_pickle=False)  # raises ValueError
        try:
            np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
        except ValueError:  # a shape too long for a 1.0 header: numpy picks the version
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            return buf.getvalue()
        header = buf.getvalue()
        if len(_NPY_OUT_HEADERS) >= 64:
            _NPY_OUT_HEADERS.clear()
        _NPY_OUT_HEADERS[key] = header
    return header + arr.tobytes()


def _reply_format(accept: str, request_format: str, n_outputs: int) -> str:
    """The reply's media type: the first fitting one ``Accept`` lists, else the request's.

    q-values are not weighed; x-npy fits only a model with one output.
    """
    default = NPZ if request_format == NPY and n_outputs != 1 else request_format
    wanted = [part.split(";", 1)[0].strip().lower() for part in accept.split(",") if part.strip()]
    if not wanted:
        return default
    for media in wanted:
        if media in FORMATS and not (media == NPY and n_outputs != 1):
            return media
        if media in ("*/*", "application/*"):
            return default
    if NPY in wanted:
        raise ApiError(406, "not_acceptable", f"{NPY} holds one array and the model has {n_outputs} "
                       f"outputs; accept {NPZ} or {JSON}")
    raise ApiError(406, "not_acceptable", f"the reply can be {JSON}, {NPZ} or {NPY}, not {accept!r}")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


class _Handler(RequestHandler):
    server_version = "edgefleet-agent"
    timeout = 30  # seconds a client may stall mid-request (or idle between requests)
    logger = log
    host: ModelHost
    max_body_bytes: int
    request_timeout_s: float | None
    locks: LockTable | None = None
    update_waiting: Callable[[], dict[str, str]] | None = None

    # -- plumbing -----------------------------------------------------------------

    _send = RequestHandler.send_reply  # status line, headers and a small body in one write

    def _json(self, status: int, doc: Any, **kw: Any) -> None:
        self._send(status, msgspec.json.encode(doc), JSON, **kw)

    def _error(self, exc: ApiError, close: bool = False) -> None:
        if exc.status >= 500 and exc.status != 503:
            log.warning("api %s %s: %s", exc.status, exc.code, exc.detail)
        self._json(exc.status, {"error": exc.code, "detail": exc.detail}, close=close)

    def _guard(self, fn: Any) -> None:
        self._consumed = self.command != "POST"
        try:
            fn()
        except ApiError as exc:
            # A body left unread would be parsed as the next request: close instead.
            self._error(exc, close=exc.status in (411, 413) or not self._consumed)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # the server must not die on anything a client sends
            log.exception("api: unexpected error")
            with contextlib.suppress(OSError):
                self._error(ApiError(500, "internal", f"unexpected error: {exc}"), close=True)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "length_required", "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "length_required", "a Content-Length header is required")
        if not length.isdigit():
            raise ApiError(400, "bad_request", f"Content-Length {length!r} is not a number")
        n = int(length)
        if n > self.max_body_bytes:
            raise ApiError(413, "too_large", f"the body is {n} bytes, max {self.max_body_bytes}")
        self.send_continue()
        data = self.rfile.read(n)
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
        if method == "POST" and ((self.headers.get("Content-Length") or "0") != "0"
                                 or self.headers.get("Transfer-Encoding")):
            body = self._body()
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
        elif path == "/v1/models":
            models = self.host.snapshot()
            self._json(200, {"models": [describe(m, self._batch_rows(n)) for n, m in sorted(models.items())]})
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
        body = self._body()
        ctype = self.headers.get("Content-Type", JSON).split(";", 1)[0].strip().lower()
        if ctype == NPZ:
            inputs = _npz_inputs(body, self.max_body_bytes)
        elif ctype == NPY:
            inputs = _npy_inputs(model, body)
        elif ctype in (JSON, ""):
            inputs = _json_inputs(model, body, self.max_body_bytes)
        else:
            raise ApiError(415, "unsupported_media_type", f"send {JSON}, {NPZ} or {NPY}, not {ctype!r}")
        reply = _reply_format(self.headers.get("Accept", ""), ctype or JSON, len(model.manifest.outputs))
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
        if reply == NPZ:
            self._send(200, _npz_bytes(outputs), NPZ, headers)
        elif reply == NPY:
            self._send(200, _npy_bytes(next(iter(outputs.values()))), NPY,
                       {**headers, "X-Edgefleet-Output": next(iter(outputs))})
        else:
            self._json(
                200,
                {
                    "model": name,
                    "release": used.release,
                    "outputs": {k: v.tolist() for k, v in outputs.items()},
                },
                headers=headers,
            )

    def _batch_rows(self, name: str) -> int:
        scheduler = self.host.scheduler(name)
        return 1 if scheduler is None else scheduler.max_rows


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TCPServer6(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


class ApiServer:
    """The API on loopback TCP and/or a Unix socket; ``start`` serves in daemon threads."""

    def __init__(self, host: ModelHost, *, listen: tuple[str, int] | None, unix_socket: str = "",
                 max_body_bytes: int = 64 * 1024 * 1024, request_timeout_s: float | None = 30.0,
                 locks: LockTable | None = None,
                 update_waiting: Callable[[], dict[str, str]] | None = None) -> None:
        handler = type("Handler", (_Handler,), {"host": host, "max_body_bytes": max_body_bytes,
                                                "request_timeout_s": request_timeout_s, "locks": locks,
                                                "update_waiting": staticmethod(update_waiting)
                                                if update_waiting else None})
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.tcp_address: tuple[str, int] | None = None
        self.unix_path: Path | None = None
        if listen is not None:
            cls = _TCPServer6 if ":" in listen[0] else _TCPServer
            tcp = cls(listen, handler)
            self.tcp_address = tcp.server_address[:2]  # type: ignore[assignment]
            self._servers.append(tcp)
        if unix_socket:
            path = Path(unix_socket)
            if path.is_socket():
                path.unlink()
            unix = _UnixServer(str(path), handler)
            os.chmod(path, 0o660)
            self.unix_path = path
            self._servers.append(unix)

    def start(self) -> None:
        for server in self._servers:
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"api-{type(server).__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)
        for t in self._threads:
            t.join(timeout=5)
